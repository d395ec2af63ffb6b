"""mrcnn_jax.ops.anchors against torchvision's AnchorGenerator and Detectron2's
DefaultAnchorGenerator (its formula written out below).

torchvision's anchors depend on the padded batch size (stride = padded // feature size, so P6 of
an 800-px side has 13 cells of stride 61); ours are computed from `pad_hw` on a larger static
canvas and must equal torchvision's on the cells torchvision has, with exactly those cells valid.
"""

import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from mrcnn_jax.models.conventions import DETECTRON2, TORCHVISION
from mrcnn_jax.ops import anchors as anchor_ops

torch = pytest.importorskip('torch')
pytest.importorskip('torchvision')
from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: E402
from torchvision.models.detection.image_list import ImageList  # noqa: E402

SIZES = (32, 64, 128, 256, 512)
RATIOS = (0.5, 1.0, 2.0)
LEVELS = (2, 3, 4, 5, 6)


def _grid(n, level):
    for _ in range(level):
        n = (n + 1) // 2
    return n


def _torchvision_anchors(padded_hw):
    """torchvision's per-level anchors [H_l * W_l * A, 4] for a batch tensor of padded_hw."""
    gen = AnchorGenerator(tuple((s,) for s in SIZES), (RATIOS,) * len(SIZES))
    h, w = padded_hw
    grids = [(_grid(h, l), _grid(w, l)) for l in LEVELS]
    feats = [torch.zeros(1, 1, gh, gw) for gh, gw in grids]
    images = ImageList(torch.zeros(1, 3, h, w), [(h, w)])
    allanchors = gen(images, feats)[0].numpy()
    counts = [gh * gw * len(RATIOS) for gh, gw in grids]
    return np.split(allanchors, np.cumsum(counts)[:-1]), grids


# (padded h, padded w): 800 x 1216 has the P6 stride quirk in h (13 cells, stride 61);
# 480 = 15 x 32, 352 = 11 x 32, 608 = 19 x 32 are odd multiples of 32 too; 256 x 512 is regular.
def level_anchors(grid, base, level, pad_hw, conventions):
    """anchor_ops.level_anchors under jit (as the model runs it; eagerly, every op would compile
    separately for every grid shape), as numpy."""
    fn = jax.jit(lambda p: anchor_ops.level_anchors(grid, base, level, p, conventions.anchor_strides))
    return tuple(np.asarray(x) for x in fn(pad_hw))


PADDED = [(800, 1216), (480, 640), (352, 608), (256, 512), (1344, 800)]


def test_p6_stride_quirk_is_real():
    """Guard the premise: torchvision's P6 stride for an 800-px side is 61, not 64."""
    levels, grids = _torchvision_anchors((800, 1216))
    assert grids[-1] == (13, 19)
    a = levels[-1].reshape(13, 19, 3, 4)
    assert a[1, 0, 0, 1] - a[0, 0, 0, 1] == 800 // 13 == 61
    assert a[0, 1, 0, 0] - a[0, 0, 0, 0] == 1216 // 19 == 64


def test_cell_anchors_torchvision_rounded():
    gen = AnchorGenerator(tuple((s,) for s in SIZES), (RATIOS,) * len(SIZES))
    for size, theirs in zip(SIZES, gen.cell_anchors):
        ours = TORCHVISION.cell_anchors(size, RATIOS)
        np.testing.assert_array_equal(ours, theirs.numpy())
        assert np.all(ours == np.round(ours))


@pytest.mark.parametrize('padded', PADDED)
def test_torchvision_anchors_on_larger_canvas(padded):
    canvas = (1344, 1344)
    tv_levels, tv_grids = _torchvision_anchors(padded)
    other = (256, 320)   # a second image in the batch with another padded size
    other_levels, other_grids = _torchvision_anchors(other)
    pad_hw = jnp.asarray([padded, other], jnp.int32)
    for i, level in enumerate(LEVELS):
        grid = (_grid(canvas[0], level), _grid(canvas[1], level))
        base = TORCHVISION.cell_anchors(SIZES[i], RATIOS)
        anchors, valid = level_anchors(grid, base, level, pad_hw, TORCHVISION)
        anchors = np.asarray(anchors).reshape(2, grid[0], grid[1], 3, 4)
        valid = np.asarray(valid).reshape(2, grid[0], grid[1], 3)
        for b, (ref, (gh, gw)) in enumerate([(tv_levels[i], tv_grids[i]), (other_levels[i], other_grids[i])]):
            np.testing.assert_array_equal(anchors[b, :gh, :gw].reshape(-1, 4), ref,
                                          err_msg=f'image {b} level P{level}')
            expect = np.zeros(grid, bool)
            expect[:gh, :gw] = True
            assert (valid[b] == expect[..., None]).all(), f'image {b} level P{level} valid mask'


def test_torchvision_anchors_canvas_equal_to_padding():
    """With the canvas equal to the padded size every cell is valid and all anchors match."""
    padded = (800, 1216)
    tv_levels, tv_grids = _torchvision_anchors(padded)
    for i, level in enumerate(LEVELS):
        base = TORCHVISION.cell_anchors(SIZES[i], RATIOS)
        anchors, valid = level_anchors(tv_grids[i], base, level,
                                                  jnp.asarray([padded], jnp.int32), TORCHVISION)
        np.testing.assert_array_equal(np.asarray(anchors)[0], tv_levels[i])
        assert np.asarray(valid).all()


def _detectron2_cell_anchors(size, ratios):
    """DefaultAnchorGenerator.generate_cell_anchors: exact (float64 maths, float32 tensor)."""
    out = []
    area = size ** 2.0
    for ar in ratios:
        w = math.sqrt(area / ar)
        h = ar * w
        out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(out)   # float32, as torch.tensor of Python floats


def _detectron2_grid_anchors(grid_hw, stride, cell, offset=0.0):
    """DefaultAnchorGenerator._grid_anchors / _create_grid_offsets."""
    gh, gw = grid_hw
    shifts_x = torch.arange(offset * stride, gw * stride, step=stride, dtype=torch.float32)
    shifts_y = torch.arange(offset * stride, gh * stride, step=stride, dtype=torch.float32)
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing='ij')
    shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
    shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
    return (shifts.view(-1, 1, 4) + cell.view(1, -1, 4)).reshape(-1, 4).numpy()


def test_cell_anchors_detectron2_exact():
    for size in SIZES:
        ours = DETECTRON2.cell_anchors(size, RATIOS)
        theirs = _detectron2_cell_anchors(size, RATIOS).numpy()
        np.testing.assert_array_equal(ours, theirs)
    # Not rounded: the 0.5-ratio anchor of size 32 is 45.25 px wide.
    assert DETECTRON2.cell_anchors(32, RATIOS)[0, 2] != np.round(
        DETECTRON2.cell_anchors(32, RATIOS)[0, 2])


@pytest.mark.parametrize('padded', [(800, 1216), (480, 640)])
def test_detectron2_anchors(padded):
    canvas = (832, 1344)
    for i, level in enumerate(LEVELS):
        stride = 2 ** level
        base = DETECTRON2.cell_anchors(SIZES[i], RATIOS)
        cell = _detectron2_cell_anchors(SIZES[i], RATIOS)
        grid = (_grid(canvas[0], level), _grid(canvas[1], level))
        # Whole canvas (pad_hw None): nominal strides, all valid.
        anchors, valid = level_anchors(grid, base, level, None, DETECTRON2)
        np.testing.assert_array_equal(np.asarray(anchors)[0], _detectron2_grid_anchors(grid, stride, cell))
        assert np.asarray(valid).all()
        # Per image: fixed stride 2^level (no P6 quirk), valid on the image's padded grid.
        anchors, valid = level_anchors(grid, base, level, jnp.asarray([padded], jnp.int32),
                                                  DETECTRON2)
        gh, gw = _grid(padded[0], level), _grid(padded[1], level)
        a = np.asarray(anchors).reshape(grid[0], grid[1], 3, 4)
        np.testing.assert_array_equal(a[:gh, :gw].reshape(-1, 4),
                                      _detectron2_grid_anchors((gh, gw), stride, cell))
        v = np.asarray(valid).reshape(grid[0], grid[1], 3)
        assert v[:gh, :gw].all() and v.sum() == gh * gw * 3


def test_level_grid_size():
    n = jnp.asarray([800, 1216, 480, 32, 33])
    np.testing.assert_array_equal(np.asarray(anchor_ops.level_grid_size(n, 6)), [13, 19, 8, 1, 1])
    np.testing.assert_array_equal(np.asarray(anchor_ops.level_grid_size(n, 2)), [200, 304, 120, 8, 9])
