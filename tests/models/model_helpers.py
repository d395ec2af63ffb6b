"""Helpers shared by the model tests: random variables without running init."""

import flax
import jax
import jax.numpy as jnp
import numpy as np


def random_variables(module, *args, seed=0, **kwargs):
    """Random variables of the right structure without running init (eval_shape + numpy):
    He-normal kernels, small biases, frozen-BN / GroupNorm statistics around (1, 0)."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = str(getattr(path[-1], 'key', path[-1]))
        if name.endswith('kernel'):
            return jnp.asarray(rng.normal(0, np.sqrt(2.0 / np.prod(s.shape[:-1])), s.shape), jnp.float32)
        if name in ('weight', 'scale', 'running_var'):
            return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), jnp.float32)
        return jnp.asarray(rng.normal(0, 0.1, s.shape), jnp.float32)   # biases, running means
    return jax.tree_util.tree_map_with_path(fill, shapes)


def flat(tree):
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')
