"""`mrcnn-jax data to-tfrecord | show` through main(argv)."""

import argparse
import os

import numpy as np
from PIL import Image

from mrcnn_jax.data import cli, tfrecord

from .helpers import make_bad_dataset


def test_add_subcommands_registers_both():
    parser = argparse.ArgumentParser()
    cli.add_subcommands(parser.add_subparsers(dest='cmd'))
    args = parser.parse_args(['to-tfrecord', '--annotations', 'a', '--images', 'i', '--out', 'o'])
    assert args.func is not None and args.shards == 8
    assert parser.parse_args(['show', '--config', 'c.py', '--out', 'o']).num == 8


def test_to_tfrecord_in_parallel_prints_a_summary(shared_data, tmp_path, capsys):
    d = shared_data / 'coco_train2017_tiny'
    out = tmp_path / 'records'
    code = cli.main(['to-tfrecord', '--annotations', str(d / 'annotations.json'), '--images',
                     str(d / 'images'), '--out', str(out), '--shards', '2', '--workers', '2',
                     '--prefix', 'tiny', '--quiet'])
    assert code == 0
    text = capsys.readouterr().out
    assert 'images in json: 6, written: 6, instances written: 136' in text
    assert 'skipped images: 0' in text and "tiny-*.tfrecord" in text
    records = tfrecord.open_tfrecords(str(out / 'tiny-*.tfrecord'))
    assert len(records.index) == 6


def test_to_tfrecord_strict_exits_with_the_reason(tmp_path, capsys):
    ann, images_dir, _ = make_bad_dataset(tmp_path / 'src')
    code = cli.main(['to-tfrecord', '--annotations', ann, '--images', images_dir, '--out',
                     str(tmp_path / 'out'), '--strict', '--workers', '0', '--quiet'])
    assert code == 1
    assert 'annotation id 900: category_id 42' in capsys.readouterr().err


def test_show_writes_annotated_pngs(synthetic_root, tmp_path):
    config_file = tmp_path / 'cfg.py'
    config_file.write_text(
        'from mrcnn_jax import config\n'
        'def get_config():\n'
        '    c = config.default_config()\n'
        "    c.data.source = 'synthetic'\n"
        f"    c.data.synthetic_dir = {synthetic_root!r}\n"
        '    c.data.synthetic_num_train, c.data.synthetic_num_val = 12, 5\n'
        '    c.data.synthetic_image_size = 128\n'
        '    c.model.num_classes = 5\n'
        '    return c\n')
    out = tmp_path / 'show'
    code = cli.main(['show', '--config', str(config_file), '--out', str(out), '--num', '3',
                     '--set', 'data.canvas=(160,160)', '--set', 'data.min_size=(128,)',
                     '--set', 'data.max_size=160', '--set', 'data.mask_size=28'])
    assert code == 0
    files = sorted(os.listdir(out))
    assert len(files) == 3 and all(f.startswith('train_step') for f in files)
    image = np.asarray(Image.open(out / files[0]))
    assert image.shape == (160, 160, 3)
    mean = np.round(np.asarray([0.485, 0.456, 0.406]) * 255)   # padding: 0 after normalizing
    assert np.abs(image[140:, 140:].reshape(-1, 3) - mean).max() <= 1
    assert image[:128, :128].std() > 20                  # the un-normalized picture
