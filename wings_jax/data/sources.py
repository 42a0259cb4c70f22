"""Random-access record sources: LLaVA JSON / JSONL, our ArrayRecord files, TFDS (ArrayRecord format).

Every source is a grain random-access data source (``__len__``, ``__getitem__``, plus ``close``) whose
items are `RawRecord`s: a record exactly as stored, not yet checked, so that reading never fails for bad
data. `parse_record` turns one into turns and image sources; it is the first step of `record.RecordToExample`,
and raises `BadRecordError` / `BadImageError` for a malformed record, which the bad-record policy then
skips or reports under the record's origin (file and line or index).

Readers (open files, ArrayRecord readers, TFDS sources) are created lazily in each process and are not
pickled, so sources can be sent to grain's worker processes cheaply.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, NamedTuple, Sequence, Union

import numpy as np

from .conversation import Turn, turns_from_llava
from .errors import BadImageError, BadRecordError, DataError
from .images import ImageSource

SOURCE_KINDS = ("llava_json", "array_record", "tfds")


class Unpacked(NamedTuple):
    """A stored record taken apart: the LLaVA-format record and the images stored with it."""

    record: bytes  # the LLaVA-format record, JSON-encoded
    images: Mapping[str, ImageSource | None]  # see RawRecord.images
    origin: str | None = None  # where the record was first read from (a prepared file's source line)


@dataclasses.dataclass(frozen=True)
class RawRecord:
    """One record as read from its source, not yet checked."""

    origin: str  # e.g. "train.jsonl line 12": every error about this record starts with it
    data: Any  # the LLaVA-format record, JSON-encoded; with `unpack`, whatever the source stores
    image_root: str | None = None  # relative image paths are resolved against it
    # Images by the record's image reference: encoded bytes (ArrayRecord) or uint8 pixels (TFDS); None
    # marks an image that was missing when the file was prepared. None: the images are files.
    images: Mapping[str, ImageSource | None] | None = None
    unpack: Callable[[Any], Unpacked] | None = None  # data -> Unpacked; raises BadRecordError if it cannot

    def unpacked(self) -> RawRecord:
        """This record with `data` the LLaVA-format record (and `images` filled in); `BadRecordError`
        if the stored record is damaged. Its origin says where a prepared record was first read from."""
        if self.unpack is None:
            return self
        unpacked = self.unpack(self.data)
        origin = self.origin if unpacked.origin is None else f"{self.origin} (prepared from {unpacked.origin})"
        return RawRecord(origin, unpacked.record, self.image_root, unpacked.images)


def parse_record(raw: RawRecord) -> tuple[list[Turn], list[tuple[str, ImageSource]]]:
    """(turns, [(image name, image source), ...]) of a record; the image sources are not yet read.

    Raises `BadRecordError` / `BadImageError` for a malformed record; the messages say what is wrong,
    ``raw.unpacked().origin`` says which record.
    """
    raw = raw.unpacked()
    try:
        text = raw.data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecordError(f"the record is not valid UTF-8 ({e})", kind="bad_encoding") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecordError(f"the record is not valid JSON ({e})", kind="bad_json") from None
    turns, refs = turns_from_llava(record)
    images = []
    for ref in refs:
        if raw.images is not None:
            data = raw.images.get(ref)
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

_WHITESPACE = np.frombuffer(b" \t\n\r\x0b\x0c", np.uint8)  # what bytes.strip() strips


def _read_data_file(path: str) -> bytes:
    """The bytes of a data file (local or gs://)."""
    from etils import epath

    try:
        return epath.Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"data file {path!r} does not exist (data.sources[*].path)") from None


class JsonlSource:
    """A LLaVA-format JSON Lines file: one record per non-blank line, read by byte offset."""

    def __init__(self, path: str, image_root: str | None = None):
        self.path, self.image_root = str(path), image_root
        data = _read_data_file(path)
        buf = np.frombuffer(data, np.uint8)
        ends = np.flatnonzero(buf == ord("\n"))
        if len(buf) and buf[-1] != ord("\n"):
            ends = np.append(ends, len(buf))
        starts = np.concatenate([[0], ends + 1])[:len(ends)]
        # Blank lines (a trailing newline, spacing) are not records. A line that starts with a
        # non-space byte is not blank; only the few others are looked at one by one.
        keep = (starts < ends) & ~np.isin(buf[np.minimum(starts, len(buf) - 1)], _WHITESPACE)
        for i in np.flatnonzero(~keep):
            keep[i] = data[starts[i]:ends[i]].strip() != b""
        self._starts, self._ends = starts[keep].astype(np.int64), ends[keep].astype(np.int64)
        self._line_numbers = np.flatnonzero(keep) + 1
        self._init_files()

    def _init_files(self) -> None:
        self._local = threading.local()  # one open file per reading thread: seek + read is not atomic
        self._files, self._lock = [], threading.Lock()  # all of them, for close()

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> RawRecord:
        start, end = int(self._starts[index]), int(self._ends[index])
        file = getattr(self._local, "file", None)
        if file is None:
            from etils import epath

            file = self._local.file = epath.Path(self.path).open("rb")
            with self._lock:
                self._files.append(file)
        file.seek(start)
        line = file.read(end - start)
        return RawRecord(f"{self.path} line {self._line_numbers[index]}", line, image_root=self.image_root)

    def close(self) -> None:
        """Closes the files opened so far (reading again opens new ones)."""
        with self._lock:
            files, self._files = self._files, []
            self._local = threading.local()
        for file in files:
            file.close()

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in ("_local", "_files", "_lock"):
            del state[key]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_files()


class JsonSource:
    """A LLaVA-format JSON file holding a list of records (loaded into memory, kept JSON-encoded)."""

    def __init__(self, path: str, image_root: str | None = None):
        self.path, self.image_root = str(path), image_root
        data = _read_data_file(path)
        try:
            records = json.loads(data.decode("utf-8"))
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

    def close(self) -> None:
        pass  # nothing open


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


def unpack_record(blob: bytes) -> Unpacked:
    """The inverse of `pack_record`; `BadRecordError` (kind 'corrupt_record') for anything else."""
    try:
        if blob[:4] != _MAGIC:
            raise ValueError("it does not start with the mark of python -m wings_jax.data.prepare")
        (header_len,) = struct.unpack_from("<I", blob, 4)
        header = json.loads(blob[8:8 + header_len])
        refs = [ref for ref, _ in header["images"]]
        sizes = [header["record"]] + [size for _, size in header["images"]]
        if not all(isinstance(size, int) and size >= -1 for size in sizes) or sizes[0] < 0:
            raise ValueError(f"bad sizes {sizes} in its header")
        parts, pos = [], 8 + header_len
        for size in sizes:
            parts.append(None if size < 0 else blob[pos:pos + size])
            pos += max(size, 0)
        if pos != len(blob):
            raise ValueError(f"its header accounts for {pos} bytes, but it has {len(blob)}")
        origin = str(header["origin"])
    except (ValueError, KeyError, TypeError, struct.error) as e:  # JSON and UTF-8 errors are ValueErrors
        raise BadRecordError(f"not a readable wings_jax record ({type(e).__name__}: {e}); the file is damaged "
                             "or was not made by python -m wings_jax.data.prepare", kind="corrupt_record") from None
    return Unpacked(parts[0], dict(zip(refs, parts[1:])), origin)


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
    """Records written by ``python -m wings_jax.data.prepare`` (image bytes embedded), from one file or shards."""

    def __init__(self, path: str):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self.paths = array_record_paths(path)
        # One reader per file, so that a record's origin names its file. Each counts its records here;
        # pickled copies (grain's workers) keep the counts and open their files lazily.
        with ThreadPoolExecutor(min(16, len(self.paths))) as pool:
            self._files = list(pool.map(ArrayRecordDataSource, self.paths))
        self._ends = np.cumsum([len(f) for f in self._files])

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getitem__(self, index: int) -> RawRecord:
        k = int(np.searchsorted(self._ends, index, side="right"))
        position = index - (int(self._ends[k - 1]) if k else 0)
        return RawRecord(f"{self.paths[k]} record {position}", self._files[k][position], unpack=unpack_record)

    def close(self) -> None:
        for file in self._files:
            file.__exit__(None, None, None)  # closes its reader; reading again reopens it


# ---------------------------------------------------------------------------------------------------- TFDS


class TfdsSource:
    """A TFDS data set in ArrayRecord format, read with TFDS's random-access data source (no TensorFlow needed).

    Its features must hold the conversation as LLaVA-format JSON text under ``conversations_key`` (a Text
    feature) and, optionally, images under ``image_key`` (an Image feature, or a Sequence of them), bound
    in order to the conversation's ``<image>`` placeholders. Examples are read as stored and decoded by
    `unpack` (TFDS decodes the images with PIL; we take its uint8 pixels from there).
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

            builder = tfds.builder(self.name, data_dir=self.data_dir)
            self._source = builder.as_data_source(
                split=self.split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
        return self._source

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> RawRecord:
        return RawRecord(f"tfds {self.name} split {self.split} example {index}", self._open()[index],
                         unpack=self.unpack)

    def unpack(self, serialized: bytes) -> Unpacked:
        try:
            example = self._open().dataset_info.features.deserialize_example_np(serialized)
        except Exception as e:  # noqa: BLE001  (whatever TFDS's decoders raise for a damaged example or image)
            raise BadRecordError(f"cannot decode the TFDS example ({type(e).__name__}: {e})",
                                 kind="bad_example") from None
        conversations = example.get(self.conversations_key)
        if not isinstance(conversations, bytes):
            raise BadRecordError(
                f"feature {self.conversations_key!r} must be a Text feature holding the LLaVA-format "
                f"conversation as JSON, got {type(conversations).__name__}; set data.sources[*].conversations_key",
                kind="bad_example")
        images = example.get(self.image_key, [])
        if isinstance(images, np.ndarray) and images.ndim <= 3:
            images = [images]  # a single Image feature
        refs = [f"{self.image_key}[{i}]" for i in range(len(images))]
        # The JSON text is spliced in undecoded, so that a broken field fails as a broken JSONL line does.
        record = b'{"image": ' + json.dumps(refs).encode() + b', "conversations": ' + conversations + b"}"
        return Unpacked(record, dict(zip(refs, images)))

    def close(self) -> None:
        self._source = None  # its readers close when it is collected; reading again reopens it

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"] = None
        return state


# ------------------------------------------------------------------------------------------------- factory

Source = Union[JsonlSource, JsonSource, ArrayRecordSource, TfdsSource]


def open_source(cfg: Mapping[str, Any]) -> Source:
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
