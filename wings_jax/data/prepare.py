"""Packs a LLaVA-format JSON / JSONL file and its images into ArrayRecord files.

    python -m wings_jax.data.prepare --input train.jsonl --image-root /data/coco --output train.array_record \\
        [--num-shards 8] [--threads 16]

Each record keeps its source line as is and embeds the encoded bytes of the images it references (no
decoding, no re-encoding), so reading the output gives exactly what reading the JSONL file gives,
without touching the image directory. Problems are kept, not fixed: a broken line stays broken and a
missing image is recorded as missing; the training pipeline's bad-record policy decides what to do with
them. With ``--num-shards N`` the records are split, in order, into ``OUTPUT-00000-of-0000N`` ... files.
The output is written locally (ArrayRecord's writer opens local files only); copy it to gs:// afterwards.
"""
from __future__ import annotations

import argparse
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from .errors import BadImageError, DataError
from .images import read_image_file
from .sources import open_llava, pack_record, parse_record


_CHUNK = 256  # records read ahead by the image-reading threads


def _packed(source, index: int) -> tuple[bytes, int]:
    """One record packed with its image bytes, and how many of its images are missing."""
    raw = source[index]
    try:
        _, images = parse_record(raw)
    except DataError:
        images = []  # the record is broken: reading it back fails with the same error, so embed nothing
    embedded = [(ref, _bytes_or_none(path, ref)) for ref, path in images]
    return pack_record(raw.origin, raw.data, embedded), sum(data is None for _, data in embedded)


def _bytes_or_none(path: str, name: str) -> bytes | None:
    try:
        return read_image_file(path, name)
    except BadImageError as e:
        if e.kind == "missing_image":
            return None
        raise


def shard_paths(output: str, num_shards: int) -> list[str]:
    if num_shards == 1:
        return [output]
    return [f"{output}-{k:05d}-of-{num_shards:05d}" for k in range(num_shards)]


def prepare(input_path: str, image_root: str | None, output: str, *, num_shards: int = 1, threads: int = 8,
            progress: bool = True) -> dict[str, int]:
    """Writes the ArrayRecord file(s); returns {'records', 'missing_images'}."""
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm import tqdm

    if num_shards < 1:
        raise ValueError(f"--num-shards must be at least 1, got {num_shards}")
    output = os.fspath(output)
    if "://" in output:
        # ArrayRecord's writer opens local files only (it would write under a local directory named 'gs:').
        raise ValueError(f"--output {output!r}: prepare writes local files only; write to a local directory, "
                         "then copy the shards with gsutil/gcloud storage cp")
    source = open_llava(input_path, image_root)
    n = len(source)
    paths = shard_paths(output, num_shards)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    missing = 0
    bar = tqdm(total=n, unit="rec", desc=f"prepare {os.path.basename(output)}", disable=not progress)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for k, path in enumerate(paths):
            # Contiguous ranges, so the shards read in order give the input order.
            lo, hi = k * n // num_shards, (k + 1) * n // num_shards
            # group_size:1 makes every record its own chunk: fast random access, as grain needs.
            writer = ArrayRecordWriter(path, "group_size:1")
            try:
                # In chunks: Executor.map submits everything at once, which would hold a whole shard's
                # images in memory.
                for chunk in range(lo, hi, _CHUNK):
                    indices = range(chunk, min(chunk + _CHUNK, hi))
                    for blob, n_missing in pool.map(functools.partial(_packed, source), indices):
                        writer.write(blob)
                        missing += n_missing
                        bar.update(1)
            finally:
                writer.close()
    bar.close()
    source.close()
    return {"records": n, "missing_images": missing}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m wings_jax.data.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="LLaVA-format .json (list of records) or .jsonl file")
    parser.add_argument("--image-root", default=None, help="directory the records' image paths are relative to")
    parser.add_argument("--output", required=True, help="local output .array_record path (shards get -NNNNN-of-NNNNN)")
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--threads", type=int, default=8, help="threads reading image files")
    args = parser.parse_args(argv)
    try:
        stats = prepare(args.input, args.image_root, args.output, num_shards=args.num_shards, threads=args.threads)
    except (ValueError, FileNotFoundError) as e:  # DataError is a ValueError
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {stats['records']} records to {', '.join(shard_paths(args.output, args.num_shards))}"
          + (f"; {stats['missing_images']} image(s) were missing and are marked so" if stats["missing_images"] else ""))


if __name__ == "__main__":
    main()
