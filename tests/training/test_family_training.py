"""C4 (res5 per RoI), Cascade R-CNN and Keypoint R-CNN train through the usual `mrcnn-jax train`,
on the tiny CPU configs `configs/tiny_test_c4.py`, `configs/tiny_test_cascade.py` (synthetic
shapes) and `configs/keypoints_test.py` (synthetic stick figures, 13 keypoints): each run logs its
own loss terms (Cascade: one classifier and one box loss per stage; keypoints: loss_keypoint and
no mask), keeps them finite, moves every trainable part of the RoI heads (res5 in C4, each cascade
stage, the keypoint head), writes a checkpoint, and the trained model directory predicts with its
architecture's outputs (14 x 14 masks in C4, keypoints). Losses against the references on the same
weights are in test_detectron2_loss_parity.py and test_loss_parity.py.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import train_helpers as th

STEPS = 6
CONFIGS = {'c4': th.REPO / 'configs' / 'tiny_test_c4.py', 'cascade': th.REPO / 'configs' / 'tiny_test_cascade.py',
           'keypoints': th.REPO / 'configs' / 'keypoints_test.py'}
LINE = re.compile(r'^step (\d+)/\d+ \| (loss [^|]*)\|', re.M)


@pytest.fixture(scope='module', params=list(CONFIGS))
def trained(request, tmp_path_factory):
    cache, data = th.shared_dirs(tmp_path_factory)
    if request.param == 'keypoints':     # its own synthetic dataset (the shared one is the shapes')
        data = tmp_path_factory.mktemp('synthetic_keypoints')
    workdir = tmp_path_factory.mktemp(f'train_{request.param}')
    p = th.run(['-m', 'mrcnn_jax.cli', 'train', '--config', str(CONFIGS[request.param]), '--workdir', str(workdir),
                *th.cli_overrides(data, f'train.steps={STEPS}', f'train.checkpoint_every={STEPS}',
                                  'train.log_every=1')],
               th.subprocess_env(cache), timeout=900)
    assert p.returncode == 0, th.tail(p)
    return request.param, workdir, p.stdout, data


def _terms(text: str) -> dict[str, float]:
    return {k: float(v) for k, v in re.findall(r'(\w+) ([-0-9.e+naif]+)', text)}


def test_train_logs_each_architectures_losses(trained):
    kind, _, out, _ = trained
    steps = {int(m.group(1)): _terms(m.group(2)) for m in LINE.finditer(out)}
    assert sorted(steps) == list(range(1, STEPS + 1)), out[-2000:]
    # the progress line names each term without its 'loss_' prefix
    expected = {'loss', 'objectness', 'rpn_box_reg', 'keypoint' if kind == 'keypoints' else 'mask'}
    if kind == 'cascade':
        expected |= {f'{t}_stage{k}' for k in range(3) for t in ('classifier', 'box_reg')}
    else:
        expected |= {'classifier', 'box_reg'}
    for step, terms in steps.items():
        assert set(terms) == expected, (step, sorted(terms))
        assert all(np.isfinite(v) for v in terms.values()), (step, terms)


def test_trained_heads_moved_and_the_model_dir_predicts(trained):
    import jax

    from mrcnn_jax import Predictor
    from mrcnn_jax.config import load_config
    from mrcnn_jax.models.mask_rcnn import build_model
    from mrcnn_jax.training.loop import init_variables

    kind, workdir, _, data = trained
    p = Predictor.from_checkpoint(workdir / 'model')
    cfg = load_config(CONFIGS[kind], th.overrides(data))      # the run's model, and its initial variables
    init = init_variables(build_model(cfg.model), cfg, jax.random.PRNGKey(cfg.seed))
    flat = jax.tree_util.tree_leaves_with_path
    trained_heads = {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat(p.variables['params']['roi_heads'])}
    init_heads = {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat(init['params']['roi_heads'])}
    assert trained_heads.keys() == init_heads.keys()
    parts = {'c4': ['res5', 'box_predictor', 'mask_head'],
             'cascade': [f'box_heads_{k}' for k in range(3)] + [f'box_predictors_{k}' for k in range(3)] + ['mask_head'],
             'keypoints': ['box_head', 'box_predictor', 'keypoint_head']}[kind]
    for part in parts:
        keys = [k for k in trained_heads if k.startswith(f"['{part}']")]
        assert keys, part
        assert any(not np.array_equal(trained_heads[k], init_heads[k]) for k in keys), f'{part} did not train'
    image = np.random.default_rng(0).integers(0, 255, (120, 128, 3), np.uint8)
    out = p(image)
    if kind == 'keypoints':
        n = len(out['boxes'])
        assert 'masks' not in out and out['keypoints'].shape == (n, 13, 3) and out['keypoints_scores'].shape == (n, 13)
        meta = json.loads((workdir / 'model' / 'metadata.json').read_text())   # what `predict` draws
        assert meta['keypoint_names'][:2] == ['head', 'left_shoulder'] and meta['keypoint_skeleton']
        return
    m = 14 if kind == 'c4' else 28
    assert out['masks'].shape[1:] == (120, 128) and p.config.model.roi.mask_resolution == m
    assert p.config.model.roi.heads == ('res5' if kind == 'c4' else 'cascade')
