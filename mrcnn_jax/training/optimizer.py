"""optax optimizer: SGD with momentum, weight decay, linear warmup then step decay.

Same update as torch.optim.SGD(lr, momentum, weight_decay) in torchvision's detection reference:
g += wd * p; buf = momentum * buf + g; p -= lr * buf. Frozen parameters (the stem and early
stages, per `model.backbone.frozen_stages`) get no update at all (no decay either); FrozenBN
statistics are not parameters. Non-finite steps are skipped by the train step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util


def learning_rate_schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
    """base_lr x linear warmup from warmup_factor over warmup_steps x decay_factor per milestone
    (torch LinearLR(start_factor, total_iters) then MultiStepLR)."""
    base = t.base_lr
    warm_steps = int(t.warmup_steps)
    warm_factor = float(t.warmup_factor)
    milestones = jnp.asarray(sorted(t.decay_steps) or [2 ** 30], jnp.int32)
    decay = float(t.decay_factor)

    def schedule(step):
        step = jnp.asarray(step, jnp.int32)
        alpha = jnp.minimum(step.astype(jnp.float32) / max(warm_steps, 1), 1.0)
        warm = jnp.where(step < warm_steps, warm_factor + (1.0 - warm_factor) * alpha, 1.0)
        n = jnp.sum(step >= milestones)
        return base * warm * decay ** n.astype(jnp.float32)
    return schedule


def frozen_param_mask(params: Any, frozen_stages: int) -> Any:
    """Pytree of bools, True for parameters that must not change."""
    prefixes = []
    if frozen_stages >= 1:
        prefixes.append(('backbone', 'conv1'))
        prefixes.append(('backbone', 'bn1'))
    for k in range(1, frozen_stages):
        prefixes.append(('backbone', f'layer{k}_'))

    def is_frozen(path):
        for p in prefixes:
            if path[0] == p[0] and len(path) > 1 and (path[1] == p[1] or
                                                       (p[1].endswith('_') and path[1].startswith(p[1]))):
                return True
        return False
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: is_frozen(k) for k in flat})


def decay_mask(params: Any, decay_norm_and_bias: bool) -> Any:
    """True where weight decay applies: every parameter, or kernels only."""
    flat = traverse_util.flatten_dict(params)
    if decay_norm_and_bias:
        return traverse_util.unflatten_dict({k: True for k in flat})
    return traverse_util.unflatten_dict({k: k[-1].endswith('kernel') for k in flat})


def build_optimizer(t: ml_collections.ConfigDict, params: Any, frozen_stages: int) -> optax.GradientTransformation:
    """The optimizer for `params` (pytree of the 'params' collection)."""
    chain = []
    if t.clip_norm and t.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(t.clip_norm))
    if t.weight_decay:
        chain.append(optax.add_decayed_weights(t.weight_decay, mask=decay_mask(params, t.weight_decay_norm_and_bias)))
    chain.append(optax.sgd(learning_rate_schedule(t), momentum=t.momentum or None))
    inner = optax.chain(*chain)
    frozen = frozen_param_mask(params, frozen_stages)
    labels = jax.tree_util.tree_map(lambda f: 'frozen' if f else 'train', frozen)
    return optax.multi_transform({'train': inner, 'frozen': optax.set_to_zero()}, labels)
