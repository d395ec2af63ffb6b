"""The command line on a tiny model: convert, eval, predict, export; and their bad inputs."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from PIL import Image

from mrcnn_jax import cli
from mrcnn_jax.config import load_config
from mrcnn_jax.model_dir import save_model_dir
from mrcnn_jax.models.mask_rcnn import build_model

TINY = 'configs/tiny_test.py'


@pytest.fixture(scope='module')
def tiny_model_dir(tmp_path_factory):
    """A model directory with random weights of the tiny config, on a small synthetic dataset."""
    root = tmp_path_factory.mktemp('cli')
    cfg = load_config(TINY, [f'data.synthetic_dir={root / "data"}', 'data.synthetic_num_val=4',
                             'model.roi.score_thresh=0.0'])
    model = build_model(cfg.model)
    images = np.zeros((1, 128, 128, 3), np.float32)
    info = np.asarray([[128, 128, 128, 128, 1, 1]], np.float32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), images, info)
    meta = {'label_ids': [0, 1, 2, 3, 4], 'class_names': ['__background__', 'circle', 'square', 'triangle', 'star']}
    save_model_dir(root / 'model', cfg, jax.device_get(variables), meta)
    return root


def _images(tmp_path, n=3):
    rs = np.random.RandomState(0)
    paths = []
    for i in range(n):
        p = tmp_path / f'img{i}.png'
        Image.fromarray(rs.randint(0, 255, (96 + 16 * i, 128, 3), np.uint8)).save(p)
        paths.append(p)
    return paths


def test_predict_writes_overlays_and_json_and_skips_bad_files(tiny_model_dir, tmp_path, capsys):
    imgs = _images(tmp_path)
    (tmp_path / 'notes.txt').write_text('not an image')
    (tmp_path / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 truncated')
    out = tmp_path / 'out'
    rc = cli.main(['predict', *map(str, imgs), str(tmp_path / 'notes.txt'), str(tmp_path / 'broken.jpg'),
                   '--checkpoint', str(tiny_model_dir / 'model'), '--out', str(out), '--score-threshold', '0.0'])
    assert rc == 0
    text = capsys.readouterr()
    assert 'skipped 2 unreadable file(s)' in text.out
    for p in imgs:
        overlay = Image.open(out / f'{p.stem}.png')
        assert overlay.size == Image.open(p).size
        record = json.loads((out / f'{p.stem}.json').read_text())
        assert record['height'] == Image.open(p).height
        assert record['instances'], 'score threshold 0 keeps every valid detection'
        inst = record['instances'][0]
        assert set(inst) == {'box', 'score', 'label', 'name', 'mask'}
        assert inst['name'] in ('circle', 'square', 'triangle', 'star')
        assert inst['mask']['size'] == [record['height'], record['width']]


def test_predict_empty_folder_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    (tmp_path / 'empty').mkdir()
    rc = cli.main(['predict', str(tmp_path / 'empty'), '--checkpoint', str(tiny_model_dir / 'model'),
                   '--out', str(tmp_path / 'o')])
    assert rc == 1
    assert 'no images given' in capsys.readouterr().err


def test_eval_on_synthetic_split(tiny_model_dir, tmp_path):
    out = tmp_path / 'eval'
    rc = cli.main(['eval', '--checkpoint', str(tiny_model_dir / 'model'), '--out', str(out)])
    assert rc == 0
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['num_images'] == 4 and metrics['skipped'] == 0
    for t in ('bbox', 'segm'):
        assert 0.0 <= metrics[t]['AP'] <= 1.0
    results = json.loads((out / 'results.json').read_text())
    assert results and all('segmentation' in r for r in results)


def test_export_reload_gives_identical_outputs(tiny_model_dir, tmp_path):
    from mrcnn_jax.export import load_exported
    from mrcnn_jax.predictor import Predictor

    out = tmp_path / 'exported'
    assert cli.main(['export', '--checkpoint', str(tiny_model_dir / 'model'), '--out', str(out),
                     '--batch-size', '2']) == 0
    f = load_exported(out)
    assert f.spec['batch_size'] == 2 and f.spec['canvas'] == [128, 128]
    p = Predictor.from_checkpoint(tiny_model_dir / 'model')
    rs = np.random.RandomState(1)
    images = rs.randn(2, 128, 128, 3).astype(np.float32)
    info = np.asarray([[100, 128, 100, 128, 1, 1], [128, 96, 128, 96, 1, 1]], np.float32)
    live = p.predict_batch(images, info)
    exported = jax.tree_util.tree_map(np.asarray, f(images, info))
    assert set(live) == set(exported)
    for k in live:
        np.testing.assert_array_equal(exported[k], live[k], err_msg=k)


def test_checkpoint_of_another_config_names_the_mismatch(tiny_model_dir, tmp_path):
    from mrcnn_jax.model_dir import CheckpointMismatchError
    with pytest.raises(CheckpointMismatchError, match='fpn'):
        cli.load_predictor(tiny_model_dir / 'model', TINY, ['--config.model.fpn.channels=48'])


def test_unknown_override_is_an_error():
    with pytest.raises(KeyError, match='trian'):
        load_config(TINY, ['trian.steps=3'])


def test_benchmark_help_is_the_benchmarks_own(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(['benchmark', '--help'])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert '--throughput-batch' in out and '--only' in out
