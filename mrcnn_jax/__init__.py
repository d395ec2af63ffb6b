"""mrcnn_jax: Mask R-CNN and its family in JAX + Flax, static shapes for XLA."""

__version__ = '0.1.0'


def __getattr__(name):
    # Lazy so that `import mrcnn_jax.ops.boxes` does not pull in the model and its dependencies.
    if name == 'Predictor':
        from mrcnn_jax.predictor import Predictor
        return Predictor
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
