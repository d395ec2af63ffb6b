"""The CLI's persistent compilation cache: a second `mrcnn-jax predict` on the same model and
image sizes reads its programs from the cache instead of compiling them; `--no-compile-cache`
and MRCNN_JAX_COMPILATION_CACHE=0 turn it off."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]

# Runs the CLI in-process and reports JAX's compile events (backend compiles and cache hits).
WORKER = r'''
import json, sys
import jax
from jax import monitoring
events = {'compile_s': 0.0, 'compiles': 0, 'cache_hits': 0}
def on_duration(event, duration, **kw):
    if event == '/jax/core/compile/backend_compile_duration':
        events['compiles'] += 1
        events['compile_s'] += duration
def on_event(event, **kw):
    if event == '/jax/compilation_cache/cache_hits':
        events['cache_hits'] += 1
monitoring.register_event_duration_secs_listener(on_duration)
monitoring.register_event_listener(on_event)
from mrcnn_jax import cli
rc = cli.main(sys.argv[1:])
print('EVENTS ' + json.dumps(events))
sys.exit(rc)
'''


@pytest.fixture(scope='module')
def tiny_model(tmp_path_factory):
    import jax

    from mrcnn_jax.config import load_config
    from mrcnn_jax.model_dir import save_model_dir
    from mrcnn_jax.models.mask_rcnn import build_model, init_variables

    root = tmp_path_factory.mktemp('cache')
    cfg = load_config(REPO / 'configs' / 'tiny_test.py')
    variables = init_variables(build_model(cfg.model), jax.random.PRNGKey(0), (64, 64))
    save_model_dir(root / 'model', cfg, jax.device_get(variables), {'source': 'test'})
    rng = np.random.default_rng(0)
    (root / 'images').mkdir()
    for i, hw in enumerate(((100, 120), (90, 128))):
        Image.fromarray(rng.integers(0, 255, hw + (3,), np.uint8)).save(root / 'images' / f'{i}.png')
    return root


def _predict(root, cache, *flags):
    env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_COMPILATION_CACHE')
           and k not in ('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', 'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES')}
    env.update(MRCNN_JAX_COMPILATION_CACHE=str(cache), JAX_PLATFORMS='cpu')
    proc = subprocess.run([sys.executable, '-c', WORKER, *flags, 'predict', str(root / 'images'),
                           '--checkpoint', str(root / 'model'), '--out', str(root / 'out')],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith('EVENTS ')][-1]
    return json.loads(line[len('EVENTS '):]), proc


def test_second_predict_reads_compiled_programs_from_the_cache(tiny_model):
    cache = tiny_model / 'jax_cache'
    first, proc = _predict(tiny_model, cache)
    entries = sorted(p.name for p in cache.iterdir())
    assert first['cache_hits'] == 0 and first['compiles'] >= 3 and len(entries) >= 3
    second, _ = _predict(tiny_model, cache)
    # Every program comes from the cache (the CLI keeps programs of any compile time).
    assert second['cache_hits'] >= first['compiles'] and len(entries) >= first['compiles']
    assert second['compile_s'] < 0.2 * first['compile_s'], (first, second)
    assert sorted(p.name for p in cache.iterdir()) == entries
    # And no TensorFlow/absl start-up lines in what the user sees.
    assert 'absl::InitializeLog' not in proc.stderr and 'oneDNN' not in proc.stderr


CHECK = r'''
import json, sys
import jax
from mrcnn_jax import cli
args = cli.build_parser().parse_args(sys.argv[1:])
print(json.dumps({'dir': cli.enable_compilation_cache(args.no_compile_cache),
                  'jax': jax.config.jax_compilation_cache_dir}))
'''


@pytest.mark.parametrize('before, after, setting, expected', [
    ((), (), 'DIR', 'DIR'), (('--no-compile-cache',), (), 'DIR', None), ((), ('--no-compile-cache',), 'DIR', None),
    ((), (), '0', None), ((), (), 'true', 'DEFAULT'), ((), (), '', 'DEFAULT')])
def test_cache_folder_and_turning_it_off(tmp_path, before, after, setting, expected):
    env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_COMPILATION_CACHE')}
    env['MRCNN_JAX_COMPILATION_CACHE'] = str(tmp_path / 'c') if setting == 'DIR' else setting
    env['XDG_CACHE_HOME'] = str(tmp_path / 'xdg')
    check = CHECK.replace('args.no_compile_cache', 'args.no_cache_first or args.no_compile_cache')
    proc = subprocess.run([sys.executable, '-c', check, *before, 'export', '--checkpoint', 'x', '--out', 'y', *after],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {'DIR': str(tmp_path / 'c'), 'DEFAULT': str(tmp_path / 'xdg' / 'mrcnn_jax' / 'jax_cache'),
                None: None}[expected]
    assert out['dir'] == expected and out['jax'] == expected
