"""The `make demo` run: configs/shapes_tiny.py with a schedule that fits ~8 minutes on 2 cores.

The time budget (train.max_seconds) stops training early on a slower machine; the run then
saves, evaluates and draws as usual.
"""

from configs import shapes_tiny


def get_config():
    c = shapes_tiny.get_config()
    c.train.steps = 700                     # ~0.6-0.7 s/step on 2 cores
    c.train.warmup_steps = 50
    c.train.decay_steps = (600,)
    c.train.max_seconds = 480.0             # the training budget; the issue allows 10 min
    c.train.checkpoint_every = 100
    c.train.log_every = 25
    c.train.eval_every = 0                # the demo evaluates once, after training
    return c
