"""Re-export of mrcnn_jax.testing.torchvision_reference (shared with the benchmarks)."""

from mrcnn_jax.testing.torchvision_reference import *  # noqa: F401,F403
from mrcnn_jax.testing.torchvision_reference import (  # noqa: F401
    build_torchvision_maskrcnn, image_to_tensor, run_stages, state_dict_numpy)
