"""Every point where torchvision and Detectron2 differ, in one place.

A checkpoint reproduces its source only under its source's conventions: the same weights give
other boxes if RoIAlign samples half a pixel off, anchors are rounded differently or an image is
resized one pixel larger. Each such difference is a field of `Conventions`; model, data and loss
code asks the object for the value (`conv.resized_size(...)`, `conv.cell_anchors(...)`,
`conv.roi_align_aligned`) and never compares reference names. It imports no JAX (its two helper
methods import their ops when called), so the input pipeline reads it too.

In a config, `model.conventions` is a group: `name` picks a preset (`TORCHVISION`, `DETECTRON2`)
and every other field is None ("the preset's value") or an explicit override, e.g. a Detectron2
config whose PIXEL_STD differs from the default:

    --config.model.conventions.name=detectron2 --config.model.conventions.pixel_std='(57.375, 57.12, 58.395)'

`Conventions.from_config(cfg.model.conventions)` resolves the group into one object.

What stays outside: values a reference's own config file sets per model (thresholds, top-k, the
pooler sizes, `rpn.min_size`, `roi.min_size`, FrozenBN eps), which live in the config sections of
their stage, with torchvision's values as defaults.

Class layout: the model always computes with the background at index 0 (class i of K - 1 at
index i); `class_layout` records how the reference numbers its outputs (Detectron2 puts the
background last, at index K - 1, and its box and mask predictors have no background rows). A
converter of that reference's checkpoints permutes its classifier into our layout and writes the
label map (Detectron2's: the Detectron2 import, next), so model code has one layout and no branch.

Detectron2's test-time detection has no min-size filter: its configs (`convert/detectron2.py`)
set `roi.min_size = 0`, which keeps every box (sides >= 0); the empty ones are dropped after
rescaling, as `clip_output_boxes` says.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

# torchvision normalizes x / 255 with ImageNet statistics in [0, 1] units.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Detectron2's defaults (MSRA ResNet weights): BGR in [0, 255], mean subtracted, std 1.
DETECTRON2_MEAN = (103.53, 116.28, 123.675)
DETECTRON2_STD = (1.0, 1.0, 1.0)

RESIZE_RULES = ('floor', 'round')
ANCHOR_STRIDES = ('padded', 'nominal')
CLASS_LAYOUTS = ('background_first', 'background_last')
MASK_TARGETS = ('soft', 'hard')
MASK_PASTES = ('padded_resize', 'pixel_centers')
KEYPOINT_SCORES = ('logit', 'pool_softmax')
LOSS_NORMALIZERS = ('sampled', 'nominal')
REG_LOSSES = ('smooth_l1', 'l1')


@dataclasses.dataclass(frozen=True)
class Conventions:
    """One reference implementation's conventions (see the module docstring)."""
    name: str

    # -- input ---------------------------------------------------------------------------------
    # Shortest-edge resize: torchvision floors `side * scale` (computed in float64, as
    # F.interpolate with recompute_scale_factor=True), Detectron2's ResizeShortestEdge rounds.
    resize_rule: str
    # torchvision resizes tensors without antialiasing; Detectron2 resizes with PIL, which
    # antialiases when shrinking (True approximates it in the training pipeline).
    resize_antialias: bool
    # Images enter as `(x * pixel_scale - pixel_mean) / pixel_std` in `channel_order`, from uint8
    # RGB x: torchvision works on [0, 1] (scale 1/255, applied as a division by 255 like
    # to_tensor), Detectron2 on [0, 255] in BGR for its MSRA weights.
    pixel_scale: float
    channel_order: str
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]

    # -- backbone ------------------------------------------------------------------------------
    # Where a bottleneck's stride sits: torchvision (ResNet v1.5) on the 3x3, Detectron2's MSRA
    # weights (ResNet v1) on the first 1x1.
    stride_in_1x1: bool

    # -- anchors -------------------------------------------------------------------------------
    # torchvision rounds its cell anchors to integers (computed in float32 as h = size * sqrt(ar),
    # w = size / sqrt(ar)); Detectron2 keeps them exact (w = sqrt(size^2 / ar), h = ar * w).
    anchor_rounding: bool
    # torchvision's level stride is padded_size // feature_size, which is not 64 for P6 when the
    # padded side / 32 is odd; Detectron2 uses the nominal 4, 8, 16, 32, 64 (ops/anchors.py).
    anchor_strides: str

    # -- RoI pooling ---------------------------------------------------------------------------
    # RoIAlign's half-pixel shift: torchvision's MultiScaleRoIAlign has aligned=False,
    # Detectron2's ROIAlignV2 aligned=True.
    roi_align_aligned: bool
    # Samples per bin and axis: torchvision 2, Detectron2 0 (adaptive ceil(roi / output)).
    sampling_ratio: int
    # FPN level of a box, k = floor(k0 + log2(sqrt(area) / s0) + eps) in torchvision (eps 1e-6
    # added after the log) and floor(k0 + log2(sqrt(area) / s0 + eps)) in Detectron2 (eps 1e-8
    # inside the log).
    level_eps: float
    level_eps_in_log: bool

    # -- proposals and detections ----------------------------------------------------------------
    # RPN small-box removal: torchvision keeps proposals whose sides are >= rpn.min_size
    # (`remove_small_boxes`), Detectron2 those whose sides are > rpn.min_size (`Boxes.nonempty`,
    # MIN_SIZE 0: it drops boxes clipped to zero width, e.g. anchors in the padding).
    rpn_min_size_strict: bool
    # Output boxes in original pixels: torchvision only rescales them; Detectron2's
    # `detector_postprocess` also clips them to the original image and drops empty ones.
    clip_output_boxes: bool
    # Mask paste into the original image (ops/paste.py): torchvision resizes a zero-padded mask
    # onto the integer box ('padded_resize', thresholded with >); Detectron2 samples the mask
    # with grid_sample at the pixel centres of the float box ('pixel_centers', thresholded with >=).
    mask_paste: str
    # A keypoint's score (`keypoints_scores`): torchvision's is the bicubically resized heatmap's
    # logit at the keypoint ('logit'); Detectron2's is exp(that - max) over the sum of exp of the
    # 56 x 56 map ('pool_softmax', models/heads/keypoint.py). The location is the same.
    keypoint_score: str
    # Keypoint coordinates: COCO's are pixel indices. Detectron2's loader adds 0.5 to x and y
    # (continuous coordinates, the model is trained and predicts in that frame) and its
    # COCOEvaluator subtracts 0.5 before writing results; torchvision uses them as given. The
    # input pipeline adds `keypoint_offset` to labelled keypoints, COCO evaluation subtracts it
    # from predicted ones; the Predictor returns the model's frame, as both references do.
    keypoint_offset: float

    # -- classes -------------------------------------------------------------------------------
    class_layout: str

    # -- training ------------------------------------------------------------------------------
    # Box regression losses: smooth L1 with this beta (0 is L1). torchvision: 1/9 for the RPN and
    # the box head; Detectron2's default SMOOTH_L1_BETA is 0.
    rpn_loss_type: str
    rpn_smooth_l1_beta: float
    box_loss_type: str
    box_smooth_l1_beta: float
    # RPN losses divided by the anchors actually sampled (torchvision) or by
    # batch_size_per_image x images (Detectron2), which differ when an image has too few anchors.
    rpn_loss_normalizer: str
    # Mask targets: torchvision's are RoIAlign of the 0/1 mask (soft), Detectron2 thresholds
    # them at 0.5.
    mask_targets: str

    def __post_init__(self):
        for field, allowed in (('resize_rule', RESIZE_RULES), ('anchor_strides', ANCHOR_STRIDES),
                               ('class_layout', CLASS_LAYOUTS), ('mask_targets', MASK_TARGETS),
                               ('mask_paste', MASK_PASTES), ('keypoint_score', KEYPOINT_SCORES),
                               ('rpn_loss_normalizer', LOSS_NORMALIZERS),
                               ('rpn_loss_type', REG_LOSSES), ('box_loss_type', REG_LOSSES),
                               ('channel_order', ('RGB', 'BGR'))):
            if getattr(self, field) not in allowed:   # a typo must not silently change numbers
                raise ValueError(f'conventions {self.name!r}: {field} must be one of {allowed}, '
                                 f'got {getattr(self, field)!r}')
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == 'bool' and not isinstance(value, (bool, np.bool_)):
                raise TypeError(f'conventions {self.name!r}: {f.name} must be True or False, got {value!r}')
            if f.type == 'int' and (isinstance(value, bool) or not float(value).is_integer()):
                raise TypeError(f'conventions {self.name!r}: {f.name} must be an integer, got {value!r}')
            if f.type in ('bool', 'int', 'float'):
                object.__setattr__(self, f.name, {'bool': bool, 'int': int, 'float': float}[f.type](value))
        for field in ('pixel_mean', 'pixel_std'):
            value = tuple(float(v) for v in getattr(self, field))
            if len(value) != 3:
                raise ValueError(f'conventions {self.name!r}: {field} needs 3 values, got {value}')
            object.__setattr__(self, field, value)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_config(cls, group: Any) -> 'Conventions':
        """The preset named by `group.name`, with the group's non-None fields overriding it.

        group: a `model.conventions` ConfigDict (or a mapping, or a preset name as a string).
        """
        if isinstance(group, Conventions):
            return group
        if isinstance(group, str):
            return preset(group)
        items = dict(group.items()) if hasattr(group, 'items') else dict(group)
        base = preset(items.pop('name', 'torchvision'))
        unknown = sorted(set(items) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise KeyError(f'unknown conventions field(s): {", ".join(unknown)}')
        changes = {k: (tuple(v) if isinstance(v, list) else v) for k, v in items.items() if v is not None}
        return dataclasses.replace(base, **changes) if changes else base

    def replace(self, **changes) -> 'Conventions':
        return dataclasses.replace(self, **changes)

    # -- the values, as code needs them ----------------------------------------------------------
    def resized_size(self, h: int, w: int, min_size: float, max_size: float) -> tuple[int, int]:
        """Output (height, width) of the shortest-edge resize of an h x w image (host side;
        `preprocess.resized_size` states both rules)."""
        from mrcnn_jax import preprocess
        return preprocess.resized_size(h, w, min_size, max_size, self.resize_rule)

    def cell_anchors(self, size: float, aspect_ratios) -> np.ndarray:
        """Zero-centred anchors of one level: [A, 4] float32 xyxy, A = len(aspect_ratios)."""
        from mrcnn_jax.ops import anchors
        return anchors.cell_anchors(size, aspect_ratios, rounded=self.anchor_rounding)


TORCHVISION = Conventions(
    name='torchvision',
    resize_rule='floor', resize_antialias=False,
    pixel_scale=1.0 / 255.0, channel_order='RGB', pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD,
    stride_in_1x1=False,
    anchor_rounding=True, anchor_strides='padded',
    roi_align_aligned=False, sampling_ratio=2, level_eps=1e-6, level_eps_in_log=False,
    rpn_min_size_strict=False, clip_output_boxes=False, mask_paste='padded_resize', keypoint_score='logit',
    keypoint_offset=0.0,
    class_layout='background_first',
    rpn_loss_type='smooth_l1', rpn_smooth_l1_beta=1.0 / 9.0,
    box_loss_type='smooth_l1', box_smooth_l1_beta=1.0 / 9.0,
    rpn_loss_normalizer='sampled', mask_targets='soft',
)

DETECTRON2 = Conventions(
    name='detectron2',
    resize_rule='round', resize_antialias=True,
    pixel_scale=1.0, channel_order='BGR', pixel_mean=DETECTRON2_MEAN, pixel_std=DETECTRON2_STD,
    stride_in_1x1=True,
    anchor_rounding=False, anchor_strides='nominal',
    roi_align_aligned=True, sampling_ratio=0, level_eps=1e-8, level_eps_in_log=True,
    rpn_min_size_strict=True, clip_output_boxes=True, mask_paste='pixel_centers', keypoint_score='pool_softmax',
    keypoint_offset=0.5,
    class_layout='background_last',
    rpn_loss_type='smooth_l1', rpn_smooth_l1_beta=0.0,
    box_loss_type='smooth_l1', box_smooth_l1_beta=0.0,
    rpn_loss_normalizer='nominal', mask_targets='hard',
)

PRESETS: Mapping[str, Conventions] = {c.name: c for c in (TORCHVISION, DETECTRON2)}


def preset(name: str) -> Conventions:
    if name not in PRESETS:
        raise ValueError(f'unknown conventions {name!r} (known: {", ".join(PRESETS)})')
    return PRESETS[name]


def config_group(name: str = 'torchvision') -> dict:
    """The `model.conventions` group of a config: the preset's name, every field None (= the
    preset's value) until a config or the command line overrides it."""
    preset(name)
    return {f.name: (name if f.name == 'name' else None) for f in dataclasses.fields(Conventions)}
