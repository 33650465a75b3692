"""The one image decoding rule: every mode and depth ends as RGB uint8, bad files raise ImageDecodeError."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from testkit.synthetic import synthetic_xray
from cxr_transfer.extract.images import ImageDecodeError, read_rgb


def test_grey_jpeg_and_png_become_three_equal_channels(tmp_path: Path):
    grey = synthetic_xray(1, 64)
    Image.fromarray(grey).save(tmp_path / "a.png")
    Image.fromarray(grey).save(tmp_path / "a.jpg", quality=95)
    png = read_rgb(tmp_path / "a.png")
    assert png.shape == (64, 64, 3) and png.dtype == np.uint8
    assert np.array_equal(png[:, :, 0], grey) and np.array_equal(png[:, :, 0], png[:, :, 2])
    jpg = read_rgb(tmp_path / "a.jpg")
    assert np.abs(jpg[:, :, 0].astype(int) - grey).mean() < 3


def test_sixteen_bit_png_is_scaled_linearly(tmp_path: Path):
    values = np.array([[0, 65535], [32896, 257]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    rgb = read_rgb(tmp_path / "deep.png")
    assert rgb[:, :, 0].tolist() == [[0, 255], [128, 1]]


def test_rgba_is_composited_on_black(tmp_path: Path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0          # fully transparent -> black
    rgba[1, 1, 3] = 128        # half -> about 100
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    rgb = read_rgb(tmp_path / "alpha.png")
    assert rgb[0, 0].tolist() == [0, 0, 0]
    assert rgb[1, 1, 0] == round(200 * 128 / 255)
    assert rgb[2, 2].tolist() == [200, 200, 200]


def test_palette_with_and_without_transparency(tmp_path: Path):
    image = Image.fromarray(synthetic_xray(2, 16)).convert("P")
    image.save(tmp_path / "p.png")
    assert read_rgb(tmp_path / "p.png").shape == (16, 16, 3)
    image.info["transparency"] = 0
    image.save(tmp_path / "pt.png", transparency=0)
    assert read_rgb(tmp_path / "pt.png").shape == (16, 16, 3)


def test_exif_orientation_is_applied(tmp_path: Path):
    array = np.zeros((20, 40), np.uint8)
    array[:, :20] = 255                      # bright left half, landscape
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6                         # "rotate 90 CW to display"
    image.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    rgb = read_rgb(tmp_path / "rot.jpg")
    assert rgb.shape == (40, 20, 3)          # portrait after orientation
    assert rgb[:18, :, 0].mean() > 200 and rgb[22:, :, 0].mean() < 50


def test_resize_is_a_plain_stretch(tmp_path: Path):
    Image.fromarray(synthetic_xray(3, 100)).resize((100, 60)).save(tmp_path / "wide.png")
    assert read_rgb(tmp_path / "wide.png", 32).shape == (32, 32, 3)
    Image.fromarray(synthetic_xray(3, 20)).save(tmp_path / "small.png")
    assert read_rgb(tmp_path / "small.png", 64).shape == (64, 64, 3)


@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"])
def test_bad_files_raise_a_named_error(tmp_path: Path, content):
    path = tmp_path / "bad.jpg"
    if content == "truncated":
        Image.fromarray(synthetic_xray(4, 128)).save(path, quality=90)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match="bad.jpg"):
        read_rgb(path, 32)


def test_alpha_compositing_equals_the_rounded_real_quotient():
    from cxr_transfer.extract.images import _composite_on_black

    colour, alpha = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    rgba = np.stack([colour, colour, colour, alpha], axis=2).astype(np.uint8)
    expected = np.rint(rgba[:, :, :3].astype(np.float32) * (rgba[:, :, 3:4] / np.float32(255.0))).astype(np.uint8)
    assert np.array_equal(_composite_on_black(rgba), expected)


@pytest.mark.parametrize("shape,size", [((300, 200), 224), ((897, 1203), 224), ((448, 448), 224), ((90, 130), 224),
                                        ((331, 331), 299), ((1000, 37), 64)])
def test_grey_resized_then_copied_equals_three_channels_resized(shape, size):
    from cxr_transfer.extract.images import _as_rgb, resize_square

    grey = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    three = np.repeat(grey[:, :, None], 3, axis=2)
    assert np.array_equal(_as_rgb(resize_square(grey, size)), resize_square(three, size))


def test_opaque_rgba_keeps_its_colours():
    from cxr_transfer.extract.images import _composite_on_black

    rgba = np.random.default_rng(5).integers(0, 256, (7, 9, 4), dtype=np.uint8)
    rgba[:, :, 3] = 255
    assert np.array_equal(_composite_on_black(rgba), rgba[:, :, :3])
