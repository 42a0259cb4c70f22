"""The batch the model reads (docs/architecture.md): its keys, their dtypes, shapes and padding values, and the
one routine that pads sequences into rows of it. Training, packing, generation, recompute and scoring all
build their batches here.

A *sequence* is one unpadded row: a mapping with 'tokens' (n,), 'text_mask' (n,) and 'images' (k, ...), and
optionally 'labels' (n,) and 'positions' (n,) (default 0..n-1). The jitted code takes the batch as a plain
dict of arrays keyed as `FIELDS` (a pytree that shardings and `jax.ShapeDtypeStruct`s map over directly).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from .constants import IGNORE_ID


class Field(NamedTuple):
    dtype: Any
    pad: Any  # value of the padding entries
    per_image: bool  # (rows, max_images[, ...]) rather than (rows, max_len)


FIELDS: dict[str, Field] = {
    "tokens": Field(np.int32, 0, False),
    "labels": Field(np.int32, IGNORE_ID, False),  # padding trains nothing
    "positions": Field(np.int32, 0, False),
    "segment_ids": Field(np.int32, 0, False),  # 0: padding; 1, 2, ...: the row's sequences
    "text_mask": Field(np.bool_, False, False),
    "images": Field(np.uint8, 0, True),  # normalised on the device
    "image_mask": Field(np.bool_, False, True),
}
BATCH_KEYS = tuple(FIELDS)


def slot_size(image_size: int) -> int:
    """Side of the pixels in an image slot: ``image_size``, or 1 for a model without a tower (image_size 0),
    whose image arrays are always empty."""
    return max(image_size, 1)


def no_images(image_size: int, dtype: Any) -> np.ndarray:
    """An empty (0, S, S, 3) image array."""
    s = slot_size(image_size)
    return np.zeros((0, s, s, 3), dtype)


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """The fixed shapes of a training batch: rows, tokens per row, image slots per row, image side (0: no tower)."""

    rows: int
    max_len: int
    max_images: int
    image_size: int

    def shapes(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """Shape and dtype of every key."""
        s = slot_size(self.image_size)
        per_image = {"images": (self.rows, self.max_images, s, s, 3), "image_mask": (self.rows, self.max_images)}
        return {k: (per_image.get(k, (self.rows, self.max_len)), f.dtype) for k, f in FIELDS.items()}


def _padded(key: str, values: np.ndarray, size: int) -> np.ndarray:
    field = FIELDS[key]
    out = np.full(size, field.pad, field.dtype)
    out[:len(values)] = values
    return out


def pad_row(sequence: Mapping[str, np.ndarray], length: int, num_images: int,
            image_shape: tuple[int, ...] | None = None, image_dtype: Any = FIELDS["images"].dtype
            ) -> dict[str, np.ndarray]:
    """One sequence right-padded to ``length`` tokens and ``num_images`` image slots of ``image_shape`` (default:
    the sequence's own); 'labels' only if the sequence has them."""
    tokens, images = sequence["tokens"], sequence["images"]
    n, k = len(tokens), len(images)
    if n > length or k > num_images:
        raise ValueError(f"a sequence of {n} tokens and {k} images does not fit a row of {length} tokens and "
                         f"{num_images} images")
    row = {"tokens": _padded("tokens", tokens, length)}
    if "labels" in sequence:
        row["labels"] = _padded("labels", sequence["labels"], length)
    positions = sequence.get("positions")
    row["positions"] = _padded("positions", np.arange(n, dtype=np.int32) if positions is None else positions,
                               length)
    row["segment_ids"] = _padded("segment_ids", np.ones(n, np.int32), length)
    row["text_mask"] = _padded("text_mask", sequence["text_mask"], length)
    row["images"] = np.zeros((num_images, *(images.shape[1:] if image_shape is None else image_shape)), image_dtype)
    if k:  # a sequence without images may hold them in another layout (0, ...)
        row["images"][:k] = images
    row["image_mask"] = _padded("image_mask", np.ones(k, bool), num_images)
    return row


def pad_rows(sequences: Sequence[Mapping[str, np.ndarray]], length: int, num_images: int,
          image_dtype: Any = FIELDS["images"].dtype) -> dict[str, np.ndarray]:
    """The batch of ``sequences``, each padded by :func:`pad_row`; image slots take the layout of the first
    sequence that has images."""
    image_shape = next((s["images"].shape[1:] for s in sequences if len(s["images"])),
                       sequences[0]["images"].shape[1:])
    rows = [pad_row(s, length, num_images, image_shape, image_dtype) for s in sequences]
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def append_tokens(batch: dict[str, np.ndarray], lengths: np.ndarray, tokens: np.ndarray) -> None:
    """Writes one new text token per row, in place, right after the row's ``lengths`` tokens."""
    rows = np.arange(len(lengths))
    batch["tokens"][rows, lengths] = tokens
    batch["positions"][rows, lengths] = lengths
    batch["segment_ids"][rows, lengths] = 1
    batch["text_mask"][rows, lengths] = True  # generated text comes after the system turn


# grain's packing: per-feature target lengths and padding values of an example's keys.
def packing_structs(max_len: int, max_images: int) -> tuple[dict[str, int], dict[str, Any]]:
    keys = ("tokens", "labels", "text_mask", "images")
    lengths = {k: max_images if FIELDS[k].per_image else max_len for k in keys}
    return lengths, {k: FIELDS[k].pad for k in keys}


def row_from_packed(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A row from grain's packed output (which adds '<key>_segment_ids' / '<key>_positions' per key).

    The packer appends every feature of an example to the same bin in the same order, so the k-th image
    of a row is the k-th image run of its tokens.
    """
    row = {"tokens": packed["tokens"], "labels": packed["labels"], "positions": packed["tokens_positions"],
           "segment_ids": packed["tokens_segment_ids"], "text_mask": packed["text_mask"],
           "images": packed["images"], "image_mask": packed["images_segment_ids"] > 0}
    return {k: v.astype(FIELDS[k].dtype, copy=False) for k, v in row.items()}
