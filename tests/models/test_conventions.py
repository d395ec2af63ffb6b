"""models/conventions.py: presets, overrides from a config group, validation, and that the model
and the loss settings take every convention-dependent value from it."""

import dataclasses

import ml_collections
import numpy as np
import pytest

from mrcnn_jax.config import default_config, load_config
from mrcnn_jax.models import conventions as conv_lib
from mrcnn_jax.models.conventions import DETECTRON2, TORCHVISION, Conventions


def test_default_config_resolves_to_torchvision():
    cfg = default_config()
    assert cfg.model.conventions.name == 'torchvision'
    assert all(v is None for k, v in cfg.model.conventions.items() if k != 'name')
    assert Conventions.from_config(cfg.model.conventions) == TORCHVISION


def test_name_switches_every_field_and_fields_override():
    group = ml_collections.ConfigDict(conv_lib.config_group('torchvision'))
    group.name = 'detectron2'
    assert Conventions.from_config(group) == DETECTRON2
    group.pixel_std = (57.375, 57.12, 58.395)       # e.g. a Detectron2 config's PIXEL_STD
    group.stride_in_1x1 = False
    c = Conventions.from_config(group)
    assert c.pixel_std == (57.375, 57.12, 58.395) and not c.stride_in_1x1
    assert dataclasses.replace(c, pixel_std=DETECTRON2.pixel_std, stride_in_1x1=True) == DETECTRON2
    # From the command line, as a user would.
    cfg = load_config('configs/tiny_test.py', ['--config.model.conventions.name=detectron2',
                                                '--config.model.conventions.sampling_ratio=2'])
    c = Conventions.from_config(cfg.model.conventions)
    assert c.name == 'detectron2' and c.sampling_ratio == 2 and c.roi_align_aligned


def test_command_line_values_take_the_fields_types():
    """None means "the preset's value", so an override is parsed as the preset field's type:
    'false' is False (not the truthy string), 2 is an int; a wrong type is an error."""
    cfg = load_config('configs/tiny_test.py', ['model.conventions.roi_align_aligned=false',
                                                'model.conventions.resize_antialias=True',
                                                'model.conventions.sampling_ratio=0',
                                                'model.conventions.rpn_smooth_l1_beta=0'])
    c = Conventions.from_config(cfg.model.conventions)
    assert c.roi_align_aligned is False and c.resize_antialias is True
    assert c.sampling_ratio == 0 and isinstance(c.sampling_ratio, int)
    assert c.rpn_smooth_l1_beta == 0.0 and isinstance(c.rpn_smooth_l1_beta, float)
    with pytest.raises(TypeError, match='roi_align_aligned must be True or False'):
        TORCHVISION.replace(roi_align_aligned='false')
    with pytest.raises(TypeError, match='sampling_ratio must be an integer'):
        TORCHVISION.replace(sampling_ratio=2.5)


def test_config_files_with_moved_or_unknown_fields_are_errors(tmp_path):
    """A config file written for the flat schema (or with a typo) does not silently add a field
    that nothing reads: the error names it and where it moved."""
    (tmp_path / 'old.py').write_text(
        'from mrcnn_jax.config import default_config\n'
        'def get_config():\n'
        '    c = default_config()\n'
        "    c.model.semantics = 'detectron2'\n"
        '    c.model.roi.sampling_ratio = 0\n'
        '    c.train.stepz = 3\n'
        '    return c\n')
    with pytest.raises(KeyError) as e:
        load_config(tmp_path / 'old.py')
    msg = str(e.value)
    assert 'model.semantics (now model.conventions.name)' in msg
    assert 'model.roi.sampling_ratio (now model.conventions.sampling_ratio)' in msg and 'train.stepz' in msg


def test_bad_values_are_errors():
    with pytest.raises(ValueError, match="unknown conventions 'detectorn2'"):
        Conventions.from_config({'name': 'detectorn2'})
    with pytest.raises(KeyError, match='roi_align_alinged'):
        Conventions.from_config({'name': 'torchvision', 'roi_align_alinged': True})
    with pytest.raises(ValueError, match="resize_rule must be one of"):
        Conventions.from_config({'name': 'torchvision', 'resize_rule': 'torchvision'})
    with pytest.raises(ValueError, match='pixel_mean needs 3 values'):
        TORCHVISION.replace(pixel_mean=(1.0, 2.0))


def test_presets_differ_where_the_references_differ():
    diff = {f.name for f in dataclasses.fields(Conventions)
            if getattr(TORCHVISION, f.name) != getattr(DETECTRON2, f.name)}
    assert diff == {f.name for f in dataclasses.fields(Conventions)} - {'rpn_loss_type', 'box_loss_type'}
    # Resize: torchvision floors, Detectron2 rounds (COCO's 640 x 480 photo: 1066.67 px wide).
    assert TORCHVISION.resized_size(480, 640, 800, 1333) == (800, 1066)
    assert DETECTRON2.resized_size(480, 640, 800, 1333) == (800, 1067)
    assert TORCHVISION.resized_size(1000, 333, 800, 1333) == (1333, 443)
    assert DETECTRON2.resized_size(1000, 333, 800, 1333) == (1333, 444)
    sizes = [(h, w) for h in range(300, 700, 7) for w in range(300, 700, 11)]
    assert any(TORCHVISION.resized_size(h, w, 800, 1333) != DETECTRON2.resized_size(h, w, 800, 1333)
               for h, w in sizes)
    np.testing.assert_array_equal(TORCHVISION.cell_anchors(32, (0.5, 1.0, 2.0)),
                                  np.round(TORCHVISION.cell_anchors(32, (0.5, 1.0, 2.0))))
    assert not np.array_equal(DETECTRON2.cell_anchors(32, (0.5, 1.0, 2.0)),
                              np.round(DETECTRON2.cell_anchors(32, (0.5, 1.0, 2.0))))
    assert (TORCHVISION.class_layout, DETECTRON2.class_layout) == ('background_first', 'background_last')


def test_model_and_losses_take_their_values_from_the_conventions():
    from mrcnn_jax.models.mask_rcnn import build_model
    from mrcnn_jax.training.losses import LossSettings

    cfg = load_config('configs/tiny_test.py')
    for preset in (TORCHVISION, DETECTRON2):
        cfg.model.conventions.name = preset.name
        model = build_model(cfg.model)
        for pooler in (model.roi_heads.box_pooler, model.roi_heads.mask_pooler):
            assert pooler.aligned == preset.roi_align_aligned
            assert pooler.sampling_ratio == preset.sampling_ratio
            assert (pooler.level_eps, pooler.level_eps_in_log) == (preset.level_eps, preset.level_eps_in_log)
        assert model.anchor_generator.rounded == preset.anchor_rounding
        assert model.anchor_generator.stride_rule == preset.anchor_strides
        assert model.backbone.stride_in_1x1 == preset.stride_in_1x1
        assert model.rpn_settings.min_size_strict == preset.rpn_min_size_strict
        s = LossSettings.from_config(cfg.model)
        assert (s.rpn_box_loss.kind, s.rpn_box_loss.beta) == (preset.rpn_loss_type, preset.rpn_smooth_l1_beta)
        assert (s.box_loss.kind, s.box_loss.beta) == (preset.box_loss_type, preset.box_smooth_l1_beta)
        assert s.rpn_normalizer == preset.rpn_loss_normalizer
        assert s.soft_mask_targets == (preset.mask_targets == 'soft')


def test_no_reference_names_compared_outside_the_conventions():
    """Model, data and loss code ask the conventions object; only it knows the references' names."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[2] / 'mrcnn_jax'
    pattern = re.compile(r"""(semantics|conventions\.name|rule)\s*[!=]=\s*['"](torchvision|detectron2)['"]""")
    offenders = [f'{p.relative_to(root)}:{i + 1}' for p in root.rglob('*.py') if p.name != 'conventions.py'
                 for i, line in enumerate(p.read_text().splitlines())
                 if 'semantics ==' in line or pattern.search(line)]
    assert not offenders, offenders


def test_detectron2_conventions_trace_through_training_and_inference():
    """The whole train loss and inference of the tiny model under Detectron2's conventions
    (aligned adaptive RoIAlign, exact anchors on nominal strides, hard mask targets, L1 and the
    nominal RPN normalizer) trace to the same output structure as under torchvision's (shapes
    only: eval_shape, nothing compiled)."""
    import jax
    import jax.numpy as jnp

    from mrcnn_jax.models.mask_rcnn import build_model, dummy_inputs
    from mrcnn_jax.training.losses import LossSettings, make_loss_fn

    out = {}
    for name in ('torchvision', 'detectron2'):
        cfg = load_config('configs/tiny_test.py', [f'model.conventions.name={name}'])
        model = build_model(cfg.model)
        images, info = dummy_inputs((128, 128), batch=2)
        variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, info)
        g = cfg.data.max_instances
        batch = {'images': images, 'image_info': info,
                 'gt_boxes': jax.ShapeDtypeStruct((2, g, 4), jnp.float32),
                 'gt_classes': jax.ShapeDtypeStruct((2, g), jnp.int32),
                 'gt_valid': jax.ShapeDtypeStruct((2, g), jnp.bool_),
                 'gt_is_crowd': jax.ShapeDtypeStruct((2, g), jnp.bool_),
                 'gt_masks': jax.ShapeDtypeStruct((2, g, 28, 28), jnp.uint8)}
        loss_fn = make_loss_fn(model, LossSettings.from_config(cfg.model))
        loss = jax.eval_shape(loss_fn, variables, batch, jax.random.PRNGKey(0))
        det = jax.eval_shape(model.apply, variables, images, info)
        out[name] = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), (loss, det))
    assert out['torchvision'] == out['detectron2']
    assert set(out['detectron2'][0][1]['losses']) == {'loss_objectness', 'loss_rpn_box_reg', 'loss_classifier',
                                                     'loss_box_reg', 'loss_mask'}
