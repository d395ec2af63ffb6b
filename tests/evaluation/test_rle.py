"""COCO RLE of masks (evaluation/rle.py): both paths equal pycocotools' encoding of the pasted mask."""

import numpy as np
import pytest

pytest.importorskip('pycocotools')
# pycocotools 2.0.x with numpy 2 warns on every decode.
pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')
from pycocotools import mask as mask_util  # noqa: E402

from mrcnn_jax.evaluation.rle import encode_rle, paste_masks_to_rle  # noqa: E402
from mrcnn_jax.ops.paste import paste_masks  # noqa: E402


def test_rle_paths_equal_encoding_the_full_mask():
    rng = np.random.default_rng(5)
    image_hw = (45, 66)
    masks = rng.random((19, 28, 28), dtype=np.float32)
    # Sub-pixel to larger than the image, many crossing its border.
    corner = rng.uniform(-0.3, 1.1, (19, 2)) * np.array([66, 45])
    boxes = np.concatenate([corner, corner + rng.uniform(0.5, 80, (19, 2))], axis=1).astype(np.float32)
    binary = paste_masks(masks, boxes, image_hw) > 0.5
    assert binary.any(axis=(1, 2)).sum() > 10
    want = [mask_util.encode(np.asfortranarray(m.astype(np.uint8))) for m in binary]
    for rle in want:
        rle['counts'] = rle['counts'].decode('ascii')
    assert paste_masks_to_rle(masks, boxes, image_hw, chunk_size=4) == want
    assert encode_rle(binary, chunk_size=3) == want
    assert encode_rle(paste_masks(masks, boxes, image_hw)) == want  # float input: > 0.5
    assert all(isinstance(r['counts'], str) and r['size'] == list(image_hw) for r in want)
    np.testing.assert_array_equal(mask_util.decode(want).transpose(2, 0, 1), binary)


def test_empty():
    assert paste_masks_to_rle(np.zeros((0, 28, 28)), np.zeros((0, 4)), (5, 6)) == []
