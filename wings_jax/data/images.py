"""Image preprocessing for the SigLIP tower: the one implementation used by training, generation and evaluation.

    preprocess_image(src, size)  =  normalize(to_square_pixels(load_image(src), size))

- `load_image` decodes a path (local or gs://), encoded bytes, a PIL image or a uint8 array into an RGB PIL
  image. Transparency is composited onto white (as transformers' `convert_to_rgb` does); 16-bit greyscale
  is scaled to 8 bits (PIL's own conversion would clip everything above 255 to white).
- `to_square_pixels` pads to a centred square of the mean colour ('pad', LLaVA's expand2square) or not
  ('resize'), then resizes to size x size with PIL's bicubic filter: uint8 (S, S, 3).
- `normalize` (`wings_jax.model.inputs`, the tower's convention) rescales by 1/255 and normalises with mean
  0.5, std 0.5: float32 in [-1, 1].

The values equal `transformers.SiglipImageProcessor(size={'height': S, 'width': S}, resample=BICUBIC)`
applied to the padded RGB image (to float32 rounding). The training pipeline runs the first two steps in
its workers and the model runs `normalize` on the device, so only uint8 pixels travel between processes
and to the accelerator.

EXIF orientation is not applied, as in the original Wings code and in transformers.
"""
from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
from PIL import Image

from wings_jax.model.inputs import normalize

from .errors import BadImageError

# 'pad' fills with the normalisation mean as a colour: int(0.5 * 255) = 127 per channel, as LLaVA does.
PAD_COLOUR = (127, 127, 127)
ASPECT_MODES = ("pad", "resize")

ImageSource = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_image(source: ImageSource, *, name: str | None = None) -> Image.Image:
    """Decodes ``source`` into an RGB PIL image.

    ``name`` is what error messages call the image (defaults to the path). Raises `BadImageError`
    (kind 'missing_image' or 'bad_image') for a missing file, a file that is not an image, a truncated
    file, or a pixel format that has no RGB meaning; never returns a substitute image.
    """
    if isinstance(source, Image.Image):
        image, name = source, name or "<PIL image>"
    elif isinstance(source, np.ndarray):
        image, name = _image_from_array(source, name or "<array>"), name or "<array>"
    else:
        if isinstance(source, (bytes, bytearray, memoryview)):
            data, name = bytes(source), name or "<image bytes>"
        else:
            name = name or os.fspath(source)
            data = read_image_file(source, name)
        buffer = io.BytesIO(data)
        try:
            image = Image.open(buffer)
            # Decode now: a truncated file only fails here, and it must fail inside this try.
            image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            # UnidentifiedImageError is an OSError; truncated JPEG/PNG data raises OSError too. PIL's message
            # names the in-memory buffer ("<_io.BytesIO object at 0x...>"): name the image instead.
            detail = str(e).replace(repr(buffer), repr(name))
            raise BadImageError(
                f"cannot decode image {name!r}: {type(e).__name__}: {detail}. Replace or remove the file "
                "(in training data, data.bad_record_policy='skip' skips such records)"
            ) from e
    return _to_rgb(image, name)


def to_square_pixels(image: Image.Image, image_size: int, aspect: str = "pad") -> np.ndarray:
    """Pads (``aspect='pad'``) and bicubic-resizes an RGB image: uint8 array (image_size, image_size, 3)."""
    if aspect not in ASPECT_MODES:
        raise ValueError(f"image aspect {aspect!r} is not one of {ASPECT_MODES}")
    if image.mode != "RGB":
        raise ValueError(f"to_square_pixels expects an RGB image (use load_image), got mode {image.mode!r}")
    if aspect == "pad":
        width, height = image.size
        if width != height:
            side = max(width, height)
            square = Image.new("RGB", (side, side), PAD_COLOUR)
            square.paste(image, ((side - width) // 2, (side - height) // 2))
            image = square
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def preprocess_image(source: ImageSource, image_size: int, aspect: str = "pad", *,
                     name: str | None = None) -> np.ndarray:
    """Loads and preprocesses one image: float32 (image_size, image_size, 3), NHWC, values in [-1, 1]."""
    return normalize(to_square_pixels(load_image(source, name=name), image_size, aspect))


def read_image_file(path: str | os.PathLike, name: str) -> bytes:
    """The bytes of an image file (local or gs://); `BadImageError` (kind 'missing_image') if it does not exist."""
    from etils import epath  # local paths and gs:// alike

    try:
        return epath.Path(path).read_bytes()
    except FileNotFoundError as e:
        raise BadImageError(
            f"image file {name!r} does not exist ({os.fspath(path)}); check the path (in training data: "
            "data.sources[*].image_root and the record's 'image' field)",
            kind="missing_image",
        ) from e
    except (IsADirectoryError, PermissionError) as e:
        raise BadImageError(f"cannot read image file {name!r}: {e}") from e


def _image_from_array(array: np.ndarray, name: str) -> Image.Image:
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        raise BadImageError(
            f"image {name!r}: expected a uint8 array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
            f"got {array.dtype} {array.shape}"
        )
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(np.ascontiguousarray(array))


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        # 16-bit greyscale (PNG opens as I;16, some decoders give I): map 0..65535 to 0..255.
        values = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "F":
        raise BadImageError(
            f"image {name!r} has floating-point pixels (mode F), which have no fixed range; convert it to "
            "8-bit RGB first"
        )
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        # Composite onto white, as transformers does (dropping alpha would expose arbitrary colours).
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    # 1, L, P, CMYK, YCbCr, LAB, HSV: PIL's conversions are exact.
    return image.convert("RGB")
