"""COCO instances json + images → sharded TFRecords (same as `mrcnn-jax data to-tfrecord`).

    python scripts/coco_to_tfrecord.py --annotations instances_train2017.json \
        --images train2017/ --out tfrecords/ --shards 64 [--strict] [--workers N]
"""

import sys

from mrcnn_jax.data.cli import main

if __name__ == '__main__':  # the guard matters: encoding workers are spawned processes
    sys.exit(main(['to-tfrecord', *sys.argv[1:]]))
