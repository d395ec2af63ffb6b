"""A self-describing model directory: what `mrcnn-jax convert` writes and `Predictor.from_checkpoint`
reads.

```
DIR/config.json      the full ConfigDict (model, data, train, eval sections)
DIR/metadata.json    {'label_ids': [...], 'class_names': [...], 'source': ...}
DIR/variables/       orbax checkpoint of {'params': ..., 'frozen': ...}
```
Restoring validates the variables against the config's model and names every mismatch.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from mrcnn_jax.config import default_config


class CheckpointMismatchError(ValueError):
    """The saved variables do not fit the configured model (message names the differences)."""


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """Merge saved JSON onto the default schema (so older files gain new fields' defaults)."""
    saved = json.loads(text)
    cfg = default_config()

    def merge(dst, src):
        for k, v in src.items():
            if isinstance(v, dict) and k in dst and isinstance(dst[k], ml_collections.ConfigDict):
                merge(dst[k], v)
            else:
                with dst.ignore_type():
                    dst[k] = tuple(v) if isinstance(v, list) else v
    merge(cfg, saved)
    return cfg


def save_model_dir(path, config: ml_collections.ConfigDict, variables: Any, metadata: dict) -> pathlib.Path:
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:   # every host joins the orbax save below; one writes the JSON
        (path / 'config.json').write_text(config.to_json(indent=2))
        (path / 'metadata.json').write_text(json.dumps(metadata, indent=2))
    target = path / 'variables'
    variables = jax.tree_util.tree_map(np.asarray, variables)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(target, variables, force=True)
    return path


def check_variables(expected: Any, actual: Any) -> None:
    """Raise CheckpointMismatchError naming paths missing, extra or of the wrong shape."""
    from flax import traverse_util

    e = traverse_util.flatten_dict(dict(expected), sep='/')
    a = traverse_util.flatten_dict(dict(actual), sep='/')
    missing = sorted(set(e) - set(a))
    extra = sorted(set(a) - set(e))
    shapes = [f'{k}: saved {tuple(np.shape(a[k]))}, model {tuple(e[k].shape)}'
              for k in sorted(set(e) & set(a)) if tuple(np.shape(a[k])) != tuple(e[k].shape)]
    problems = []
    if missing:
        problems.append(f'missing in checkpoint ({len(missing)}): ' + ', '.join(missing[:10]))
    if extra:
        problems.append(f'not in the model ({len(extra)}): ' + ', '.join(extra[:10]))
    if shapes:
        problems.append(f'shape mismatches ({len(shapes)}): ' + '; '.join(shapes[:10]))
    if problems:
        raise CheckpointMismatchError('checkpoint does not match the configured model:\n  ' + '\n  '.join(problems))


def load_model_dir(path, config: ml_collections.ConfigDict | None = None):
    """-> (config, variables as numpy, metadata). `config` overrides the saved one (its model
    must match the saved variables, else CheckpointMismatchError)."""
    import orbax.checkpoint as ocp
    from mrcnn_jax.convert.torchvision import abstract_variables

    path = pathlib.Path(path).absolute()
    if not (path / 'config.json').exists():
        raise FileNotFoundError(f'{path} is not a model directory (no config.json)')
    cfg = config if config is not None else config_from_json((path / 'config.json').read_text())
    meta_path = path / 'metadata.json'
    metadata = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    with ocp.StandardCheckpointer() as ckptr:
        raw = ckptr.restore(path / 'variables')
    raw = jax.tree_util.tree_map(np.asarray, raw)
    check_variables(abstract_variables(cfg.model), raw)
    return cfg, raw, metadata
