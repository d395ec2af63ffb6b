"""JAX vs torchvision benchmarks on the same weights, images and machine (issue 6).

    python scripts/benchmark.py [--quick] [--only NAME[,NAME]] [--runs N] [--json PATH]

Same as `mrcnn-jax benchmark ...`; see mrcnn_jax/bench/cli.py for the cases and the output.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mrcnn_jax.bench.cli import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
