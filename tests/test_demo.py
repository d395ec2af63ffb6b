"""`make demo` (mrcnn_jax/demo.py) end to end on a shortened schedule: dataset generation,
training, held-out COCO evaluation, overlays, and what it prints along the way."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_demo_runs_end_to_end_on_a_short_schedule(tmp_path):
    workdir = tmp_path / 'demo'
    # LLVM -O0: the demo's programs compile in about half the time; what is checked here (the
    # stages, their output, AP within [0, 1]) does not depend on code generation.
    env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_backend_optimization_level=0')
    p = subprocess.run(
        [sys.executable, '-m', 'mrcnn_jax.cli', 'demo', '--workdir', str(workdir),
         '--config.train.steps=4', '--config.train.checkpoint_every=4',
         '--config.data.synthetic_num_train=16', '--config.data.synthetic_num_val=6'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out = p.stdout
    assert p.returncode == 0, out[-3000:] + p.stderr[-3000:]
    for stage in ('1/4 synthetic shapes dataset', '2/4 training shapes_demo.py', '3/4 evaluation',
                  '4/4 overlays'):
        assert f'=== {stage}' in out, out[-3000:]
    assert re.search(r'^step 4/4 \| loss ', out, re.M), out[-3000:]
    assert 'Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]' in out
    m = re.search(r'held-out COCO AP: box ([0-9.]+), mask ([0-9.]+)', out)
    assert m and 0.0 <= float(m.group(1)) <= 1.0 and 0.0 <= float(m.group(2)) <= 1.0, out[-2000:]
    metrics = json.loads((workdir / 'eval' / 'metrics.json').read_text())
    assert abs(metrics['segm']['AP'] - float(m.group(2))) < 1e-3

    overlays = pathlib.Path(re.search(r'^overlays: (.+)$', out, re.M).group(1))
    assert overlays == workdir / 'overlays'
    pngs = sorted(overlays.glob('*.png'))
    assert len(pngs) == 6                     # every held-out image (the demo draws up to 8)
    with Image.open(pngs[0]) as im:
        assert im.size == (256, 256) and im.mode == 'RGB'
    assert (workdir / 'model').is_dir() and (workdir / 'data' / 'val').exists()


def test_keypoint_demo_stages_with_a_stand_in_model(tmp_path, monkeypatch, capsys):
    """`mrcnn-jax demo --task keypoints` (`make demo-keypoints`): its dataset, config, keypoint
    evaluation, skeleton overlays and summary, with training and the model replaced by a
    stand-in that predicts the ground truth (tests/keypoint_fakes.py), so no compilation: the
    model's own path is the Predictor's and the training loop's (their tests)."""
    import numpy as np
    from keypoint_fakes import GroundTruthPredictor

    from mrcnn_jax import cli, predictor
    from mrcnn_jax.data import synthetic
    from mrcnn_jax.training import loop

    trained = {}

    def fake_train(cfg, workdir):
        trained.update(config=cfg, workdir=workdir)

    def fake_checkpoint(path, cfg, **kwargs):
        return GroundTruthPredictor(cfg, synthetic.ensure_synthetic(cfg)['val'][0])
    monkeypatch.setattr(loop, 'train', fake_train)
    monkeypatch.setattr(predictor.Predictor, 'from_checkpoint', staticmethod(fake_checkpoint))
    workdir = tmp_path / 'kp'
    assert cli.main(['demo', '--task', 'keypoints', '--workdir', str(workdir),
                     '--config.data.synthetic_num_train=2', '--config.data.synthetic_num_val=3']) == 0
    out = capsys.readouterr().out
    for stage in ('1/4 synthetic keypoint figures dataset', '2/4 training keypoints_tiny.py',
                  '3/4 evaluation', '4/4 overlays'):
        assert f'=== {stage}' in out, out[-3000:]
    cfg = trained['config']
    assert cfg.model.keypoint_on and not cfg.model.mask_on and cfg.data.synthetic_task == 'keypoints'
    assert 'IoU metric: keypoints' in out
    assert re.search(r'held-out COCO AP: box 1\.000, keypoints 1\.000', out), out[-2000:]
    pngs = sorted((workdir / 'overlays').glob('*.png'))
    assert len(pngs) == 3
    drawn = np.asarray(Image.open(pngs[0])).astype(int)
    plain = np.asarray(Image.open(workdir / 'data' / 'val' / pngs[0].name)).astype(int)
    assert drawn.shape == (256, 256, 3) and (drawn != plain).any(axis=-1).mean() > 0.01
