"""The model's input conventions, which the data pipeline produces and the model consumes.

They live with the model because they are what its layers assume (the image slots it fills with
vision features, the pixel scale the SigLIP tower was trained on); the data pipeline imports them,
never the reverse. NumPy only, so data workers need not import JAX.
"""
from __future__ import annotations

from typing import TypeVar

import numpy as np

# Token id of an image slot. Each image fills `tokens_per_image` consecutive slots of this id;
# the model replaces them with the projected vision features. Same value as the original code.
IMAGE_TOKEN_ID = -200

ArrayT = TypeVar("ArrayT")


def normalize(pixels: ArrayT) -> ArrayT:
    """uint8 pixels (any leading shape; numpy, or jax on the device) -> float32 ``(x / 255 - 0.5) / 0.5``,
    the SigLIP tower's input scale."""
    # One multiply-add instead of rescale-then-normalise; equal to float32 rounding.
    return pixels.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
