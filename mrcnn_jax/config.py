"""The configuration schema: one ConfigDict with `model`, `data`, `train`, `eval` sections.

Experiment files under `configs/` start from `default_config()` and change fields; the command
line overrides any field (`--config.train.steps=20`). Defaults are torchvision's
`maskrcnn_resnet50_fpn` (v1, COCO) so that converted torchvision weights reproduce their source.

Every point where torchvision and Detectron2 differ (RoIAlign alignment and sampling ratio, anchor
rounding and strides, level assignment, class layout, resize rule, pixel format, the stride in the
1x1 or the 3x3, loss forms) is in `model.conventions`: `name` picks a preset of
`models/conventions.py`, and each other field overrides it when not None.
"""

from __future__ import annotations

import ml_collections

from mrcnn_jax.models import conventions as conventions_lib


def default_model_config() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.conventions = conventions_lib.config_group('torchvision')   # or name='detectron2'
    m.num_classes = 91                     # including background (index 0)
    m.mask_on = True                       # False: Faster R-CNN (box only)
    m.keypoint_on = False                  # True: Keypoint R-CNN's keypoint head (with or without masks)
    m.num_keypoints = 17                   # K heatmaps (COCO person: 17); data.num_keypoints must agree
    m.dtype = 'float32'                    # compute dtype of convs/FCs: 'float32' or 'bfloat16'

    b = m.backbone = ml_collections.ConfigDict()
    b.depth = 50                           # 18, 34 (basic blocks), 50, 101, 152 (bottleneck)
    b.width = 64                           # stem / first-stage width; narrow (e.g. 16) for tests
    b.groups = 1                           # ResNeXt: 32
    b.width_per_group = 64                 # ResNeXt: 4 or 8
    b.norm = 'frozen_bn'                   # 'frozen_bn' (pretrained weights) or 'gn' (from scratch)
    b.norm_eps = 0.0                       # FrozenBN eps; torchvision v1 COCO weights use 0
    b.frozen_stages = 2                    # 0: nothing, 1: stem, k: stem + res2..res(k)  (tv: 3 trainable)
    b.return_levels = (2, 3, 4, 5)         # C2..C5 into the FPN; (4,): C4 (res5 in the RoI heads)

    f = m.fpn = ml_collections.ConfigDict()
    f.enabled = True                       # False: C4 (RPN and RoI heads on res4, roi.heads='res5')
    f.channels = 256

    a = m.anchors = ml_collections.ConfigDict()
    a.sizes = (32, 64, 128, 256, 512)      # one size per level P2..P6, or a tuple of sizes per
                                           # level: C4 has ((32, 64, 128, 256, 512),) on res4
    a.aspect_ratios = (0.5, 1.0, 2.0)      # h / w

    r = m.rpn = ml_collections.ConfigDict()
    r.pre_nms_topk_train = 2000            # per level
    r.pre_nms_topk_test = 1000
    r.post_nms_topk_train = 2000           # per image
    r.post_nms_topk_test = 1000
    r.nms_thresh = 0.7
    r.min_size = 1e-3
    r.fg_iou_thresh = 0.7
    r.bg_iou_thresh = 0.3
    r.batch_size_per_image = 256
    r.positive_fraction = 0.5

    h = m.roi = ml_collections.ConfigDict()
    h.heads = 'standard'                   # models/roi_heads.py ROI_HEADS: 'standard', 'res5' (C4),
                                           # 'cascade'
    h.box_head = '2fc'                     # models/heads: BOX_HEADS
    h.box_predictor = 'fast_rcnn'          # BOX_PREDICTORS
    h.mask_head = 'conv_upsample'          # MASK_HEADS (when mask_on)
    h.fg_iou_thresh = 0.5
    h.bg_iou_thresh = 0.5
    h.batch_size_per_image = 512
    h.positive_fraction = 0.25
    h.box_weights = (10.0, 10.0, 5.0, 5.0)
    # heads='cascade': one box stage per IoU threshold (stage 0 matches at fg_iou_thresh), each
    # decoding class-agnostic deltas with its own weights (Detectron2's ROI_BOX_CASCADE_HEAD)
    h.cascade_ious = (0.5, 0.6, 0.7)
    h.cascade_box_weights = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
    h.box_pool_size = 7
    h.mask_pool_size = 14
    h.max_sampling_ratio = 8               # static bound of the adaptive grid (sampling ratio 0)
    h.canonical_scale = 224
    h.canonical_level = 4
    h.roi_align_method = 'gather'          # or 'einsum'
    h.fc_dim = 1024
    h.mask_head_convs = 4
    h.mask_head_channels = 256
    h.mask_resolution = 28
    h.max_mask_rois = 128                  # positives per image carried to the mask and keypoint losses
    h.keypoint_head = 'conv_deconv_upsample'   # KEYPOINT_HEADS (when keypoint_on)
    h.keypoint_pool_size = 14              # RoIAlign output; heatmaps are 4x: 56 x 56
    h.keypoint_head_convs = 8
    h.keypoint_head_channels = 512
    # Heatmap -> keypoint (models/heads/keypoint.py `heatmaps_to_keypoints`): the bicubic upsample
    # to each box's size is evaluated exactly in this many candidate cells of the 56 x 56 grid per
    # keypoint, chosen and certified by an upper bound (all cells when the bound cannot certify).
    h.keypoint_candidate_cells = 16
    # The mask head takes its RoIs this many at a time and skips, at run time, chunks without a
    # positive (training) or valid detection (inference) in any image; 0: one block, always run.
    h.mask_roi_chunk = 32
    h.score_thresh = 0.05
    h.nms_thresh = 0.5
    h.detections_per_img = 100
    h.pre_nms_candidates = 4096            # (proposal, class) pairs entering per-class NMS
    h.min_size = 1e-2

    m.size_divisible = 32
    # Zero activations outside each image's `size_divisible`-padded region before every spatial
    # op, so an image on a larger static canvas computes exactly what torchvision computes on its
    # own padded tensor (see models/mask_rcnn.py).
    m.mask_padding = True
    return m


def default_data_config() -> ml_collections.ConfigDict:
    """Input pipeline (mrcnn_jax/data/pipeline.py documents the example order and bucket rule)."""
    d = ml_collections.ConfigDict()
    d.source = 'coco_json'                 # 'coco_json' | 'tfrecord' | 'tfds' | 'synthetic'
    d.train_annotations = ''
    d.train_images = ''
    d.train_tfrecords = ''                 # file pattern of `data to-tfrecord` shards
    d.val_annotations = ''
    d.val_images = ''
    d.val_tfrecords = ''
    d.tfds_name = 'coco/2017'
    d.tfds_data_dir = ''
    d.tfds_train_split = 'train'
    d.tfds_val_split = 'validation'
    d.synthetic_dir = ''                   # where the synthetic dataset is generated when missing
                                           # ('': ~/.cache/mrcnn_jax/synthetic/<parameters>)
    d.synthetic_num_train = 300
    d.synthetic_num_val = 50
    d.synthetic_image_size = 256
    d.synthetic_seed = 0                   # the dataset's seed (independent of the training seed)
    d.synthetic_task = 'shapes'            # 'shapes' (data/synthetic.py) or 'keypoints' (stick
                                           # figures with 13 joints, data/synthetic_keypoints.py)
    d.strict = False                       # coco_json: a bad image/annotation raises, not skipped
    d.canvas = (1344, 1344)                # training canvas (H, W); or use `buckets`
    d.buckets = ()                         # e.g. ((832, 1344), (1344, 832)), chosen per global batch
    d.bucket_weights = ()                  # probability of each bucket per step; () uniform
    d.min_size = (800,)                    # several values: multi-scale training
    d.max_size = 1333
    # Inference (Predictor, eval, predict): the shortest-edge resize and the canvas buckets;
    # () buckets: preprocess.default_buckets(test_min_size, test_max_size).
    d.test_min_size = 800
    d.test_max_size = 1333
    d.test_buckets = ()
    # The resize rule and pixel format (scale, channel order, mean, std) are model conventions:
    # model.conventions (models/conventions.py).
    d.flip_prob = 0.5
    d.max_instances = 100
    d.mask_size = 112
    d.class_index = 'contiguous'           # gt_classes 1..K by sorted category id; 'category_id':
                                           # the id itself (torchvision's 91-way COCO head)
    d.keypoints = False
    d.num_keypoints = 17
    d.keypoint_oks_sigmas = ()             # keypoint AP: one OKS sigma per keypoint; (): from the
                                           # keypoint names (evaluation/keypoints.py: COCO's)
    d.shuffle_buffer = 1000                # tfds only; other sources shuffle all records per epoch
    d.deterministic = True                 # tf.data keeps element order: same seed, same run
    d.num_parallel_calls = -1              # per map stage; -1: AUTOTUNE
    d.prefetch_batches = -1                # -1: AUTOTUNE
    d.skip_crowd_only = False              # train split: drop images whose instances are all crowd
    d.keep_negatives = True                # train split: keep images without annotations
    return d


def default_train_config() -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.steps = 90000
    t.max_seconds = 0.0                    # > 0: stop (and save) once training took this long
    t.batch_size = 16                      # global batch
    t.checkpoint_every = 5000
    t.keep_checkpoints = 3
    t.log_every = 20
    t.eval_every = 0                       # > 0: COCO-evaluate the val split every N steps and at the end
    t.base_lr = 0.02
    t.momentum = 0.9
    t.weight_decay = 1e-4
    t.weight_decay_norm_and_bias = True    # torchvision's reference decays everything
    t.warmup_steps = 1000
    t.warmup_factor = 1e-3
    t.decay_steps = (60000, 80000)
    t.decay_factor = 0.1
    t.clip_norm = 0.0                      # 0: off
    t.init_from = ''                       # converted checkpoint dir to initialize (not resume) from
    t.init_backbone_only = False
    return t


def default_eval_config() -> ml_collections.ConfigDict:
    e = ml_collections.ConfigDict()
    e.batch_size = 4
    e.max_images = 0                       # 0: all
    e.backend = 'pycocotools'              # or 'faster_coco_eval'
    return e


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = default_model_config()
    c.data = default_data_config()
    c.train = default_train_config()
    c.eval = default_eval_config()
    c.distributed = False                  # call jax.distributed.initialize() first
    return c


# Fields that moved into model.conventions (models/conventions.py): old path -> (field, value map).
LEGACY_CONVENTION_KEYS = {
    ('model', 'semantics'): ('name', None),
    ('model', 'backbone', 'stride_in_1x1'): ('stride_in_1x1', None),
    ('model', 'rpn', 'loss_type'): ('rpn_loss_type', None),
    ('model', 'rpn', 'smooth_l1_beta'): ('rpn_smooth_l1_beta', None),
    ('model', 'roi', 'box_loss_type'): ('box_loss_type', None),
    ('model', 'roi', 'smooth_l1_beta'): ('box_smooth_l1_beta', None),
    ('model', 'roi', 'soft_mask_targets'): ('mask_targets', {True: 'soft', False: 'hard'}),
    ('model', 'roi', 'sampling_ratio'): ('sampling_ratio', None),
    ('data', 'resize_rule'): ('resize_rule', {'torchvision': 'floor', 'detectron2': 'round'}),
    ('data', 'resize_antialias'): ('resize_antialias', None),
    ('data', 'channel_order'): ('channel_order', None),
    ('data', 'pixel_scale'): ('pixel_scale', None),
    ('data', 'pixel_mean'): ('pixel_mean', None),
    ('data', 'pixel_std'): ('pixel_std', None),
}


def check_schema(config: ml_collections.ConfigDict, source: str = 'config') -> None:
    """Raise KeyError naming every field of `config` that the schema does not have (a config file
    that sets `model.semantics` or a typo would otherwise add a field nothing reads)."""
    def unknown(node, ref, prefix):
        for k in node.keys():
            path = prefix + (k,)
            if k not in ref:
                yield path
            elif isinstance(ref[k], ml_collections.ConfigDict) and isinstance(node[k], ml_collections.ConfigDict):
                yield from unknown(node[k], ref[k], path)
    bad = list(unknown(config, default_config(), ()))
    if bad:
        def hint(path):
            moved = LEGACY_CONVENTION_KEYS.get(path)
            return '.'.join(path) + (f' (now model.conventions.{moved[0]})' if moved else '')
        raise KeyError(f'{source}: unknown config field(s): ' + ', '.join(hint(p) for p in bad))


def _parse_value(text: str, current):
    import ast
    low = text.strip().lower()
    if isinstance(current, bool) and low in ('true', 'false', '1', '0', 'yes', 'no'):
        return low in ('true', '1', 'yes')
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, tuple) and isinstance(value, (list, tuple)):
        return tuple(value)
    if isinstance(current, tuple) and not isinstance(value, (list, tuple)) and value != '':
        return (value,)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
    """Apply `a.b=value` (or `--config.a.b=value`) overrides. Values are Python literals
    (`data.canvas=(512,512)`, `model.mask_on=False`) or bare strings; unknown keys are errors."""
    for item in overrides:
        item = item[2:] if item.startswith('--') else item
        item = item[len('config.'):] if item.startswith('config.') else item
        key, sep, text = item.partition('=')
        if not sep:
            raise ValueError(f'override {item!r} is not KEY=VALUE')
        node = config
        *parents, leaf = key.strip().split('.')
        for name in parents:
            if name not in node:
                raise KeyError(f'unknown config field {key!r} (no {name!r})')
            node = node[name]
        if leaf not in node:
            raise KeyError(f'unknown config field {key!r}')
        current = node[leaf]
        if current is None and parents == ['model', 'conventions'] and leaf != 'name':
            # None means "the preset's value": parse as the field's type (a bool stays a bool).
            current = getattr(conventions_lib.TORCHVISION, leaf)
        with node.ignore_type():
            node[leaf] = _parse_value(text, current)
    return config


def load_config(path, overrides=()) -> ml_collections.ConfigDict:
    """A config file (Python, `get_config()` -> ConfigDict) with overrides applied; fields the
    schema does not have are errors.

    A file inside a package (a folder with `__init__.py`, such as the repository's `configs/`) is
    imported as a module of that package (`configs.shapes_demo`), so configs build on each other
    with plain imports (`from configs import shapes_tiny`); any other file is loaded by path. A
    file loaded again in the same process is re-executed (an edited config takes effect).
    """
    import importlib
    import importlib.util
    import pathlib
    import sys

    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f'cannot load config file {path}')
    file = file.resolve()
    parts, root = [file.stem], file.parent
    while (root / '__init__.py').exists():
        parts.insert(0, root.name)
        root = root.parent
    if len(parts) > 1:
        top = sys.modules.get(parts[0])
        if top is not None and str(root / parts[0]) not in [str(pathlib.Path(p).resolve())
                                                            for p in getattr(top, '__path__', [])]:
            raise ImportError(f'{path}: another package named {parts[0]!r} is already imported '
                              f'(from {list(getattr(top, "__path__", []))})')
        added = str(root) not in sys.path
        if added:
            sys.path.insert(0, str(root))
        try:
            name = '.'.join(parts)
            module = importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
            config = module.get_config() if hasattr(module, 'get_config') else None
        finally:
            if added:
                sys.path.remove(str(root))
    else:
        spec = importlib.util.spec_from_file_location(f'_mrcnn_config_{abs(hash(str(file)))}', file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config() if hasattr(module, 'get_config') else None
    if config is None:
        raise AttributeError(f'{path} has no get_config()')
    check_schema(config, str(path))
    return apply_overrides(config, overrides)
