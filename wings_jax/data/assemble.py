"""Sequence assembly: truncation, training examples, and single generation prompts.

An *example* is one conversation ready for batching (`batch.pad_row` or packing make it a row):
    {'tokens': int32 (n,), 'labels': int32 (n,), 'text_mask': bool (n,), 'images': uint8 (k, S, S, 3)}
with n <= max_len and k <= max_images.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np

from wings_jax.model.inputs import IMAGE_TOKEN_ID

from .batch import no_images
from .constants import DEFAULT_SYSTEM_PROMPT
from .conversation import ChatFormatter, EncodedConversation, TurnLike
from .images import ImageSource, preprocess_image

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


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
    return _prompt(encoded.tokens, encoded.text_mask, images, image_size, image_aspect)


def encode_next_turn(tokenizer: PreTrainedTokenizerBase, message: str, images: Sequence[ImageSource] = (), *,
                     image_size: int, tokens_per_image: int, image_aspect: str = "pad") -> Prompt:
    """What follows an assistant reply's tokens when the user sends ``message`` (its ``<image>`` placeholders
    bound to ``images``): the reply's closing, the user turn and the assistant header
    (`ChatFormatter.encode_next_turn`), at positions from 0; every token is after the system turn."""
    tokens = ChatFormatter(tokenizer, tokens_per_image=tokens_per_image).encode_next_turn(message, len(images))
    return _prompt(tokens, tokens != IMAGE_TOKEN_ID, images, image_size, image_aspect)


def _prompt(tokens: np.ndarray, text_mask: np.ndarray, images: Sequence[ImageSource], image_size: int,
            image_aspect: str) -> Prompt:
    pixels = [preprocess_image(image, image_size, image_aspect) for image in images]
    return Prompt(
        tokens=tokens,
        positions=np.arange(len(tokens), dtype=np.int32),
        text_mask=text_mask,
        images=np.stack(pixels) if pixels else no_images(image_size, np.float32),
        image_mask=np.ones(len(pixels), bool),
    )
