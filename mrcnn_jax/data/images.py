"""Image files → RGB uint8 arrays, or → bytes that `tf.io.decode_image(channels=3)` decodes right.

Photos in the wild are not all 8-bit RGB JPEGs. Everything is opened with PIL and fully decoded
(so truncated or corrupt files fail here, with the file name, not mid-epoch in TensorFlow), then:
    * EXIF orientation is applied (annotations are taken to be in the upright frame);
    * CMYK, palette, YCbCr, ... → RGB; RGBA / LA → alpha dropped (torchvision's read_image(RGB));
    * 16-bit → 8-bit by value / 257 (65535 → 255), not PIL's clipping `convert('L')`;
    * grayscale stays one channel in the file; `decode_image(channels=3)` replicates it.
A file TensorFlow already decodes to the same pixels (8-bit RGB or gray JPEG/PNG, no rotation) is
kept as its original bytes; anything else is re-encoded: JPEG sources as JPEG quality 95 (they were
lossy already), others as PNG.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, ImageOps

from mrcnn_jax.data import files
from mrcnn_jax.data.validation import DataError

_EXIF_ORIENTATION = 0x0112
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


class ImageDecodeError(DataError):
    """A file that is not a decodable image (corrupt, truncated, unknown format)."""


@dataclasses.dataclass(frozen=True)
class EncodedImage:
    data: bytes          # JPEG or PNG bytes, 8-bit, upright, 1 or 3 channels
    format: str          # 'jpeg' | 'png'
    height: int          # upright size
    width: int
    reencoded: bool      # False: the file's original bytes


def _open_fully(data: bytes, path: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()     # decodes every pixel: raises on truncated or corrupt data
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        raise ImageDecodeError(f'{path}: cannot decode image ({type(e).__name__}: {e})') from e
    return image


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a broken EXIF block is not worth refusing the pixels for
        return 1


def _png_is_plain_8bit(data: bytes) -> bool:
    # IHDR follows the signature: length(4) 'IHDR'(4) width(4) height(4) bit_depth(1) colour_type(1)
    if not data.startswith(_PNG_SIGNATURE) or len(data) < 26:
        return False
    bit_depth, colour_type = data[24], data[25]
    return bit_depth == 8 and colour_type in (0, 2)      # gray or RGB, no alpha, no palette


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """PIL image of any mode → [H, W, 3] uint8 RGB (see module docstring for the conversions)."""
    if image.mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I'):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith('I;16') or values.max(initial=0) > 255:
            values = values / 257.0      # 16-bit range → 8-bit; 65535 → 255
        gray = np.clip(np.round(values), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if image.mode == 'F':
        gray = np.clip(np.round(np.asarray(image)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if image.mode == 'P' and 'transparency' in image.info:
        image = image.convert('RGBA')
    if image.mode != 'RGB':
        image = image.convert('RGB')     # drops alpha; CMYK/YCbCr/LAB/HSV/1/L/LA → RGB
    return np.asarray(image, dtype=np.uint8)


def decode_image_bytes(data: bytes, name: str = '<bytes>') -> np.ndarray:
    """Encoded image → [H, W, 3] uint8 RGB, upright (EXIF applied). Raises ImageDecodeError."""
    image = _open_fully(data, name)
    if _orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    return to_rgb_array(image)


def load_image(path: str) -> np.ndarray:
    """Image file → [H, W, 3] uint8 RGB, upright. Raises ImageDecodeError / FileNotFoundError."""
    return decode_image_bytes(files.read_bytes(path), path)


def encode_for_record(path: str) -> EncodedImage:
    """Image file → bytes for a record (original bytes when TensorFlow decodes them as-is).

    Raises FileNotFoundError for a missing file and ImageDecodeError for an undecodable one.
    """
    data = files.read_bytes(path)
    image = _open_fully(data, path)
    orientation = _orientation(image)
    fmt = (image.format or '').upper()
    plain = orientation == 1 and (
        (fmt == 'JPEG' and image.mode in ('RGB', 'L'))
        or (fmt == 'PNG' and image.mode in ('RGB', 'L') and _png_is_plain_8bit(data)))
    if plain:
        return EncodedImage(data, 'jpeg' if fmt == 'JPEG' else 'png', image.height, image.width,
                            reencoded=False)
    if orientation != 1:
        image = ImageOps.exif_transpose(image)
    pixels = to_rgb_array(image)
    out = io.BytesIO()
    if fmt == 'JPEG':
        Image.fromarray(pixels).save(out, format='JPEG', quality=95, subsampling=0)
        out_format = 'jpeg'
    else:
        Image.fromarray(pixels).save(out, format='PNG', compress_level=1)
        out_format = 'png'
    return EncodedImage(out.getvalue(), out_format, pixels.shape[0], pixels.shape[1],
                        reencoded=True)
