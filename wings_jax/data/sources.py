"""Random-access record sources: LLaVA JSON / JSONL, our ArrayRecord files, TFDS (ArrayRecord format).

Every source is a grain random-access data source (``__len__``, ``__getitem__``) whose items are
`RawRecord`s: the LLaVA-format record (still encoded, so that a broken line becomes a bad record at
decode time instead of failing the whole file) plus where its images come from. `decode_record` turns
one into turns and image sources; it raises `BadRecordError` / `BadImageError` naming the record.

Readers (open files, ArrayRecord readers, TFDS sources) are created lazily in each process and are not
pickled, so sources can be sent to grain's worker processes cheaply.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from .conversation import Turn, turns_from_llava
from .errors import BadImageError, BadRecordError, DataError
from .images import ImageSource

SOURCE_KINDS = ("llava_json", "array_record", "tfds")


@dataclasses.dataclass(frozen=True)
class RawRecord:
    """One record as read from its source."""

    origin: str  # e.g. "train.jsonl line 12": every error about this record starts with it
    record: bytes  # the LLaVA-format record, JSON-encoded as read
    image_root: str | None = None  # relative image paths are resolved against it
    # Images by the record's image reference: encoded bytes (ArrayRecord) or uint8 pixels (TFDS); None
    # marks an image that was missing when the file was prepared.
    embedded_images: Mapping[str, ImageSource | None] | None = None


def decode_record(raw: RawRecord) -> tuple[list[Turn], list[tuple[str, ImageSource]]]:
    """(turns, [(image name, image source), ...]) of a record; the image sources are not yet read."""
    try:
        text = raw.record.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecordError(f"the record is not valid UTF-8 ({e})", kind="bad_encoding") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecordError(f"the record is not valid JSON ({e})", kind="bad_json") from None
    turns, refs = turns_from_llava(record)
    images = []
    for ref in refs:
        if raw.embedded_images is not None:
            data = raw.embedded_images.get(ref)
            if data is None:
                raise BadImageError(f"image {ref!r} was missing when this file was prepared", kind="missing_image")
            images.append((ref, data))
        elif raw.image_root is not None:
            images.append((ref, _join(raw.image_root, ref)))
        else:
            images.append((ref, ref))
    return turns, images


def _join(root: str, ref: str) -> str:
    if "://" in root:
        return root.rstrip("/") + "/" + ref
    return os.path.join(root, ref)


# ----------------------------------------------------------------------------------------- LLaVA JSON / JSONL


class JsonlSource:
    """A LLaVA-format JSON Lines file: one record per non-blank line, read by byte offset."""

    def __init__(self, path: str, image_root: str | None = None):
        from etils import epath

        self.path, self.image_root = str(path), image_root
        try:
            data = epath.Path(path).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"data file {path!r} does not exist (data.sources[*].path)") from None
        buf = np.frombuffer(data, np.uint8)
        ends = np.flatnonzero(buf == ord("\n"))
        if len(buf) and buf[-1] != ord("\n"):
            ends = np.append(ends, len(buf))
        starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
        # Blank lines (a trailing newline, spacing) are not records.
        keep = np.array([data[s:e].strip() != b"" for s, e in zip(starts, ends)], dtype=bool)
        self._starts, self._ends = starts[keep], ends[keep].astype(np.int64)
        self._line_numbers = np.flatnonzero(keep) + 1
        self._local = threading.local()  # one open file per reading thread: seek + read is not atomic

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> RawRecord:
        start, end = int(self._starts[index]), int(self._ends[index])
        file = getattr(self._local, "file", None)
        if file is None:
            from etils import epath

            file = self._local.file = epath.Path(self.path).open("rb")
        file.seek(start)
        line = file.read(end - start)
        return RawRecord(f"{self.path} line {self._line_numbers[index]}", line, image_root=self.image_root)

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_local"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state, _local=threading.local())


class JsonSource:
    """A LLaVA-format JSON file holding a list of records (loaded into memory, kept JSON-encoded)."""

    def __init__(self, path: str, image_root: str | None = None):
        from etils import epath

        self.path, self.image_root = str(path), image_root
        try:
            records = json.loads(epath.Path(path).read_bytes().decode("utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"data file {path!r} does not exist (data.sources[*].path)") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: cannot read the file as UTF-8 JSON ({e}); use a .jsonl file so that "
                            "broken records can be skipped one by one") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: a LLaVA JSON file must hold a list of records, got {type(records).__name__}")
        # Re-encoded per record: compact to pickle for worker processes, decoded on use.
        self._records = [json.dumps(r).encode("utf-8") for r in records]

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> RawRecord:
        return RawRecord(f"{self.path} record {index}", self._records[index], image_root=self.image_root)


def open_llava(path: str, image_root: str | None = None) -> JsonlSource | JsonSource:
    """A ``.json`` file is a list of records; anything else is read as JSON Lines."""
    return JsonSource(path, image_root) if str(path).endswith(".json") else JsonlSource(path, image_root)


# ------------------------------------------------------------------------------------ our ArrayRecord files
#
# A record is   MAGIC | uint32 header length | header (JSON) | record bytes | image bytes ...
# header = {"origin": "x.jsonl line 3", "record": n_bytes, "images": [[reference, n_bytes or -1], ...]}
# The record bytes are the source line exactly as read (so a broken line fails at read time exactly as it
# would from the JSONL file); -1 marks an image that was missing when the file was prepared.

_MAGIC = b"WJR1"


def pack_record(origin: str, record: bytes, images: Sequence[tuple[str, bytes | None]]) -> bytes:
    header = {
        "origin": origin,
        "record": len(record),
        "images": [[ref, -1 if data is None else len(data)] for ref, data in images],
    }
    header_bytes = json.dumps(header).encode("utf-8")
    parts = [_MAGIC, struct.pack("<I", len(header_bytes)), header_bytes, record]
    parts.extend(data for _, data in images if data is not None)
    return b"".join(parts)


def unpack_record(blob: bytes, where: str) -> RawRecord:
    if blob[:4] != _MAGIC:
        raise DataError(f"{where} is not a wings_jax record (made by python -m wings_jax.data.prepare?)")
    (header_len,) = struct.unpack("<I", blob[4:8])
    header = json.loads(blob[8:8 + header_len].decode("utf-8"))
    pos = 8 + header_len
    record = blob[pos:pos + header["record"]]
    pos += header["record"]
    images = {}
    for ref, size in header["images"]:
        if size < 0:
            images[ref] = None
        else:
            images[ref] = blob[pos:pos + size]
            pos += size
    return RawRecord(f"{header['origin']} (from {where})", record, embedded_images=images)


def array_record_paths(path: str) -> list[str]:
    """``path`` itself, else its shards ``path-00000-of-0000N`` in order, else a glob pattern's matches."""
    from etils import epath

    p = epath.Path(path)
    if p.exists():
        return [str(p)]
    pattern = p.name if any(c in p.name for c in "*?[") else p.name + "-*-of-*"
    found = sorted(str(q) for q in p.parent.glob(pattern))
    if not found:
        raise FileNotFoundError(f"no ArrayRecord file {path!r} (nor shards {path}-NNNNN-of-NNNNN); "
                                "make it with python -m wings_jax.data.prepare")
    return found


class ArrayRecordSource:
    """Records written by ``python -m wings_jax.data.prepare`` (image bytes embedded)."""

    def __init__(self, path: str):
        self.paths = array_record_paths(path)
        self.name = self.paths[0] if len(self.paths) == 1 else f"{path} ({len(self.paths)} shards)"
        self._reader = None
        self._length = len(self._open())

    def _open(self):
        if self._reader is None:
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            self._reader = ArrayRecordDataSource(self.paths)
        return self._reader

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> RawRecord:
        return unpack_record(self._open()[index], f"{self.name} record {index}")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_reader"] = None
        return state


# ---------------------------------------------------------------------------------------------------- TFDS


class TfdsSource:
    """A TFDS data set in ArrayRecord format, read with TFDS's random-access data source (no TensorFlow needed).

    Its features must hold the conversation as LLaVA-format JSON text under ``conversations_key`` (a Text
    feature) and, optionally, images under ``image_key`` (an Image feature, or a Sequence of them), bound
    in order to the conversation's ``<image>`` placeholders. TFDS decodes the images (PIL); we take its
    uint8 pixels from there.
    """

    def __init__(self, name: str, *, split: str = "train", data_dir: str | None = None,
                 conversations_key: str = "conversations", image_key: str = "image"):
        self.name, self.split, self.data_dir = name, split, data_dir or None
        self.conversations_key, self.image_key = conversations_key, image_key
        self._source = None
        self._length = len(self._open())

    def _open(self):
        if self._source is None:
            import tensorflow_datasets as tfds

            self._source = tfds.builder(self.name, data_dir=self.data_dir).as_data_source(split=self.split)
        return self._source

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> RawRecord:
        example = self._open()[index]
        origin = f"tfds {self.name} split {self.split} example {index}"
        conversations = example.get(self.conversations_key)
        if not isinstance(conversations, bytes):
            raise DataError(f"{origin}: feature {self.conversations_key!r} must be a Text feature holding the "
                            f"LLaVA-format conversation as JSON, got {type(conversations).__name__}; set "
                            "data.sources[*].conversations_key")
        images = example.get(self.image_key, [])
        if isinstance(images, np.ndarray) and images.ndim <= 3:
            images = [images]  # a single Image feature
        refs = [f"{self.image_key}[{i}]" for i in range(len(images))]
        # The JSON text is spliced in undecoded, so that a broken field fails in decode_record, as a
        # broken line of a JSONL file does.
        record = b'{"image": ' + json.dumps(refs).encode() + b', "conversations": ' + conversations + b"}"
        return RawRecord(origin, record, embedded_images=dict(zip(refs, images)))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"] = None
        return state


# ------------------------------------------------------------------------------------------------- factory


def open_source(cfg: Mapping[str, Any]):
    """Opens one ``data.sources`` entry (see `pipeline.source_config`)."""
    kind = cfg["kind"]
    if kind == "llava_json":
        return open_llava(cfg["path"], cfg.get("image_root") or None)
    if kind == "array_record":
        return ArrayRecordSource(cfg["path"])
    if kind == "tfds":
        return TfdsSource(cfg["path"], split=cfg.get("split") or "train", data_dir=cfg.get("data_dir") or None,
                          conversations_key=cfg.get("conversations_key") or "conversations",
                          image_key=cfg.get("image_key") or "image")
    raise ValueError(f"data source kind {kind!r} is not one of {SOURCE_KINDS}")
