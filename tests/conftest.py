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

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'


@pytest.fixture(scope='session')
def shared_data() -> pathlib.Path:
    """`../shared/data` (real COCO-format photos); tests using it skip with a reason when absent."""
    if not (SHARED_DATA / 'coco128_seg' / 'annotations.json').exists():
        pytest.skip(f'real-photo data not found at {SHARED_DATA}')
    return SHARED_DATA
