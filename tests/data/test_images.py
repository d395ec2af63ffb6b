"""Bad and unusual image files: corrupt, truncated, grayscale, RGBA, CMYK, 16-bit, palette, EXIF."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mrcnn_jax.data import images, transforms


def _photo(h=48, w=64) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 4, y * 5, (x + y) * 2], -1).clip(0, 255).astype(np.uint8)


def _save(tmp_path, name, image: Image.Image, **kw) -> str:
    path = str(tmp_path / name)
    image.save(path, **kw)
    return path


def _tf_decode(encoded: images.EncodedImage) -> np.ndarray:
    return transforms.decode_image(tf.constant(encoded.data)).numpy()   # the pipeline's decode


def test_corrupt_file_names_the_file(tmp_path):
    path = tmp_path / 'junk.jpg'
    path.write_bytes(b'\xff\xd8\xff\xe0 this is not a jpeg' * 10)
    with pytest.raises(images.ImageDecodeError, match='junk.jpg'):
        images.encode_for_record(str(path))
    with pytest.raises(images.ImageDecodeError, match='junk.jpg'):
        images.load_image(str(path))


def test_truncated_jpeg_is_refused(tmp_path):
    good = _save(tmp_path, 'good.jpg', Image.fromarray(_photo(200, 300)), quality=90)
    data = open(good, 'rb').read()
    path = tmp_path / 'truncated.jpg'
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(images.ImageDecodeError, match='truncated.jpg'):
        images.encode_for_record(str(path))


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        images.encode_for_record(str(tmp_path / 'nope.jpg'))


def test_plain_rgb_and_grayscale_jpeg_keep_their_bytes(tmp_path):
    rgb = _save(tmp_path, 'rgb.jpg', Image.fromarray(_photo()), quality=95)
    gray = _save(tmp_path, 'gray.jpg', Image.fromarray(_photo()[..., 0]), quality=95)
    for path in (rgb, gray):
        enc = images.encode_for_record(path)
        assert not enc.reencoded and enc.data == open(path, 'rb').read()
        assert (enc.height, enc.width) == (48, 64)
        decoded = _tf_decode(enc)
        assert decoded.shape == (48, 64, 3)
        # the pipeline (TF) and evaluation (PIL) decode to identical pixels
        np.testing.assert_array_equal(decoded, images.load_image(path))
    assert (_tf_decode(images.encode_for_record(gray))[..., 0]
            == _tf_decode(images.encode_for_record(gray))[..., 2]).all()


def test_rgba_png_drops_alpha(tmp_path):
    rgba = np.concatenate([_photo(), np.full((48, 64, 1), 7, np.uint8)], -1)
    path = _save(tmp_path, 'rgba.png', Image.fromarray(rgba, 'RGBA'))
    enc = images.encode_for_record(path)
    assert enc.reencoded and enc.format == 'png'
    np.testing.assert_array_equal(_tf_decode(enc), _photo())
    np.testing.assert_array_equal(images.load_image(path), _photo())


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = _save(tmp_path, 'cmyk.jpg', Image.fromarray(_photo()).convert('CMYK'), quality=95)
    assert Image.open(path).mode == 'CMYK'
    enc = images.encode_for_record(path)
    assert enc.reencoded and enc.format == 'jpeg'
    decoded = _tf_decode(enc)
    assert decoded.shape == (48, 64, 3)
    assert np.abs(decoded.astype(int) - _photo().astype(int)).mean() < 4


def test_16bit_png_scales_to_8bit(tmp_path):
    values = np.asarray([[0, 257, 257 * 100], [65535, 257 * 200, 128]], np.uint16)
    path = str(tmp_path / 'deep.png')
    Image.fromarray(values).save(path)       # mode I;16
    assert open(path, 'rb').read()[24] == 16  # really a 16-bit PNG
    enc = images.encode_for_record(path)
    assert enc.reencoded
    expected = np.asarray([[0, 1, 100], [255, 200, 0]], np.uint8)
    np.testing.assert_array_equal(_tf_decode(enc)[..., 0], expected)
    np.testing.assert_array_equal(images.load_image(path)[..., 1], expected)


def test_palette_png_becomes_rgb(tmp_path):
    path = _save(tmp_path, 'pal.png', Image.fromarray(_photo()).quantize(16))
    enc = images.encode_for_record(path)
    assert enc.reencoded
    np.testing.assert_array_equal(_tf_decode(enc), images.load_image(path))


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:10, :10] = 255                      # a white mark at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6                            # 6: rotate 90° clockwise to display upright
    path = _save(tmp_path, 'rotated.jpg', Image.fromarray(pixels), exif=exif, quality=95)
    enc = images.encode_for_record(path)
    assert enc.reencoded and (enc.height, enc.width) == (60, 40)
    upright = _tf_decode(enc)
    assert upright.shape == (60, 40, 3)
    assert upright[:8, -8:].mean() > 200 and upright[-8:, :8].mean() < 50   # mark now top-right
    np.testing.assert_array_equal(images.load_image(path).shape, (60, 40, 3))
