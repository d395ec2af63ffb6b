"""The train step: one `jax.jit` over a device Mesh with a 'data' axis.

Parameters, frozen statistics and optimizer state are replicated; the batch is sharded along its
leading axis. The loss is normalized over the global batch inside the program, so XLA inserts
the cross-device reductions and gradients come out averaged; the same code runs on 1 CPU, 8
GPUs or a TPU pod slice. No pmap.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


# optax.global_norm is deprecated (a warning per trace) in favour of optax.tree.norm (optax 0.2.5).
_global_norm = getattr(getattr(optax, 'tree', None), 'norm', None) or optax.global_norm


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray          # int32 scalar: updates attempted (skipped ones included)
    params: Any                # 'params' collection (float32)
    frozen: Any                # 'frozen' collection (FrozenBN statistics), never updated
    opt_state: Any
    rng: jax.Array             # base key; step keys are fold_in(rng, step)
    skipped: jnp.ndarray       # int32 scalar: updates skipped for non-finite loss/gradients

    @property
    def variables(self) -> dict:
        v = {'params': self.params}
        if self.frozen:
            v['frozen'] = self.frozen
        return v


def create_state(variables: dict, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=variables.get('frozen', {}),
                      opt_state=tx.init(params), rng=rng, skipped=jnp.zeros((), jnp.int32))


def place_state(state: TrainState, mesh: Mesh) -> TrainState:
    """Replicate a host/single-device state on the mesh, so the first step hits the same compiled
    program as later ones (their inputs carry the mesh sharding).

    The placed state never shares a buffer with the caller's arrays: the train step donates its
    state, and device_put reuses an array already on the mesh's first device (even with
    may_alias=False when placing onto several devices, jax 0.10), so the first step would delete
    the caller's `variables` or PRNG key. Arrays go through a host copy first."""
    def host_copy(x):
        if isinstance(x, jax.Array) and not jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return np.array(x)      # np.array copies (np.asarray may be a view of the buffer)
        return x
    return jax.device_put(jax.tree_util.tree_map(host_copy, state), replicated(mesh))


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all (global) devices, axis 'data'."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devices.reshape(-1), ('data',))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P('data'))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, mesh: Mesh,
                    frozen: Any = None, xla_options: Optional[dict] = None) -> Callable:
    """(state, batch) -> (state, metrics), jitted with explicit shardings; state is donated.

    loss_fn(variables, batch, key) -> (total, aux) as training/losses.make_loss_fn returns.
    A non-finite loss or gradient leaves params and optimizer state unchanged and increments
    `skipped`; training goes on with the next batch.
    frozen: optional pytree of Python bools over params (optimizer.frozen_param_mask): those
    gradients are replaced by zeros before anything reads them, so XLA never computes them (the
    stem and res2 backward of a torchvision-style R50, about a fifth of its backward), and the
    finiteness check and `grad_norm` cover the trained parameters only.
    xla_options: XLA compiler options of the step; None: `compiler_options(mesh)`, {}: XLA's
    defaults.
    """
    def step(state: TrainState, batch: dict):
        key = jax.random.fold_in(state.rng, state.step)

        def objective(params):
            v = {'params': params}
            if state.frozen:
                v['frozen'] = state.frozen
            return loss_fn(v, batch, key)

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        if frozen is not None:
            grads = jax.tree_util.tree_map(lambda g, f: jnp.zeros_like(g) if f else g, grads, frozen)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.all(jnp.asarray(
            [jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)]))
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        params = jax.tree_util.tree_map(keep, params, state.params)
        opt_state = jax.tree_util.tree_map(keep, opt_state, state.opt_state)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  skipped=state.skipped + (~finite).astype(jnp.int32))
        metrics = {'loss': loss, **aux['losses'],
                   **{k: v for k, v in aux.items() if k != 'losses'},
                   'grad_norm': _global_norm(grads), 'finite': finite.astype(jnp.float32)}
        return new_state, metrics

    rep = replicated(mesh)
    data = batch_sharding(mesh)
    return jax.jit(step, in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=(0,),
                   compiler_options=compiler_options(mesh) if xla_options is None else xla_options)


def compiler_options(mesh: Mesh) -> Optional[dict]:
    """XLA options for the train step on `mesh`'s platform.

    XLA:CPU: the memory-optimized scheduler. The default one orders the step so that independent
    ops can run concurrently, and on a few cores two convolutions then share the cores and each
    other's caches: the R50-FPN step (batch 2, 800x1216, 2 cores) takes 23.7 s and 10.2 GB peak
    RSS with it, 22.2 s and 6.3 GB with the memory-optimized order (docs/performance.md, change
    11). Other platforms keep their defaults.
    """
    if all(d.platform == 'cpu' for d in mesh.devices.flat):
        return {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}
    return None


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Host-local numpy batch -> global jax.Arrays sharded on 'data'.

    Single process: a plain device_put with the batch sharding. Multi-process: each host passes
    its own slice and jax.make_array_from_process_local_data assembles the global batch.
    """
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
