"""The training input pipeline (grain), and its configuration.

Stages, per host::

    each source: all records -> shuffle(seed, per epoch) -> repeat(num_epochs)      identical on every host
    mix(sources, weights)                                 grain MapDataset.mix, deterministic
    this host's rows: of every run of global_batch_size examples, the process_index-th slice
    record -> example (data.record): parse, ChatML, tokens, truncation, images (uint8) (worker processes)
    bad-record policy ('error' | 'skip', max_bad_fraction)                            (main process)
    one conversation per row (right padding), or first-fit packing of several     (main process)
    batch of global_batch_size // process_count rows, images uint8 (normalised on the device)

Every host walks the same global stream and reads only its own rows of each global batch, so
without packing the global batch (the hosts' rows side by side) does not depend on the number of
hosts: two processes train on exactly what one would. Everything is a deterministic function of the
seed, so batches do not depend on worker_count either, and the iterator's state
(`DataIterator.get_state`, a JSON-serialisable dict) restores the exact next batch. With several
sources and a finite num_epochs, each source repeats num_epochs times and the mixture ends when the
first of them runs out (use num_epochs=None for training by steps); a last incomplete global batch
is dropped.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import grain
import ml_collections
from ml_collections import config_dict
import numpy as np

from . import batch
from .checks import check_batch_split, check_image_slots
from .constants import DEFAULT_SYSTEM_PROMPT
from .conversation import ChatFormatter
from .errors import BadRecordError, DataError
from .images import ASPECT_MODES
from .record import BadRecord, RecordToExample
from .sources import SOURCE_KINDS, Source, open_source

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("wings_jax.data")

BAD_RECORD_POLICIES = ("error", "skip")
_STATE_FORMAT = "wings_jax.data/1"


def source_config(kind: str = "llava_json", path: str = "", **overrides: Any) -> ml_collections.ConfigDict:
    """One entry of ``data.sources``.

    kind: 'llava_json' (.json list or .jsonl), 'array_record' (made by wings_jax.data.prepare; a file,
    its shards, or a glob) or 'tfds' (path = TFDS name such as 'my_set:1.0.0', with data_dir, split,
    conversations_key, image_key). image_root: directory (or gs:// prefix) of relative image paths.
    weight: mixing weight relative to the other sources.
    """
    cfg = ml_collections.ConfigDict({
        "kind": kind, "path": path, "image_root": "", "weight": 1.0, "split": "train", "data_dir": "",
        "conversations_key": "conversations", "image_key": "image",
    })
    for key, value in overrides.items():
        if key not in cfg:
            raise KeyError(f"unknown data source key {key!r}; keys: {', '.join(sorted(cfg.keys()))}")
        cfg[key] = value
    return cfg


def default_data_config() -> ml_collections.ConfigDict:
    """The ``config.data`` section."""
    return ml_collections.ConfigDict({
        "sources": [],  # list of source_config(...) entries
        "tokenizer": "",  # tokenizer directory; the training loop loads it (tokenizer.load_tokenizer)
        "max_len": 2048,  # tokens per row, image slots included
        "max_images": 1,  # image slots per row
        "packing": False,  # several conversations per row (segment ids, per-segment positions)
        "packing_bins": 0,  # rows packed at once (first-fit); 0: the per-host batch size
        "system_prompt": DEFAULT_SYSTEM_PROMPT,  # used when a record has no system turn of its own
        "image_aspect": "pad",  # 'pad' (square of the mean colour, as Wings / LLaVA) or 'resize'
        "shuffle": True,
        "seed": 0,
        "num_epochs": config_dict.placeholder(int),  # None: repeat forever
        "worker_count": 0,  # processes decoding images (0: in the main process)
        "worker_buffer_size": 4,  # examples each worker prepares ahead
        "read_threads": 2,  # threads per process turning records into examples (PIL releases the GIL)
        "read_buffer_size": 32,  # examples prefetched by those threads
        "bad_record_policy": "error",  # 'error': stop at the first bad record; 'skip': count, log, go on
        "max_bad_fraction": 0.01,  # 'skip' fails once skipped / seen exceeds this ...
        "bad_fraction_min_seen": 100,  # ... after this many records (and always at the end of the data)
    })


# ------------------------------------------------------------------------------------- bad-record policy


class BadRecordStats:
    """Records seen and skipped (by reason) so far; shared by the policy stage and `DataIterator`."""

    def __init__(self):
        self.seen = 0
        self.skipped: collections.Counter[str] = collections.Counter()

    def summary(self) -> str:
        """'N records read, K skipped (reason: count, ...)', for the end of a run."""
        reasons = ", ".join(f"{kind}: {n}" for kind, n in sorted(self.skipped.items()))
        return f"{self.seen} records read, {sum(self.skipped.values())} skipped" + (f" ({reasons})" if reasons else "")


@dataclasses.dataclass(frozen=True)
class _BadRecordPolicy:
    """What to do with bad records (``data.bad_record_policy`` and its limits), and the counts so far."""

    policy: str  # 'error' | 'skip'
    max_bad_fraction: float
    min_seen: int
    stats: BadRecordStats


class _BadRecordPolicyDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, rules: _BadRecordPolicy):
        super().__init__(parent)
        self._rules = rules

    def __iter__(self) -> grain.DatasetIterator:
        return _BadRecordPolicyIterator(self._parent.__iter__(), self._rules)

    def __str__(self) -> str:
        return f"BadRecordPolicy({self._rules.policy})"


class _BadRecordPolicyIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, rules: _BadRecordPolicy):
        super().__init__(parent)
        self._rules, self._counts = rules, rules.stats

    def __next__(self):
        while True:
            try:
                element = next(self._parent)
            except StopIteration:
                self._check_fraction(at_end=True)
                raise
            self._counts.seen += 1
            if not isinstance(element, BadRecord):
                return element
            if self._rules.policy == "error":
                raise BadRecordError(
                    f"{element.origin}: {element.message}\n(data.bad_record_policy='error'; fix the record, or set "
                    "data.bad_record_policy='skip' to skip such records)", kind=element.kind)
            self._counts.skipped[element.kind] += 1
            total = sum(self._counts.skipped.values())
            if total <= 20 or total % 1000 == 0:
                log.warning("skipping bad record (%d skipped of %d seen so far): %s: %s",
                            total, self._counts.seen, element.origin, element.message)
            self._check_fraction(at_end=False)

    def _check_fraction(self, at_end: bool) -> None:
        total, seen = sum(self._counts.skipped.values()), self._counts.seen
        if seen and (at_end or seen >= self._rules.min_seen) and total > self._rules.max_bad_fraction * seen:
            raise DataError(
                f"{self._counts.summary()}: more bad records than data.max_bad_fraction="
                f"{self._rules.max_bad_fraction}; the warnings above name them. Fix the data or raise the limit.")

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "seen": self._counts.seen,
                "skipped": dict(self._counts.skipped)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._counts.seen = state["seen"]
        self._counts.skipped = collections.Counter(state["skipped"])


# ------------------------------------------------------------------------------------------- the iterator


class HostRows(grain.MapDataset):
    """Of every ``rows * process_count`` consecutive elements (one global batch), keeps this host's
    ``rows``: the same global stream on every host, each reading only its own slice of it."""

    def __init__(self, parent: grain.MapDataset, rows: int, process_index: int, process_count: int):
        super().__init__(parent)
        self._rows, self._index, self._count = rows, process_index, process_count
        self._length = len(parent) // (rows * process_count) * rows  # whole global batches only

    def __len__(self) -> int:
        return self._length

    def _parent_index(self, index: int) -> int:
        batch, row = divmod(index, self._rows)
        return (batch * self._count + self._index) * self._rows + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._parent_index(index)]

    def __str__(self) -> str:
        return f"HostRows(rows={self._rows}, process={self._index}/{self._count})"


class DataIterator(Iterator[dict]):
    """Iterator of batch dicts (numpy) with `get_state` / `set_state` for checkpointing.

    `get_state()` returns a JSON-serialisable dict; `set_state(state)` on an iterator built from the same
    data config, batch size, worker count and process index continues with the batch that would have come
    next. ``stats.seen`` / ``stats.skipped`` count records and skipped records by reason.
    """

    def __init__(self, dataset: grain.IterDataset, stats: BadRecordStats, fingerprint: str,
                 sources: Sequence[Source] = ()):
        self.stats, self._fingerprint, self._sources = stats, fingerprint, sources
        self._iterator = iter(dataset)

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        return {"format": _STATE_FORMAT, "pipeline": self._fingerprint, "grain": self._iterator.get_state()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a data iterator state of this version (format {state.get('format')!r}, "
                             f"expected {_STATE_FORMAT!r})")
        if state.get("pipeline") != self._fingerprint:
            raise ValueError(
                "the saved data iterator state belongs to a different pipeline (data config, batch size, "
                "worker count, process index/count or image settings changed); restore with the settings "
                "it was saved with, or start the data from scratch")
        self._iterator.set_state(state["grain"])

    def close(self) -> None:
        """Stops worker processes, if any, and closes the sources' files."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()
        for source in self._sources:
            source.close()


def make_data_iterator(data_cfg: Mapping[str, Any], *, tokenizer: PreTrainedTokenizerBase, image_size: int,
                       tokens_per_image: int, global_batch_size: int, process_index: int = 0,
                       process_count: int = 1) -> DataIterator:
    """Builds this host's iterator of batches (see the module docstring and docs/architecture.md).

    Each batch has global_batch_size // process_count rows of data_cfg.max_len tokens and
    data_cfg.max_images images of image_size x image_size pixels. A model without a vision tower passes
    image_size=0 and tokens_per_image=0 and needs data.max_images=0; its batches hold empty image
    arrays (rows, 0, 1, 1, 3), and a record with an image is a bad record (kind 'image_without_tower').
    """
    cfg = _checked(data_cfg, tokens_per_image, global_batch_size, process_index, process_count)
    rows = global_batch_size // process_count

    datasets, weights, sources = [], [], []
    for i, src_cfg in enumerate(cfg["sources"]):
        source = open_source(src_cfg)
        sources.append(source)
        if len(source) == 0:
            raise DataError(f"data source {src_cfg['path']!r} has no records")
        ds = grain.MapDataset.source(source)
        if cfg["shuffle"]:
            ds = ds.shuffle(seed=_seed(cfg["seed"], "shuffle", i))
        datasets.append(ds.repeat(cfg["num_epochs"]))
        weights.append(float(src_cfg["weight"]))
    ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
    ds = HostRows(ds, rows, process_index, process_count)

    formatter = ChatFormatter(tokenizer, tokens_per_image=tokens_per_image, system_prompt=cfg["system_prompt"])
    ds = ds.map(RecordToExample(formatter, image_size=image_size, image_aspect=cfg["image_aspect"],
                        max_len=cfg["max_len"], max_images=cfg["max_images"]))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg["read_threads"],
                                              prefetch_buffer_size=cfg["read_buffer_size"]))
    if cfg["worker_count"] > 0:
        _ensure_absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg["worker_count"],
                                                         per_worker_buffer_size=cfg["worker_buffer_size"]))
    stats = BadRecordStats()
    it = _BadRecordPolicyDataset(it, _BadRecordPolicy(cfg["bad_record_policy"], cfg["max_bad_fraction"],
                                                      cfg["bad_fraction_min_seen"], stats))
    if cfg["packing"]:
        lengths, padding = batch.packing_structs(cfg["max_len"], cfg["max_images"])
        it = grain.experimental.FirstFitPackIterDataset(
            it, length_struct=lengths, padding_struct=padding, num_packing_bins=cfg["packing_bins"] or rows,
            shuffle_bins=False)
        it = it.map(batch.row_from_packed)
    else:
        max_len, max_images = cfg["max_len"], cfg["max_images"]
        it = it.map(lambda example: batch.pad_row(example, max_len, max_images))
    it = it.batch(rows, drop_remainder=True)

    return DataIterator(it, stats, _fingerprint(cfg, image_size, tokens_per_image, global_batch_size,
                                                process_index, process_count, len(tokenizer)), sources)


# Settings that do not change which batches come, nor the shape of the saved state.
_RESUMABLE_CHANGES = ("tokenizer", "worker_buffer_size", "read_threads", "read_buffer_size", "bad_record_policy",
                      "max_bad_fraction", "bad_fraction_min_seen")


def _fingerprint(cfg: dict[str, Any], *settings: Any) -> str:
    fixed = {k: v for k, v in cfg.items() if k not in _RESUMABLE_CHANGES}
    blob = json.dumps([fixed, *settings], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside absl.app (tests, notebooks) they are unparsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # defaults; absl.app.run parses the command line again anyway


def _seed(seed: int, purpose: str, index: int) -> int:
    """A 32-bit seed per (purpose, source): sources must not share a permutation."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{purpose}/{index}".encode()).digest()[:4], "little")


def _checked(data_cfg: Mapping[str, Any], tokens_per_image: int, global_batch_size: int, process_index: int,
             process_count: int) -> dict[str, Any]:
    """The data config as a plain dict (defaults filled in), validated; errors name the key."""
    cfg = default_data_config().to_dict()
    given = data_cfg.to_dict() if isinstance(data_cfg, ml_collections.ConfigDict) else dict(data_cfg)
    unknown = set(given) - set(cfg)
    if unknown:
        raise ValueError(f"unknown data config key(s) {sorted(unknown)}; keys: {', '.join(sorted(cfg))}")
    cfg.update(given)
    sources = []
    for i, src in enumerate(cfg["sources"]):
        src = src.to_dict() if isinstance(src, ml_collections.ConfigDict) else dict(src)
        sources.append(source_config(**src).to_dict())
        if sources[-1]["kind"] not in SOURCE_KINDS:
            raise ValueError(f"data.sources[{i}].kind {src['kind']!r} is not one of {SOURCE_KINDS}")
        if not sources[-1]["weight"] > 0:
            raise ValueError(f"data.sources[{i}].weight must be positive, got {src['weight']}")
    cfg["sources"] = sources
    if not sources:
        raise ValueError("data.sources is empty; add at least one source_config(...)")
    if cfg["bad_record_policy"] not in BAD_RECORD_POLICIES:
        raise ValueError(f"data.bad_record_policy {cfg['bad_record_policy']!r} is not one of {BAD_RECORD_POLICIES}")
    if cfg["image_aspect"] not in ASPECT_MODES:
        raise ValueError(f"data.image_aspect {cfg['image_aspect']!r} is not one of {ASPECT_MODES}")
    check_image_slots(cfg["max_images"], cfg["max_len"], tokens_per_image)
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} / process_count {process_count} are inconsistent")
    check_batch_split(global_batch_size, process_count)
    if cfg["num_epochs"] is not None and cfg["num_epochs"] < 1:
        raise ValueError(f"data.num_epochs must be None (forever) or at least 1, got {cfg['num_epochs']}")
    return cfg
