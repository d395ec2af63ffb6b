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
