"""Orbax checkpoints of the whole training state, with exact resume.

A checkpoint at step s holds the TrainState (params, FrozenBN statistics, optimizer state, step,
PRNG key, skipped-step count) and the input-pipeline position (JSON; the same global position
for every host). Saves are asynchronous; restore places arrays straight into the target
shardings.

"Resume" (this module: same workdir, everything restored) is separate from "initialize from
weights" (`init_variables_from`: a converted model directory or a backbone only).
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

DATA_KEY = 'data'      # the input pipeline's position (JSON), written by the primary host


class Checkpointer:
    """Thin wrapper over ocp.CheckpointManager for TrainState + data-iterator state."""

    def __init__(self, directory, *, max_to_keep: int = 3, save_every: int = 1000, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        cm = ocp.checkpoint_managers
        # Every `save_every` steps (and on a preemption signal), but not orbax's default extra
        # save of the first step: `checkpoint_every=N` means steps N, 2N, ...
        policy = cm.AnySavePolicy([cm.FixedIntervalPolicy(max(int(save_every), 1)),
                                   cm.PreemptionCheckpointingPolicy()])
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_decision_policy=policy,
            enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict | None = None, *, force: bool = False) -> bool:
        """Saves when `step` is on the save interval (or force). Returns whether a save started."""
        args = {'state': ocp.args.StandardSave(state)}
        if data_state is not None:
            # One item for all hosts: orbax writes JSON items from the primary host only, so a
            # per-host name ('data_1') would silently never reach the disk. The pipeline's
            # position is global (the step; pipeline.py), so host 0's state resumes every host.
            args[DATA_KEY] = ocp.args.JsonSave(data_state)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, target_state: Any, step: int | None = None) -> tuple[Any, dict | None, int]:
        """Restore into the structure/shardings of `target_state` (arrays or ShapeDtypeStructs
        with shardings). Returns (state, the data-pipeline state or None, step)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f'no checkpoint in {self.directory}')
        _check_layout(self.directory / str(step))
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target_state)
        items = {'state': ocp.args.StandardRestore(abstract)}
        if (self.directory / str(step) / DATA_KEY).exists():
            items[DATA_KEY] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out['state'], out[DATA_KEY] if DATA_KEY in items else None, step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _check_layout(step_dir: pathlib.Path) -> None:
    """A training checkpoint written before the RoI heads were grouped under 'roi_heads' (box and
    mask heads at the top of the params) cannot resume into today's state: say so, and how to
    go on, instead of orbax's tree-mismatch error."""
    meta = step_dir / 'state' / '_METADATA'
    if not meta.exists():
        return
    text = meta.read_text()
    if "('params', 'box_head'," in text:
        raise ValueError(
            f'{step_dir} was written by an earlier mrcnn_jax whose variables had box_head/mask_head at '
            'the top level; it cannot resume with this version. Initialize from its weights instead: '
            'train in a new workdir with --config.train.init_from=<old workdir>/model (model '
            'directories are migrated on load), or finish the run with the version that started it.')
