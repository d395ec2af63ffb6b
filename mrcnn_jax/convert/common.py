"""What the checkpoint converters share: their error type and the checked mapping of a
state_dict onto the model's variables."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np


class StateDictError(ValueError):
    """A state_dict does not fit the model: the message names missing/unexpected/mis-shaped keys."""


def map_state_dict(sd: Mapping[str, np.ndarray], table: Mapping[str, tuple[str, ...]],
                   to_flax: Callable[[str, np.ndarray], np.ndarray], expected: Any, what: str) -> dict:
    """{source key: array} -> the model's variables, through `table` (source key -> (collection,
    *flax path)) and `to_flax(key, array)` (the layout change of one array).

    expected: the model's variables or their shapes (`abstract_variables`). Nothing is returned
    half-converted: every missing, unexpected and mis-shaped key, and every model variable that
    no key fills, goes into one StateDictError ('<what> does not match ...').
    """
    import flax

    flat_expected = flax.traverse_util.flatten_dict(flax.core.unfreeze(expected))
    missing = [k for k in table if k not in sd]
    unexpected = [k for k in sd if k not in table]
    flat: dict[tuple[str, ...], np.ndarray] = {}
    bad_shape = []
    for key, fpath in table.items():
        if key not in sd:
            continue
        if fpath not in flat_expected:
            raise AssertionError(f'converter table names {fpath}, which the model lacks')
        target = tuple(flat_expected[fpath].shape)
        try:
            val = to_flax(key, np.asarray(sd[key], np.float32))
        except (ValueError, StateDictError) as e:
            bad_shape.append(f'{key} {tuple(np.shape(sd[key]))}: {e}')
            continue
        if tuple(val.shape) != target:
            bad_shape.append(f'{key}: shape {tuple(np.shape(sd[key]))} does not give the expected {target} '
                             f'for {"/".join(fpath)}')
            continue
        flat[fpath] = val
    not_covered = [p for p in flat_expected if p not in table.values()]

    def listed(keys):
        return ', '.join(keys[:20]) + (' ...' if len(keys) > 20 else '')
    problems = []
    if missing:
        problems.append(f'missing keys ({len(missing)}): {listed(missing)}')
    if unexpected:
        problems.append(f'unexpected keys ({len(unexpected)}): {listed(unexpected)}')
    if bad_shape:
        problems.append('mis-shaped keys: ' + '; '.join(bad_shape[:20]))
    if not_covered:
        problems.append('model variables with no source: ' + ', '.join('/'.join(p) for p in not_covered[:20]))
    if problems:
        raise StateDictError(f'{what} does not match the model:\n  ' + '\n  '.join(problems))
    return flax.traverse_util.unflatten_dict(flat)
