"""training/checkpoint.py: a checkpoint of the flat variable layout (before 'roi_heads') is
refused with a message that says how to go on, not orbax's tree-mismatch error."""

import pytest

from mrcnn_jax.training.checkpoint import _check_layout


def test_flat_layout_checkpoint_is_refused_with_a_way_forward(tmp_path):
    (tmp_path / 'state').mkdir()
    meta = tmp_path / 'state' / '_METADATA'
    meta.write_text('{"tree_metadata": {"(\'params\', \'roi_heads\', \'box_head\', \'fc6\', \'bias\')": {}}}')
    _check_layout(tmp_path)                                   # today's layout: fine
    meta.write_text('{"tree_metadata": {"(\'params\', \'box_head\', \'fc6\', \'bias\')": {}}}')
    with pytest.raises(ValueError, match='train.init_from'):
        _check_layout(tmp_path)
