"""Reference computations shared by several test modules (one copy of each).

* `detectron2_resize_shape`: Detectron2's `ResizeShortestEdge.get_output_shape`. Detectron2's
  own source is vendored in ../shared/vendor/detectron2, but `detectron2.data.transforms` does
  not import here: it needs `fvcore` (and its package `__init__`s pull in more), which the test
  extras do not install. So the function is transcribed below, and
  `detectron2_source_function` lets a test check the transcription against the vendored source
  text whenever that is present (tests/test_preprocess.py does).
* `align_ties`: row matching of two score-sorted outputs that may only permute near-ties.
"""

from __future__ import annotations

import ast
import pathlib

import numpy as np

DETECTRON2_SOURCE = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'vendor' / 'detectron2'


def detectron2_resize_shape(oldh: int, oldw: int, short_edge_length: int, max_size: int) -> tuple[int, int]:
    """detectron2.data.transforms.ResizeShortestEdge.get_output_shape, verbatim arithmetic:
    scale the short side to `short_edge_length`, cap the long side at `max_size`, then round
    half up (`int(x + 0.5)`; torchvision floors instead)."""
    h, w = oldh, oldw
    size = short_edge_length * 1.0
    scale = size / min(h, w)
    if h < w:
        newh, neww = size, scale * w
    else:
        newh, neww = scale * h, size
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh = newh * scale
        neww = neww * scale
    neww = int(neww + 0.5)
    newh = int(newh + 0.5)
    return (newh, neww)


def detectron2_source_function(relative_path: str, qualname: str):
    """A pure function of Detectron2's vendored source, compiled from its text without importing
    its module (whose imports need packages we do not install); None when the source is absent.

    relative_path: e.g. 'detectron2/data/transforms/augmentation_impl.py';
    qualname: 'Class.method' or 'function'. Only for functions that use builtins alone.
    """
    path = DETECTRON2_SOURCE / relative_path
    if not path.exists():
        return None
    node = ast.parse(path.read_text())
    for name in qualname.split('.'):
        node = next(n for n in node.body
                    if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == name)
    node.decorator_list = []
    namespace = {'Tuple': tuple}   # typing names in its annotations
    exec(compile(ast.Module([node], type_ignores=[]), str(path), 'exec'), namespace)
    return namespace[node.name]


def align_ties(ours_scores, ref_scores, ours_boxes, ref_boxes, tie=1e-5, window=8) -> np.ndarray:
    """Index into the reference for each of our rows: the same position, except that rows whose
    scores agree within `tie` may be permuted among themselves (the reference's order of such
    near-ties is decided by float32 rounding, ours by XLA's); among such candidates the nearest
    box wins. Asserts that every row finds a partner within `window` positions."""
    n = len(ref_scores)
    assert len(ours_scores) == n, f'{len(ours_scores)} rows vs {n} in the reference'
    used = np.zeros(n, bool)
    perm = []
    for i in range(n):
        cands = [j for j in range(max(0, i - window), min(n, i + window + 1))
                 if not used[j] and abs(ref_scores[j] - ours_scores[i]) <= tie]
        assert cands, f'row {i}: score {ours_scores[i]:.7f} has no reference partner near position {i}'
        j = min(cands, key=lambda j: np.abs(ref_boxes[j] - ours_boxes[i]).max())
        used[j] = True
        perm.append(j)
    return np.asarray(perm, dtype=np.int64)
