"""Image preprocessing: parity with transformers' SigLIP image processor on odd images, and clear errors."""
import io
import warnings

import numpy as np
import pytest
from PIL import Image

from wings_jax.data import BadImageError, load_image, preprocess_image
from wings_jax.data.images import PAD_COLOUR

S = 24  # small tower size keeps the tests fast; one test uses the real 384


def _processor(size):
    from transformers import SiglipImageProcessor
    from transformers.image_utils import PILImageResampling

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "falling back to the PIL backend" (no torchvision here)
        return SiglipImageProcessor(size={"height": size, "width": size}, resample=PILImageResampling.BICUBIC)


def _reference(rgb: Image.Image, size: int, aspect: str) -> np.ndarray:
    """transformers' pixels for an RGB image, after LLaVA's expand2square (written here independently)."""
    if aspect == "pad" and rgb.width != rgb.height:
        side = max(rgb.size)
        square = Image.new("RGB", (side, side), (127, 127, 127))
        square.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
        rgb = square
    pixels = _processor(size)(rgb, return_tensors="np")["pixel_values"][0]
    return np.transpose(pixels, (1, 2, 0))


def _hf_rgb(image: Image.Image) -> Image.Image:
    """transformers' own RGB conversion (alpha composited onto white)."""
    from transformers.image_transforms import convert_to_rgb

    return Image.fromarray(convert_to_rgb(image, return_numpy=True))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _random_rgb(rng, width, height):
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _odd_images():
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (17, 29, 4), dtype=np.uint8), "RGBA")
    palette = _random_rgb(rng, 31, 12).quantize(colors=16)
    palette_transparent = palette.copy()
    palette_transparent.info["transparency"] = 3  # palette index 3 is see-through
    grey = Image.fromarray(rng.integers(0, 256, (40, 21), dtype=np.uint8), "L")
    grey_alpha = Image.fromarray(rng.integers(0, 256, (9, 14, 2), dtype=np.uint8), "LA")
    return {
        "wide": _random_rgb(rng, 50, 20),
        "tall": _random_rgb(rng, 13, 41),
        "square": _random_rgb(rng, 30, 30),
        "one_pixel": _random_rgb(rng, 1, 1),
        "rgba": rgba,
        "palette": palette,
        "palette_transparent": palette_transparent,
        "greyscale": grey,
        "greyscale_alpha": grey_alpha,
        "cmyk": _random_rgb(rng, 11, 7).convert("CMYK"),
    }


@pytest.mark.parametrize("aspect", ["pad", "resize"])
@pytest.mark.parametrize("name", list(_odd_images()))
def test_matches_transformers(name, aspect):
    image = _odd_images()[name]
    ours = preprocess_image(_png(image) if image.mode != "CMYK" else image, S, aspect)
    assert ours.dtype == np.float32 and ours.shape == (S, S, 3)
    expected = _reference(_hf_rgb(image), S, aspect)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
    if aspect == "resize":
        # transformers given the raw image (its own RGB conversion, no padding) agrees too.
        raw = _processor(S)(image, return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(ours, np.transpose(raw, (1, 2, 0)), atol=1e-5, rtol=0)


def test_sixteen_bit_png_is_scaled_not_clipped():
    rng = np.random.default_rng(1)
    values = rng.integers(0, 65536, (19, 33), dtype=np.uint16)
    data = _png(Image.fromarray(values))  # a 16-bit greyscale PNG
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    ours = preprocess_image(data, S, "pad")
    eight_bit = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    expected = _reference(Image.fromarray(eight_bit, "L").convert("RGB"), S, "pad")
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
    # PIL's own conversion clips everything above 255 to white: very different pixels.
    clipped = _reference(Image.open(io.BytesIO(data)).convert("RGB"), S, "pad")
    assert np.abs(ours - clipped).mean() > 0.3


def test_real_size_jpeg(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "photo.jpg"
    _random_rgb(rng, 640, 480).save(path, quality=90)
    ours = preprocess_image(str(path), 384, "pad")
    expected = _reference(Image.open(path).convert("RGB"), 384, "pad")
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def test_padding_uses_the_mean_colour():
    image = Image.new("RGB", (40, 10), (255, 0, 0))
    pixels = preprocess_image(image, 40, "pad")
    grey = np.float32(PAD_COLOUR[0]) / 255 * 2 - 1
    np.testing.assert_allclose(pixels[0], grey, atol=1e-6)  # the band above the image
    np.testing.assert_allclose(pixels[-1], grey, atol=1e-6)
    np.testing.assert_allclose(pixels[20, 5], [1.0, -1.0, -1.0], atol=1e-6)


def test_array_and_pil_inputs_agree_with_bytes():
    image = _odd_images()["wide"]
    from_bytes = preprocess_image(_png(image), S)
    np.testing.assert_array_equal(preprocess_image(image, S), from_bytes)
    np.testing.assert_array_equal(preprocess_image(np.asarray(image), S), from_bytes)


def test_truncated_jpeg_names_the_file(tmp_path):
    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    _random_rgb(rng, 64, 48).save(buf, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(BadImageError, match="cut.jpg") as info:
        preprocess_image(str(path), S)
    assert info.value.kind == "bad_image" and "truncated" in str(info.value)


def test_not_an_image_names_the_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is text, not pixels")
    with pytest.raises(BadImageError, match="notes.png") as info:
        load_image(str(path))
    assert info.value.kind == "bad_image"
    assert "BytesIO" not in str(info.value)  # PIL's message names its in-memory buffer; ours names the file


def test_missing_file(tmp_path):
    with pytest.raises(BadImageError, match="nothing_here.jpg") as info:
        load_image(str(tmp_path / "nothing_here.jpg"))
    assert info.value.kind == "missing_image"


def test_float_pixels_are_refused():
    with pytest.raises(BadImageError, match="mode F"):
        load_image(Image.fromarray(np.zeros((4, 4), np.float32)), name="float.tif")


def test_unknown_aspect():
    with pytest.raises(ValueError, match="aspect"):
        preprocess_image(Image.new("RGB", (4, 4)), S, "crop")
