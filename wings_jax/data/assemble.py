"""Sequence assembly: truncation, padding, packed rows, the final batch, and single generation prompts.

An *example* is one conversation ready for batching:
    {'tokens': int32 (n,), 'labels': int32 (n,), 'text_mask': bool (n,), 'images': uint8 (k, S, S, 3)}
with n <= max_len and k <= max_images. A *row* has the keys of the batch contract (docs/architecture.md)
at fixed shapes; stacked rows are the batch the model reads (images stay uint8, normalised on the device).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import numpy as np

from .constants import DEFAULT_SYSTEM_PROMPT, IGNORE_ID
from .conversation import ChatFormatter, EncodedConversation, TurnLike
from .images import ImageSource, preprocess_image

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _slot_size(image_size: int) -> int:
    """Side of the pixels in an image slot: ``image_size``, or 1 for a model without a tower (image_size 0),
    whose image arrays are always empty."""
    return max(image_size, 1)


def no_images(image_size: int, dtype: Any) -> np.ndarray:
    """An empty (0, S, S, 3) image array."""
    s = _slot_size(image_size)
    return np.zeros((0, s, s, 3), dtype)


def batch_spec(batch_size: int, max_len: int, max_images: int, image_size: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Shape and dtype of every key of the batch the model reads (docs/architecture.md)."""
    image_size = _slot_size(image_size)
    tokens = (batch_size, max_len)
    return {
        "tokens": (tokens, np.int32), "labels": (tokens, np.int32), "positions": (tokens, np.int32),
        "segment_ids": (tokens, np.int32), "text_mask": (tokens, np.bool_),
        "images": ((batch_size, max_images, image_size, image_size, 3), np.uint8),
        "image_mask": ((batch_size, max_images), np.bool_),
    }


BATCH_KEYS = tuple(batch_spec(1, 1, 1, 1))


def truncation_point(length: int, image_starts: Sequence[int], tokens_per_image: int, max_len: int,
                     max_images: int) -> tuple[int, int]:
    """(number of tokens kept, number of images kept) under the length and image caps.

    Never splits an image and never keeps an image without its slots: the sequence is cut before the
    first image that does not fit entirely within max_len or exceeds max_images, and that image and all
    later ones are dropped.
    """
    cut, kept = min(length, max_len), 0
    for k, start in enumerate(image_starts):
        if k >= max_images or start + tokens_per_image > cut:
            return min(cut, start), kept
        kept += 1
    return cut, kept


def make_example(encoded: EncodedConversation, images: Sequence[np.ndarray], cut: int,
                 image_size: int) -> dict[str, np.ndarray]:
    """The example of ``encoded`` truncated to ``cut`` tokens; ``images`` are the kept images' uint8 pixels."""
    pixels = np.stack(images) if len(images) else no_images(image_size, np.uint8)
    return {
        "tokens": encoded.tokens[:cut],
        "labels": encoded.labels[:cut],
        "text_mask": encoded.text_mask[:cut],
        "images": pixels,
    }


def pad_row(example: dict[str, np.ndarray], max_len: int, max_images: int) -> dict[str, np.ndarray]:
    """One conversation per row: right padding to max_len tokens and max_images images."""
    n, k = len(example["tokens"]), len(example["images"])
    tokens = np.zeros(max_len, np.int32)
    tokens[:n] = example["tokens"]
    labels = np.full(max_len, IGNORE_ID, np.int32)
    labels[:n] = example["labels"]
    positions = np.zeros(max_len, np.int32)
    positions[:n] = np.arange(n, dtype=np.int32)
    segment_ids = np.zeros(max_len, np.int32)
    segment_ids[:n] = 1
    text_mask = np.zeros(max_len, bool)
    text_mask[:n] = example["text_mask"]
    images = np.zeros((max_images, *example["images"].shape[1:]), np.uint8)
    images[:k] = example["images"]
    image_mask = np.zeros(max_images, bool)
    image_mask[:k] = True
    return {"tokens": tokens, "labels": labels, "positions": positions, "segment_ids": segment_ids,
            "text_mask": text_mask, "images": images, "image_mask": image_mask}


# grain's packing: per-feature target lengths and padding values (unused image slots stay zero).
def packing_structs(max_len: int, max_images: int) -> tuple[dict[str, int], dict[str, Any]]:
    lengths = {"tokens": max_len, "labels": max_len, "text_mask": max_len, "images": max_images}
    padding = {"tokens": 0, "labels": IGNORE_ID, "text_mask": False, "images": 0}
    return lengths, padding


def row_from_packed(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A row from grain's packed output (which adds '<key>_segment_ids' / '<key>_positions' per key).

    The packer appends every feature of an example to the same bin in the same order, so the k-th image
    of a row is the k-th image run of its tokens.
    """
    return {
        "tokens": packed["tokens"].astype(np.int32, copy=False),
        "labels": packed["labels"].astype(np.int32, copy=False),
        "positions": packed["tokens_positions"].astype(np.int32, copy=False),
        "segment_ids": packed["tokens_segment_ids"].astype(np.int32, copy=False),
        "text_mask": packed["text_mask"].astype(bool, copy=False),
        "images": packed["images"],
        "image_mask": packed["images_segment_ids"] > 0,
    }


class Prompt(NamedTuple):
    """A single generation prompt, unpadded: n tokens, k images."""

    tokens: np.ndarray  # int32 (n,), image slots hold IMAGE_TOKEN_ID
    positions: np.ndarray  # int32 (n,)
    text_mask: np.ndarray  # bool (n,)
    images: np.ndarray  # float32 (k, S, S, 3)
    image_mask: np.ndarray  # bool (k,), all True


def encode_prompt(tokenizer: PreTrainedTokenizerBase, turns: Sequence[TurnLike], images: Sequence[ImageSource] = (),
                  *, image_size: int, tokens_per_image: int, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                  image_aspect: str = "pad") -> Prompt:
    """Formats a conversation that ends with a user turn, followed by the assistant header to generate from.

    ``turns`` are `Turn`s or ``{'role', 'content'}`` messages; the k-th ``<image>`` placeholder binds to
    ``images[k]`` (paths, bytes, PIL images or uint8 arrays), preprocessed as in training.
    """
    formatter = ChatFormatter(tokenizer, tokens_per_image=tokens_per_image, system_prompt=system_prompt)
    encoded = formatter.encode(turns, len(images), add_generation_prompt=True)
    pixels = [preprocess_image(image, image_size, image_aspect) for image in images]
    n = len(encoded.tokens)
    return Prompt(
        tokens=encoded.tokens,
        positions=np.arange(n, dtype=np.int32),
        text_mask=encoded.text_mask,
        images=np.stack(pixels) if pixels else no_images(image_size, np.float32),
        image_mask=np.ones(len(pixels), bool),
    )
