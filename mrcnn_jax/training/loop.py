"""The training loop: build mesh, model and data; restore or initialize; step; log; checkpoint.

Everything clever lives in pure functions it calls (losses.py, train_step.py). The loop:
  * resumes from the newest checkpoint in `workdir/checkpoints` (params, optimizer state, step,
    PRNG key and the data position), and says so; otherwise initializes, optionally from
    weights (`train.init_from`: a model directory such as `mrcnn-jax convert` writes);
  * prints a progress line every `train.log_every` steps (loss terms, lr, s/step, images/s,
    ETA) and writes TensorBoard scalars to `workdir/tb` when tensorboardX is installed;
  * saves asynchronously every `train.checkpoint_every` steps, keeps `train.keep_checkpoints`;
  * evaluates every `train.eval_every` steps when a validation split is configured;
  * writes `workdir/model/` (a model directory for Predictor.from_checkpoint / eval / export).
"""

from __future__ import annotations

import copy
import logging
import os
import pathlib
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from mrcnn_jax.models import mask_rcnn
from mrcnn_jax.models.mask_rcnn import build_model
from mrcnn_jax.training import losses, optimizer
from mrcnn_jax.training import train_step as ts
from mrcnn_jax.training.checkpoint import Checkpointer

log = logging.getLogger(__name__)

MODEL_KEYS = ('images', 'image_info', 'gt_boxes', 'gt_classes', 'gt_valid', 'gt_is_crowd', 'gt_masks',
              'gt_keypoints')
# Test hook: SIGKILL this process right after the given step (pending checkpoints finished first).
_KILL_ENV = 'MRCNN_JAX_SIGKILL_AFTER_STEP'


def _print(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


def initialize_distributed() -> None:
    """`jax.distributed.initialize()`, once, before any other JAX call of this process.

    TPU pod slices, Slurm and Open MPI are detected automatically. Elsewhere (e.g. GPU nodes
    started by hand, or several CPU processes on one machine) set on every process
    JAX_COORDINATOR_ADDRESS=host:port (process 0's address), JAX_NUM_PROCESSES and
    JAX_PROCESS_ID (0 .. N-1), optionally JAX_LOCAL_DEVICE_IDS. CPU processes use gloo
    collectives (jax's default `jax_cpu_collectives_implementation`).
    """
    # Not `jax.process_count() == 1`: asking it initializes the backend, after which
    # jax.distributed.initialize() refuses to run.
    if jax.distributed.is_initialized():
        return
    kwargs = {}
    if os.environ.get('JAX_NUM_PROCESSES'):
        kwargs['num_processes'] = int(os.environ['JAX_NUM_PROCESSES'])
    if os.environ.get('JAX_PROCESS_ID'):
        kwargs['process_id'] = int(os.environ['JAX_PROCESS_ID'])
    jax.distributed.initialize(**kwargs)


def sync_processes(name: str, timeout_s: int = 1800) -> None:
    """Barrier across all processes (a no-op with one) on the coordination service, not on a
    device collective (those have short timeouts on CPU)."""
    if jax.process_count() > 1:
        import orbax.checkpoint as ocp
        ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


def init_variables(model, cfg: ml_collections.ConfigDict, key: jax.Array) -> dict:
    """Random variables for the config's model, initialized on its training canvas."""
    return mask_rcnn.init_variables(model, key, _canvas(cfg))


def _canvas(cfg) -> tuple[int, int]:
    buckets = tuple(cfg.data.buckets)
    return tuple(buckets[0]) if buckets else tuple(cfg.data.canvas)


def _source_variables(p: pathlib.Path, model_cfg: ml_collections.ConfigDict | None):
    """(variables, model config) of a model directory, a torchvision .pth or a Detectron2
    checkpoint (.pkl, or a .pth of Detectron2's keys: converted for `model_cfg`'s architecture,
    with the checkpoint's own number of classes)."""
    from mrcnn_jax.convert import detectron2 as d2
    from mrcnn_jax.convert import torchvision as tv

    if p.suffix not in ('.pkl', '.pth', '.pt'):
        from mrcnn_jax.model_dir import load_model_dir
        cfg, variables, _ = load_model_dir(p)
        return variables, cfg.model
    sd = d2.load_checkpoint(p) if p.suffix == '.pkl' else tv.load_state_dict(str(p))
    if not any(k.startswith('backbone.bottom_up.') for k in sd):
        src_cfg = tv.model_config_from_state_dict(sd)
        return tv.convert_state_dict(sd, src_cfg), src_cfg
    if model_cfg is None:
        raise ValueError(f'{p}: a Detectron2 checkpoint initializes a model of the training config\'s '
                         'architecture; pass its model config')
    sd = d2.load_checkpoint(sd)
    src_cfg = copy.deepcopy(model_cfg)
    src_cfg.conventions.name = 'detectron2'     # what the checkpoint was trained under
    if 'roi_heads.box_predictor.cls_score.weight' in sd:
        src_cfg.num_classes = int(sd['roi_heads.box_predictor.cls_score.weight'].shape[0])
    src_cfg.mask_on = 'roi_heads.mask_head.predictor.weight' in sd
    return d2.convert_state_dict(sd, src_cfg), src_cfg


def load_initial_weights(variables: dict, path: str, backbone_only: bool = False,
                         model_cfg: ml_collections.ConfigDict | None = None) -> dict:
    """Copy weights from a model directory, a torchvision .pth or a Detectron2 checkpoint (.pkl
    or .pth; converted for `model_cfg`, the training config's model) into `variables`.

    Every array whose path and shape match is taken; the rest keeps its fresh initialization and
    is logged: arrays whose shape differs (the class rows of the box and mask predictors, when
    the number of classes changes) are named as re-initialized. A source whose conventions
    differ from `model_cfg`'s (e.g. Detectron2 weights in a torchvision-convention model) is
    warned about, since its features would not be the ones it was trained to produce.
    """
    from flax import traverse_util

    from mrcnn_jax.models.conventions import Conventions

    p = pathlib.Path(path)
    src, src_cfg = _source_variables(p, model_cfg)
    if model_cfg is not None:
        ours, theirs = Conventions.from_config(model_cfg.conventions), Conventions.from_config(src_cfg.conventions)
        differ = [f for f in ('stride_in_1x1', 'pixel_scale', 'channel_order', 'pixel_mean', 'pixel_std',
                              'roi_align_aligned', 'anchor_rounding', 'class_layout')
                  if getattr(ours, f) != getattr(theirs, f)]
        if differ:
            log.warning('%s was trained under %s conventions, the model uses %s: %s differ', path,
                        theirs.name, ours.name, ', '.join(differ))
    flat_dst = traverse_util.flatten_dict(variables)
    flat_src = traverse_util.flatten_dict(src)
    taken, reshaped, absent = [], [], []
    for k, v in flat_dst.items():
        if backbone_only and (len(k) < 2 or k[1] != 'backbone'):
            absent.append(k)
            continue
        s = flat_src.get(k)
        if s is not None and tuple(s.shape) == tuple(v.shape):
            flat_dst[k] = jnp.asarray(s, v.dtype)
            taken.append(k)
        elif s is not None:
            reshaped.append(k)
        else:
            absent.append(k)
    _print(f'initialized {len(taken)} arrays from {path}; {len(reshaped) + len(absent)} keep their fresh init'
           + (f' (e.g. {"/".join(absent[0])})' if absent else ''))
    if reshaped:
        classes = ''
        if model_cfg is not None and src_cfg.num_classes != model_cfg.num_classes:
            classes = (f' ({src_cfg.num_classes - 1} classes in the checkpoint, {model_cfg.num_classes - 1} '
                       'in the model)')
        _print(f're-initialized {len(reshaped)} arrays whose shape differs from the checkpoint\'s{classes}: '
               + ', '.join('/'.join(k[1:]) for k in reshaped))
    return traverse_util.unflatten_dict(flat_dst)


class TrainLoop:
    """State and helpers of one training run (see `train`)."""

    def __init__(self, cfg: ml_collections.ConfigDict, workdir):
        self.cfg = cfg
        self.workdir = pathlib.Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.model = build_model(cfg.model)
        self.mesh = ts.make_mesh()
        n_dev = self.mesh.devices.size
        if cfg.train.batch_size % n_dev:
            raise ValueError(f'train.batch_size={cfg.train.batch_size} must be a multiple of the '
                             f'{n_dev} devices')
        self.loss_fn = losses.make_loss_fn(self.model, losses.LossSettings.from_config(cfg.model))

    def build_state(self, key: jax.Array) -> tuple[ts.TrainState, Any]:
        variables = init_variables(self.model, self.cfg, key)
        if self.cfg.train.init_from:
            variables = load_initial_weights(variables, self.cfg.train.init_from,
                                             self.cfg.train.init_backbone_only, model_cfg=self.cfg.model)
        tx = optimizer.build_optimizer(self.cfg.train, variables['params'],
                                       self.cfg.model.backbone.frozen_stages)
        rng = jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), 1)
        return ts.place_state(ts.create_state(variables, tx, rng), self.mesh), tx


def train(cfg: ml_collections.ConfigDict, workdir, *, dataset=None, evaluate_fn: Callable | None = None,
          on_metrics: Callable | None = None) -> ts.TrainState:
    """Train `cfg` in `workdir` until cfg.train.steps, resuming if a checkpoint exists.

    dataset: an iterator of host-local batches with get_state/set_state (default: build_dataset).
    evaluate_fn(variables, step) -> dict: periodic evaluation (default: COCO eval of the val split
    when one is configured). on_metrics(step, metrics): a callback (tests, notebooks).
    """
    if cfg.distributed:
        initialize_distributed()
    t = cfg.train
    loop = TrainLoop(cfg, workdir)
    key = jax.random.PRNGKey(cfg.seed)
    state, tx = loop.build_state(key)
    frozen = optimizer.frozen_param_mask(state.params, cfg.model.backbone.frozen_stages)
    step_fn = ts.make_train_step(loop.loss_fn, tx, loop.mesh, frozen=frozen)

    if dataset is None:
        from mrcnn_jax.data import pipeline, synthetic
        if cfg.data.source == 'synthetic':
            synthetic.ensure_synthetic(cfg)
        dataset = pipeline.build_dataset(cfg, 'train')
    ckpt = Checkpointer(loop.workdir / 'checkpoints', max_to_keep=t.keep_checkpoints,
                        save_every=t.checkpoint_every)
    start = 0
    if ckpt.latest_step() is not None:
        state, data_state, start = ckpt.restore(state)
        if data_state is not None:
            dataset.set_state(data_state)
        _print(f'resuming from step {start} (checkpoint in {ckpt.directory})')
    else:
        _print(f'starting from scratch: {t.steps} steps, global batch {t.batch_size}, '
               f'{loop.mesh.devices.size} device(s) ({jax.devices()[0].platform})')
    if evaluate_fn is None and t.eval_every and (cfg.data.val_annotations or cfg.data.source == 'synthetic'):
        from mrcnn_jax.evaluation.inference import make_evaluate_fn
        evaluate_fn = make_evaluate_fn(cfg, loop.mesh if jax.process_count() == 1 else None)

    writer = _summary_writer(loop.workdir)
    schedule = optimizer.learning_rate_schedule(t)
    kill_after = int(os.environ.get(_KILL_ENV, '-1'))
    window_start, window_steps = time.time(), 0
    skipped_seen = int(jax.device_get(state.skipped))
    metrics = None
    t_begin = time.time()
    done = start
    for step in range(start, t.steps):
        batch = next(dataset)
        batch = ts.shard_batch({k: v for k, v in batch.items() if k in MODEL_KEYS}, loop.mesh)
        if step == start and jax.process_count() > 1:
            # Compile on every host, then start together: hosts finish compiling at different
            # times, and CPU (gloo) collectives give up after 30 s without their peers.
            step_fn.lower(state, batch).compile()
            sync_processes('mrcnn_jax_train_first_step')
        state, metrics = step_fn(state, batch)
        window_steps += 1
        done = step + 1
        if done % t.log_every == 0 or done == t.steps or done == start + 1:
            m = jax.device_get(metrics)
            elapsed = time.time() - window_start
            sps = elapsed / window_steps
            skipped = int(jax.device_get(state.skipped))
            # The schedule runs on the optimizer's own count, which skipped steps do not advance.
            _report(done, t.steps, m, float(schedule(max(step - skipped, 0))), sps, t.batch_size, writer,
                    first=done == start + 1)
            if skipped > skipped_seen:
                _print(f'WARNING: non-finite loss or gradients: {skipped - skipped_seen} update(s) '
                       f'skipped up to step {done} ({skipped} in total); training continues')
                skipped_seen = skipped
            if on_metrics is not None:
                on_metrics(done, m)
            window_start, window_steps = time.time(), 0
        ckpt.save(done, state, dataset.get_state())
        if evaluate_fn is not None and t.eval_every and done % t.eval_every == 0 and done < t.steps:
            _log_eval(evaluate_fn(state.variables, done), done, writer)
        if done == kill_after:
            ckpt.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        if t.max_seconds and time.time() - t_begin > t.max_seconds and done < t.steps:
            _print(f'time budget of {t.max_seconds:.0f} s reached at step {done}/{t.steps}: saving; '
                   f'run the same command again to continue')
            break
    if done > start and ckpt.latest_step() != done:
        ckpt.save(done, state, dataset.get_state(), force=True)
    ckpt.close()
    export_model_dir(cfg, state, loop.workdir / 'model', dataset)
    if evaluate_fn is not None and done > start:
        _log_eval(evaluate_fn(state.variables, done), done, writer)
    if writer is not None:
        writer.close()
    return state


def export_model_dir(cfg, state: ts.TrainState, path, dataset=None) -> pathlib.Path:
    """Write the trained variables as a model directory (config + metadata + variables)."""
    from mrcnn_jax.model_dir import save_model_dir
    meta = {'source': 'mrcnn_jax.train', 'step': int(jax.device_get(state.step))}
    md = getattr(dataset, 'metadata', None) or {}
    if 'category_ids' in md:
        meta['label_ids'] = [0] + [int(c) for c in md['category_ids']]
        names = md.get('category_names') or [str(c) for c in md['category_ids']]
        meta['class_names'] = ['__background__'] + list(names)
    if cfg.model.keypoint_on:   # what `predict` draws the skeleton with
        for key in ('keypoint_names', 'keypoint_skeleton'):
            if md.get(key):
                meta[key] = [list(v) if isinstance(v, (list, tuple)) else v for v in md[key]]
    variables = jax.device_get(state.variables)
    # Every process calls it: orbax's save is collective (barriers; the primary host writes),
    # so a process-0-only call waits forever for the others.
    save_model_dir(path, cfg, variables, meta)
    return pathlib.Path(path)


def _summary_writer(workdir: pathlib.Path):
    if jax.process_index() != 0:
        return None
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(workdir / 'tb'))


def _fmt_num(x: float) -> str:
    """Rates and durations from 0.001 to 1e5 with ~3 significant digits, never in e-notation
    (a slow step printed as '0.0 img/s' or a fast one as '0.00 s/step' says nothing)."""
    return f'{x:.0f}' if x >= 100 else f'{x:.1f}' if x >= 10 else f'{x:.2f}' if x >= 1 else f'{x:.3f}'


def _report(done: int, total: int, m: dict, lr: float, sps: float, batch: int, writer,
            first: bool = False) -> None:
    terms = ' '.join(f'{k.replace("loss_", "")} {float(v):.4f}' for k, v in m.items() if k.startswith('loss_'))
    eta = _fmt_time((total - done) * sps)
    _print(f'step {done}/{total} | loss {float(m["loss"]):.4f} ({terms}) | lr {lr:.5g} | '
           f'{_fmt_num(sps)} s/step | {_fmt_num(batch / max(sps, 1e-9))} img/s | ETA {eta}'
           + (' (first step: includes compilation)' if first else ''))
    if writer is not None:
        for k, v in m.items():
            writer.add_scalar(f'train/{k}', float(v), done)
        writer.add_scalar('train/lr', lr, done)
        writer.add_scalar('train/steps_per_s', 1.0 / max(sps, 1e-9), done)


def _log_eval(result: dict, step: int, writer) -> None:
    if not result:
        return
    flat = {f'{t}/{k}': v for t, d in result.items() if isinstance(d, dict) for k, v in d.items()}
    _print(f'eval at step {step}: ' + ', '.join(f'{k} {v:.4f}' for k, v in flat.items() if k.endswith('/AP')))
    if writer is not None:
        for k, v in flat.items():
            writer.add_scalar(f'eval/{k}', float(v), step)
