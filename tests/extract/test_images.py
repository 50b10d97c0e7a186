import numpy as np
import pytest
import torch
from PIL import Image

from lare2.extract.images import IMAGENET_MEAN, IMAGENET_STD, ImageError, backbone_input, decode_rgb, lare_input
from tests.helpers.bad_images import GALLERY, exif_rotated, palette_alpha, sixteen_bit


@pytest.mark.parametrize("name", sorted(GALLERY))
def test_gallery_is_decoded_or_refused_with_its_reason(name):
    data, expected = GALLERY[name]
    if expected == "ok":
        image = decode_rgb(data)
        assert image.mode == "RGB" and min(image.size) >= 8
    else:
        with pytest.raises(ImageError, match=expected):
            decode_rgb(data)


def test_exif_orientation_is_applied():
    image = decode_rgb(exif_rotated())
    assert image.size == (20, 40)  # rotated from 40x20
    array = np.asarray(image)
    assert array[:20, :, 0].mean() > 200 and array[25:, :, 0].mean() < 60  # red half now on top


def test_sixteen_bit_is_scaled_not_clipped():
    array = np.asarray(decode_rgb(sixteen_bit()))[..., 0]
    assert array[0, 0] == 0 and array[0, -1] == 255
    assert 120 < array[0, 16] < 136  # mid-ramp stays mid-grey (clipping would give 255)


def test_palette_alpha_keeps_its_colours():
    array = np.asarray(decode_rgb(palette_alpha()))
    assert tuple(array[16, 16]) == (255, 0, 0) and tuple(array[0, 0]) == (0, 0, 0)


def test_bomb_limit_is_configurable():
    from tests.helpers.bad_images import decompression_bomb

    pillow_limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match="decompression bomb.*limit of 1000"):
        decode_rgb(decompression_bomb(side=40), max_pixels=1000)
    assert Image.MAX_IMAGE_PIXELS == pillow_limit  # the process-wide setting is left as found


def test_lare_input_is_bicubic_256_in_minus1_1():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    x = lare_input(image, 256)
    expected = np.asarray(image.resize((256, 256), Image.BICUBIC), dtype=np.float32) / 255.0
    assert x.shape == (3, 256, 256) and x.dtype == torch.float32
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), (expected - 0.5) * 2, atol=1e-6)


def test_backbone_input_pads_reflect101_then_centre_crops():
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, (100, 300, 3), dtype=np.uint8)  # short height, long width
    x = backbone_input(Image.fromarray(array)).permute(1, 2, 0).numpy()
    unnorm = x * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)
    # height padded 62 above / 62 below with reflect-101: padded row r maps to source |r - 62|
    # (mirror without repeating the edge); width centre-cropped from column 38.
    for padded_row, source_row in ((62, 0), (61, 1), (0, 62), (161, 99), (162, 98)):
        np.testing.assert_allclose(unnorm[padded_row], array[source_row, 38:262] / 255.0, atol=1e-5)
