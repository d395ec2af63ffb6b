"""A self-describing model directory: what `mrcnn-jax convert` writes and `Predictor.from_checkpoint`
reads.

```
DIR/config.json      the full ConfigDict (model, data, train, eval sections)
DIR/metadata.json    {'label_ids': [...], 'class_names': [...], 'source': ...}
DIR/variables/       orbax checkpoint of {'params': ..., 'frozen': ...}
```
Restoring validates the variables against the config's model and names every mismatch.
Directories written before the model was grouped into stages (config keys `model.semantics`,
`data.resize_rule`, ...; variables `box_head`, `mask_head` at the top level) are read and
migrated on load (`migrate_legacy_config`, `migrate_legacy_variables`).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from mrcnn_jax.config import LEGACY_CONVENTION_KEYS, default_config


class CheckpointMismatchError(ValueError):
    """The saved variables do not fit the configured model (message names the differences)."""


# What an old `model.semantics` name meant, where today's preset of that name differs (the old
# 'detectron2' added the level eps after the log, normalized the RPN loss as torchvision and kept
# the background first).
_LEGACY_MEANING = {'detectron2': {'level_eps_in_log': False, 'rpn_loss_normalizer': 'sampled',
                                  'class_layout': 'background_first'}}


def migrate_legacy_config(saved: dict) -> dict:
    """A saved config dict of an older layout -> the current one (in place; returned)."""
    model = saved.get('model', {})
    if 'semantics' not in model:
        return saved
    from mrcnn_jax.models.conventions import preset

    group = model.setdefault('conventions', {})
    group['name'] = model.pop('semantics')
    base = preset(group['name'])
    group.update(_LEGACY_MEANING.get(group['name'], {}))
    for path, (field, values) in LEGACY_CONVENTION_KEYS.items():
        if path == ('model', 'semantics'):
            continue
        node = saved
        for name in path[:-1]:
            node = node.get(name, {})
        if path[-1] in node:
            value = node.pop(path[-1])
            value = values.get(value, value) if values else value
            value = tuple(value) if isinstance(value, list) else value
            if value != getattr(base, field):    # only what differs from the preset
                group[field] = value
    return saved


def migrate_legacy_variables(variables: dict) -> dict:
    """Variables with the box and mask heads at the top level -> under 'roi_heads'."""
    params = variables.get('params', {})
    if 'box_head' not in params:
        return variables
    params = dict(params)
    box = dict(params.pop('box_head'))
    roi = {'box_head': {k: box.pop(k) for k in ('fc6', 'fc7') if k in box}, 'box_predictor': box}
    if 'mask_head' in params:
        roi['mask_head'] = params.pop('mask_head')
    params['roi_heads'] = roi
    return {**variables, 'params': params}


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """Merge saved JSON onto the default schema (so older files gain new fields' defaults)."""
    saved = migrate_legacy_config(json.loads(text))
    cfg = default_config()

    def as_tuple(v):   # JSON arrays back to the (nested) tuples of the schema
        return tuple(as_tuple(x) for x in v) if isinstance(v, list) else v

    def merge(dst, src):
        for k, v in src.items():
            if isinstance(v, dict) and k in dst and isinstance(dst[k], ml_collections.ConfigDict):
                merge(dst[k], v)
            else:
                with dst.ignore_type():
                    dst[k] = as_tuple(v)
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
    from mrcnn_jax.models.mask_rcnn import abstract_variables

    path = pathlib.Path(path).absolute()
    if not (path / 'config.json').exists():
        raise FileNotFoundError(f'{path} is not a model directory (no config.json)')
    cfg = config if config is not None else config_from_json((path / 'config.json').read_text())
    meta_path = path / 'metadata.json'
    metadata = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    raw = migrate_legacy_variables(restore_variables(path))
    check_variables(abstract_variables(cfg.model), raw)
    return cfg, raw, metadata


def restore_variables(path) -> dict:
    """DIR/variables as saved (numpy), without migration or validation."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        raw = ckptr.restore(pathlib.Path(path).absolute() / 'variables')
    return jax.tree_util.tree_map(np.asarray, raw)
