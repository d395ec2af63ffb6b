"""Shared fixtures.

torch must be imported before tensorflow: with torch's triton installed, importing tensorflow
first segfaults the process. Importing it here, before any test module, fixes the order.
"""

import os
import pathlib

try:
    import torch  # noqa: F401  (import order matters, see above)
    import torchvision  # noqa: F401
except ImportError:  # the parity tests skip themselves when torch is absent
    pass

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

REPO = pathlib.Path(__file__).resolve().parents[1]
# Many tests compile the same small programs (the tiny model's inference and train step), in
# this process and in subprocesses: a persistent compilation cache shared by all of them turns
# repeated multi-second XLA compiles into cache reads. Set before jax is imported (subprocesses
# inherit it through the environment).
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(REPO / '.pytest_cache' / 'jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '1')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import pytest

# Under CI=true a skip fails the run (tests/ci_skips.py).
pytest_plugins = ['ci_skips']

SHARED_DATA = REPO.parent / 'shared' / 'data'

# `make test` runs the suite on two pytest-xdist workers, one test file per worker at a time
# (`--dist loadfile`: a file's module fixtures, e.g. a calibrated reference model, are built once).
# Files are handed out in collection order, so the longest go first (measured on 2 CPU cores,
# most expensive first) and the short ones fill in at the end instead of one long file running
# alone.
LONGEST_FIRST = (
    'tests/models/test_detectron2_parity.py',
    'tests/training/test_detectron2_loss_parity.py',
    'tests/training/test_multihost.py',
    'tests/training/test_resume.py',
    'tests/training/test_multidevice.py',
    # after test_resume, not beside it: its step programs are test_resume's, from the compilation
    # cache the workers share (tests/training/train_helpers.py: shared_dirs)
    'tests/models/test_torchvision_parity.py',
    'tests/training/test_train_step.py',
    # subprocess trainings: not beside test_multihost's two processes (measured: both slow down)
    'tests/training/test_family_training.py',
    'tests/models/test_torchvision_keypoint_parity.py',
    'tests/test_demo.py',
    'tests/training/test_losses.py',
    'tests/test_predictor.py',
    'tests/training/test_loss_parity.py',
    'tests/test_benchmark.py',
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def key(item):
        path = pathlib.Path(str(item.fspath)).resolve().relative_to(REPO).as_posix()
        return rank.get(path, len(rank))
    items.sort(key=key)   # stable: the order within a file, and of the other files, is kept


@pytest.fixture(scope='session')
def shared_data() -> pathlib.Path:
    """`../shared/data` (real COCO-format photos); tests using it skip with a reason when absent."""
    if not (SHARED_DATA / 'coco128_seg' / 'annotations.json').exists():
        pytest.skip(f'real-photo data not found at {SHARED_DATA}')
    return SHARED_DATA
