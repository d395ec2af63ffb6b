"""Serialize the inference function with `jax.export` (StableHLO) at a fixed canvas and batch.

```
OUT/model.stablehlo   jax.export serialization of  f(variables, images, image_info) -> outputs
OUT/export.json       canvas, batch size, platforms, input/output description
OUT/config.json, OUT/metadata.json, OUT/variables/   the model directory (weights stay data)
```
Weights are an argument rather than constants baked into the program: the serialized program
stays small, and the same weights serve the live model and the exported one.

```python
f = load_exported('OUT')                    # callable(images [B,H,W,3], image_info [B,6])
out = f(images, image_info)                 # same dict as MaskRCNN.__call__
```
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import export as jax_export

log = logging.getLogger(__name__)

DEFAULT_PLATFORMS = ('cpu', 'cuda', 'tpu')


def export_predictor(predictor, out_dir, *, batch_size: int = 2, canvas: tuple[int, int] | None = None,
                     platforms: Sequence[str] | None = None) -> pathlib.Path:
    """Export predictor.model's inference at `canvas` (default: its largest bucket) for `batch_size`
    images. Lowered for every platform in `platforms` that lowering supports here."""
    from mrcnn_jax.model_dir import save_model_dir

    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    canvas = tuple(canvas or max(predictor.buckets, key=lambda b: (b[0] * b[1], b)))
    out = pathlib.Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    variables = predictor.variables
    var_specs = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)
    img_spec = jax.ShapeDtypeStruct((batch_size, canvas[0], canvas[1], 3), jnp.float32)
    info_spec = jax.ShapeDtypeStruct((batch_size, 6), jnp.float32)
    fn = jax.jit(predictor.model.apply)
    requested = tuple(platforms or DEFAULT_PLATFORMS)
    exported, used = None, requested
    try:
        exported = jax_export.export(fn, platforms=requested)(var_specs, img_spec, info_spec)
    except Exception as e:  # noqa: BLE001 - some jaxlib builds cannot lower for every platform
        used = (jax.default_backend(),)
        log.warning('lowering for %s failed (%s); exporting for %s only', requested, e, used)
        exported = jax_export.export(fn, platforms=used)(var_specs, img_spec, info_spec)
    (out / 'model.stablehlo').write_bytes(exported.serialize())
    meta = {'label_ids': [int(x) for x in predictor.label_ids], 'class_names': list(predictor.class_names),
            'label_space': predictor.label_space,
            'source': 'mrcnn_jax.export'}
    save_model_dir(out, predictor.config, jax.device_get(variables), meta)
    (out / 'export.json').write_text(json.dumps({
        'canvas': list(canvas), 'batch_size': batch_size, 'platforms': list(used),
        'inputs': {'images': f'float32[{batch_size},{canvas[0]},{canvas[1]},3] normalized, image top-left',
                   'image_info': f'float32[{batch_size},6] (orig_h, orig_w, resized_h, resized_w, '
                                 'scale_h, scale_w)'},
        'outputs': {k: f'{v.dtype}{list(v.shape)}' for k, v in _out_desc(exported).items()},
    }, indent=2))
    return out


def _out_desc(exported) -> dict[str, Any]:
    return dict(jax.tree_util.tree_unflatten(exported.out_tree, exported.out_avals))


def load_exported(path) -> Callable[[Any, Any], dict]:
    """Deserialize OUT/model.stablehlo and its weights; returns f(images, image_info) -> outputs.

    The weights are taken as saved, in the layout the serialized program was traced with (an
    export from before the RoI heads were grouped keeps its flat variables)."""
    from mrcnn_jax.model_dir import restore_variables

    path = pathlib.Path(path)
    exported = jax_export.deserialize(bytearray((path / 'model.stablehlo').read_bytes()))
    variables = jax.tree_util.tree_map(jnp.asarray, restore_variables(path))

    def f(images, image_info):
        return exported.call(variables, jnp.asarray(images, jnp.float32), jnp.asarray(image_info, jnp.float32))
    f.exported = exported
    f.spec = json.loads((path / 'export.json').read_text())
    return f
