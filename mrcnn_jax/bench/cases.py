"""The cases: one builder per (case, side), returning a blocking fn() and a summary of its output.

Sides: 'jax' and 'torch' (torchvision) run on the same inputs (`inputs`) and the same weights,
torchvision's (`Context`). The cases in D2_CASES have two more: 'jax_d2' (our Predictor of
Detectron2's checkpoint, `Predictor.from_detectron2`, or our train step on it) and 'd2'
(Detectron2's `DefaultPredictor` on that checkpoint, or its model training), on the same photos and
the same weights, Detectron2's (its zoo config: `Settings.d2_config`).
The torch and Detectron2 sides import torch inside their builders, so that a JAX-side probe never
does.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Sequence

import numpy as np

from mrcnn_jax.bench.context import Context, torch_sync
from mrcnn_jax.bench.inputs import (PASTE_IMAGE_HW, POOLER_SCALES, Sample, Settings, letterbox, nms_inputs,
                                    paste_inputs, roi_inputs, train_batch)

MODEL_CASES = ('inference_b1', 'inference_b4', 'forward_b1', 'train_step_b2')
MICRO_CASES = ('roi_align_7x7_gather', 'roi_align_7x7_einsum', 'roi_align_14x14_gather',
               'roi_align_14x14_einsum', 'nms_1000', 'nms_5000', 'paste_rle_100')
# The H100 goals of issue 6 (bf16 training on a 1024x1024 canvas, bf16 inference per image):
# part of the default set only where torch sees a GPU (on a 2-core CPU they take many minutes).
THROUGHPUT_CASES = ('train_1024_bf16', 'inference_bf16_b8')
CASES = MODEL_CASES + MICRO_CASES + THROUGHPUT_CASES
SIDES = ('jax', 'torch')
# The Detectron2 column (the zoo config of --d2-config: FPN, C4 or Cascade): inference end to end
# (DefaultPredictor) and the model alone, and the train step.
D2_CASES = ('inference_b1', 'forward_b1', 'train_step_b2')
D2_SIDES = ('jax_d2', 'd2')
ALL_SIDES = SIDES + D2_SIDES
TORCH_SIDES = ('torch', 'd2')     # sides that run torch (a probe of one sets torch's threads)
TRAIN_BATCH = 2
TORCH_LR = 0.02 * 1e-3           # = our schedule's lr at step 0 (base 0.02, warmup factor 1e-3)


def _summ_detections(out) -> str:
    outs = out if isinstance(out, (list, tuple)) else [out]
    counts = [len(o['scores']) for o in outs]
    return 'detections ' + '/'.join(str(c) for c in counts)


def _cycle(items: Sequence[Any], n: int) -> list[Any]:
    """n items, repeating the list as often as needed (the first n when there are enough)."""
    return [items[i % len(items)] for i in range(n)]


# -- model cases -------------------------------------------------------------------------------
def _jax_inference(ctx: Context, b: int, dtype: str = 'float32'):
    p = ctx.predictor(b, dtype)
    images = _cycle([x.image for x in ctx.samples], b)
    arg = images[0] if b == 1 else images
    return (lambda: p(arg)), _summ_detections


def _torch_autocast(dev, bf16: bool):
    import torch
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _torch_inference(ctx: Context, b: int, bf16: bool = False):
    import torch
    from mrcnn_jax.testing.torchvision_reference import image_to_tensor
    model, dev = ctx.tv_model, ctx.device
    model.eval()
    images = _cycle([x.image for x in ctx.samples], b)

    def fn():
        with torch.inference_mode(), _torch_autocast(dev, bf16):
            xs = [image_to_tensor(im).to(dev) for im in images]
            out = [{k: (v.float() if v.is_floating_point() else v).cpu() for k, v in o.items()}
                   for o in model(xs)]
        torch_sync(dev)
        return out if b > 1 else out[0]
    return fn, _summ_detections


def _jax_forward(ctx: Context, p=None):
    """The jitted model alone on one preprocessed canvas; `p`: the Predictor (default: ours of
    torchvision's weights)."""
    import jax
    p = ctx.predictor(1) if p is None else p
    x, info, bucket = p.preprocess(ctx.samples[0].image)
    canvas = np.zeros((1, bucket[0], bucket[1], 3), np.float32)
    canvas[0, :x.shape[0], :x.shape[1]] = x
    # Placed as the Predictor places its batches (on its mesh): with the same shapes and shardings
    # this reuses the program inference_b1 compiled (a plain device_put would compile it again).
    images, image_info = p._shard(canvas), p._shard(info[None])
    forward = jax.jit(p.model.apply)

    def fn():
        return jax.block_until_ready(forward(p.variables, images, image_info))
    return fn, lambda out: f'canvas HxW {bucket[0]}x{bucket[1]}, detections {int(np.asarray(out["valid"]).sum())}'


def _torch_forward(ctx: Context):
    import torch
    from mrcnn_jax.testing.torchvision_reference import image_to_tensor
    model, dev = ctx.tv_model, ctx.device
    model.eval()
    with torch.inference_mode():
        image_list, _ = model.transform([image_to_tensor(ctx.samples[0].image).to(dev)])

    def fn():
        with torch.inference_mode():
            feats = model.backbone(image_list.tensors)
            proposals, _ = model.rpn(image_list, feats)
            dets, _ = model.roi_heads(feats, proposals, image_list.image_sizes)
        torch_sync(dev)
        return dets
    h, w = image_list.tensors.shape[-2:]
    return fn, lambda out: f'canvas HxW {h}x{w}, detections {len(out[0]["scores"])}'


def _jax_d2_inference(ctx: Context):
    """Our Predictor of Detectron2's checkpoint on one RGB photo (PIL resize on the host, as
    Detectron2; bool masks pasted by Detectron2's rule)."""
    p, image = ctx.d2_jax_predictor, ctx.samples[0].image
    return (lambda: p(image)), _summ_detections


def _summ_instances(inst) -> str:
    return f'detections {len(inst)}'


def _d2_inference(ctx: Context):
    """Detectron2 as users run it: `DefaultPredictor(cfg)(image_bgr)` (under no_grad: PIL resize,
    the model, detector_postprocess with its mask paste, bool masks), the result moved to the CPU
    (a no-op there)."""
    predictor, image = ctx.d2_predictor, ctx.images_bgr[0]
    dev = ctx.device

    def fn():
        out = predictor(image)['instances'].to('cpu')
        torch_sync(dev)
        return out
    return fn, _summ_instances


def _d2_forward(ctx: Context):
    """Detectron2's model alone on its preprocessed (normalized, padded) image: backbone,
    proposal generator and RoI heads (detections and 28x28 masks), without the postprocess:
    `GeneralizedRCNN.inference(do_postprocess=False)` minus `preprocess_image`."""
    import torch
    from mrcnn_jax.testing.detectron2_reference import model_input
    predictor, dev = ctx.d2_predictor, ctx.device
    model = predictor.model
    with torch.no_grad():
        images = model.preprocess_image([model_input(predictor.cfg, ctx.images_bgr[0])])

    def fn():
        with torch.no_grad():
            feats = model.backbone(images.tensor)
            proposals, _ = model.proposal_generator(images, feats, None)
            results, _ = model.roi_heads(images, feats, proposals, None)
        torch_sync(dev)
        return results
    h, w = images.tensor.shape[-2:]
    return fn, lambda out: f'canvas HxW {h}x{w}, detections {len(out[0])}'


def jax_train_setup(state_dict: dict, samples: Sequence[Sample], min_size: int, max_size: int,
                    dtype: str = 'float32'):
    """(step_fn, state, batch, mesh) of our train step on converted torchvision weights; `dtype`
    is the compute dtype of convolutions and FCs (parameters and optimizer state stay float32)."""
    from mrcnn_jax.convert import torchvision as tv_convert
    from mrcnn_jax.predictor import config_for_torchvision
    cfg = config_for_torchvision(tv_convert.model_config_from_state_dict(state_dict),
                                 min_size=min_size, max_size=max_size)
    cfg.model.backbone.frozen_stages = 2          # torchvision: trainable_backbone_layers=3
    cfg.data.class_index = 'category_id'          # torchvision's 91-way COCO head
    cfg.model.dtype = dtype
    step, state, mesh = _jax_step(cfg, tv_convert.convert_state_dict(state_dict, cfg.model))
    return step, state, train_batch(samples, cfg), mesh


def _jax_step(cfg, variables):
    """(jitted train step, its placed state, mesh) of `cfg`'s model from `variables`, one device."""
    import jax
    from mrcnn_jax.models.mask_rcnn import build_model
    from mrcnn_jax.training import optimizer, train_step as ts
    from mrcnn_jax.training.losses import LossSettings, make_loss_fn
    model = build_model(cfg.model)
    tx = optimizer.build_optimizer(cfg.train, variables['params'], cfg.model.backbone.frozen_stages)
    mesh = ts.make_mesh(jax.devices()[:1])
    state = ts.place_state(ts.create_state(variables, tx, jax.random.PRNGKey(0)), mesh)
    frozen = optimizer.frozen_param_mask(variables['params'], cfg.model.backbone.frozen_stages)
    step = ts.make_train_step(make_loss_fn(model, LossSettings.from_config(cfg.model)), tx, mesh, frozen=frozen)
    return step, state, mesh


def _jax_d2_train(ctx: Context, samples: Sequence[Sample]):
    """Our train step on Detectron2's checkpoint with its config (`Predictor.from_detectron2`'s
    model and variables; Detectron2's losses), at the benchmark's test sizing."""
    import jax
    from mrcnn_jax.training import train_step as ts
    p, s = ctx.d2_jax_predictor, ctx.settings
    cfg = copy.deepcopy(p.config)
    cfg.data.min_size, cfg.data.max_size = (s.min_size,), s.max_size
    step, state, mesh = _jax_step(cfg, jax.device_get(p.variables))
    batch = train_batch(samples, cfg)
    # category ids -> the model's labels (Detectron2's contiguous classes + 1)
    label_of = {int(c): i for i, c in enumerate(p.label_ids) if i > 0}
    batch['gt_classes'] = np.vectorize(lambda c: label_of.get(int(c), 0))(batch['gt_classes']).astype(np.int32)
    holder = {'state': state}

    def fn():
        new_state, metrics = step(holder['state'], ts.shard_batch(batch, mesh))
        holder['state'] = new_state
        return jax.device_get(metrics)
    canvas = batch['images'].shape[1:3]
    return fn, lambda m: (f'batch {len(samples)}, canvas HxW {canvas[0]}x{canvas[1]}, '
                          f'loss {float(m["loss"]):.3f}, finite {bool(m["finite"])}')


def _d2_train(ctx: Context, samples: Sequence[Sample]):
    """Detectron2's training step on the same checkpoint: its model in train mode (FrozenBN, stem
    and res2 frozen by FREEZE_AT), SGD as ours at step 0, on the photos resized by its
    ResizeShortestEdge (PIL) with their GT boxes, contiguous classes and bit masks."""
    import torch
    from detectron2.data import transforms as T
    from detectron2.structures import BitMasks, Boxes, Instances
    from PIL import Image
    dev, s = ctx.device, ctx.settings
    model = copy.deepcopy(ctx.d2_predictor.model).to(dev)
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr=TORCH_LR, momentum=0.9, weight_decay=1e-4)
    contiguous = {int(c): i - 1 for i, c in enumerate(ctx.d2_jax_predictor.label_ids) if i > 0}
    resize = T.ResizeShortestEdge([s.min_size, s.min_size], s.max_size)
    inputs = []
    for x in samples:
        bgr = np.ascontiguousarray(x.image[:, :, ::-1])
        tf = resize.get_transform(bgr)
        img = tf.apply_image(bgr)
        rh, rw = img.shape[:2]
        inst = Instances((rh, rw))
        inst.gt_boxes = Boxes(torch.from_numpy(tf.apply_box(x.boxes).astype(np.float32)))
        inst.gt_classes = torch.as_tensor([contiguous[int(c)] for c in x.classes], dtype=torch.int64)
        inst.gt_masks = BitMasks(torch.from_numpy(np.stack([
            np.asarray(Image.fromarray(m).resize((rw, rh), Image.NEAREST)) for m in x.masks]) > 0))
        inputs.append({'image': torch.as_tensor(img.transpose(2, 0, 1).astype('float32')), 'instances': inst})

    def losses():
        from detectron2.utils.events import EventStorage
        with EventStorage():
            return model([{k: v.to(dev) for k, v in d.items()} for d in inputs])
    return _sgd_step(opt, dev, losses), lambda loss: f'batch {len(samples)}, loss {loss:.3f}'


def _jax_train(ctx: Context, samples: Sequence[Sample], min_size: int, max_size: int,
               dtype: str = 'float32', prefetch: bool = False):
    """Our train step on `samples`; with `prefetch` the batch is on the device before the timed
    calls (an input pipeline's prefetch), else each call transfers it, as torch's side does."""
    import jax
    from mrcnn_jax.training import train_step as ts
    step, state, batch, mesh = jax_train_setup(ctx.state_dict, samples, min_size, max_size, dtype=dtype)
    holder = {'state': state}
    device_batch = ts.shard_batch(batch, mesh) if prefetch else None

    def fn():
        new_state, metrics = step(holder['state'], device_batch if prefetch else ts.shard_batch(batch, mesh))
        holder['state'] = new_state
        return jax.device_get(metrics)
    canvas = batch['images'].shape[1:3]
    return fn, lambda m: (f'batch {len(samples)}, canvas HxW {canvas[0]}x{canvas[1]}, '
                          f'loss {float(m["loss"]):.3f}, finite {bool(m["finite"])}')


def _torch_train(ctx: Context, samples: Sequence[Sample], canvas_size: int | None = None,
                 bf16: bool = False, prefetch: bool = False):
    """torchvision's train step on `samples` (SGD as ours at step 0); `canvas_size` sets its
    transform's min and max size; `bf16`: autocast; `prefetch` as in `_jax_train`."""
    import torch
    from mrcnn_jax.testing.torchvision_reference import image_to_tensor
    dev = ctx.device
    model = copy.deepcopy(ctx.tv_model).to(dev)
    if canvas_size is not None:
        model.transform.min_size, model.transform.max_size = (canvas_size,), canvas_size
    model.train()    # FrozenBN stays frozen; conv1 + layer1 have requires_grad False
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=TORCH_LR, momentum=0.9, weight_decay=1e-4)
    images = [image_to_tensor(x.image) for x in samples]
    targets = [{'boxes': torch.from_numpy(x.boxes), 'labels': torch.from_numpy(x.classes),
                'masks': torch.from_numpy(x.masks)} for x in samples]

    def to_device():
        return [x.to(dev) for x in images], [{k: v.to(dev) for k, v in t.items()} for t in targets]
    on_device = to_device() if prefetch else None

    def losses():
        xs, ts = on_device if prefetch else to_device()
        with _torch_autocast(dev, bf16):
            return model(xs, ts)
    return _sgd_step(opt, dev, losses), lambda loss: f'batch {len(samples)}, loss {loss:.3f}'


def _sgd_step(opt, dev, losses: Callable[[], dict]) -> Callable[[], float]:
    """One torch training step: the summed loss dict's backward and the optimizer's step."""
    def fn():
        loss = sum(losses().values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        torch_sync(dev)
        return float(loss.detach())
    return fn


def _throughput_samples(ctx: Context) -> list[Sample]:
    s = ctx.settings
    return ctx.get('throughput_samples', lambda: _cycle(
        [letterbox(x, s.throughput_size) for x in ctx.samples], s.throughput_batch))


# -- micro-benchmarks --------------------------------------------------------------------------
def _roi_params(s: Settings, out: int) -> str:
    n = s.rois_7 if out == 7 else s.rois_14
    return f'{n} RoIs x 256 ch -> {out}x{out}, P2-P5 of {s.micro_canvas[0]}x{s.micro_canvas[1]}, sampling 2'


def _jax_roi_align(ctx: Context, out: int, method: str):
    import jax
    from mrcnn_jax.ops.roi_align import multilevel_roi_align
    feats, boxes = roi_inputs(ctx.settings, out)
    feats, boxes = jax.device_put((feats, boxes[None]))
    f = jax.jit(lambda fs, bx: multilevel_roi_align(fs, bx, (out, out), 2, False, scales=POOLER_SCALES,
                                                    method=method))
    return (lambda: jax.block_until_ready(f(feats, boxes))), None


def _torch_roi_align(ctx: Context, out: int):
    import torch
    from torchvision.ops import MultiScaleRoIAlign
    dev = ctx.device
    feats, boxes = roi_inputs(ctx.settings, out)
    x = {str(i): torch.from_numpy(f.transpose(0, 3, 1, 2).copy()).to(dev) for i, f in enumerate(feats)}
    b = [torch.from_numpy(boxes).to(dev)]
    pool = MultiScaleRoIAlign([str(i) for i in range(len(feats))], out, 2)
    hw = [tuple(ctx.settings.micro_canvas)]

    def fn():
        with torch.inference_mode():
            r = pool(x, b, hw)
        torch_sync(dev)
        return r
    return fn, None


def _jax_nms(ctx: Context, n: int):
    import jax
    import jax.numpy as jnp
    from mrcnn_jax.ops.nms import nms
    boxes, scores = jax.device_put(nms_inputs(ctx.settings, n))
    f = jax.jit(lambda b, s: nms(b, s, jnp.ones(s.shape, bool), 0.7, n))
    return (lambda: jax.block_until_ready(f(boxes, scores))), \
        (lambda out: f'kept {int(np.asarray(out[1]).sum())}')


def _torch_nms(ctx: Context, n: int):
    import torch
    import torchvision
    dev = ctx.device
    boxes, scores = (torch.from_numpy(a).to(dev) for a in nms_inputs(ctx.settings, n))

    def fn():
        keep = torchvision.ops.nms(boxes, scores, 0.7)
        torch_sync(dev)
        return keep
    return fn, lambda keep: f'kept {len(keep)}'


def _jax_paste(ctx: Context):
    # Host-side numpy (no JAX program): what the Predictor / evaluation run after `predict`.
    from mrcnn_jax.evaluation.rle import paste_masks_to_rle
    masks, boxes = paste_inputs(ctx.settings)
    return (lambda: paste_masks_to_rle(masks, boxes, PASTE_IMAGE_HW)), None


def _torch_paste(ctx: Context):
    import torch
    from pycocotools import mask as mask_util
    from torchvision.models.detection.roi_heads import paste_masks_in_image
    dev = ctx.device
    masks, boxes = (torch.from_numpy(a).to(dev) for a in paste_inputs(ctx.settings))

    def fn():
        with torch.inference_mode():
            pasted = paste_masks_in_image(masks[:, None], boxes, PASTE_IMAGE_HW, padding=1)
            binary = (pasted > 0.5).cpu().numpy()
        # torchvision's references/detection/coco_eval.py, prepare_for_coco_segmentation
        rles = [mask_util.encode(np.array(m[0, :, :, np.newaxis], dtype=np.uint8, order='F'))[0]
                for m in binary]
        for rle in rles:
            rle['counts'] = rle['counts'].decode('utf-8')
        return rles
    return fn, None


# -- by name -----------------------------------------------------------------------------------
def build_case(name: str, side: str, ctx: Context) -> tuple[Callable[[], Any], Callable[[Any], str] | None]:
    j, s = side == 'jax', ctx.settings
    if side in D2_SIDES:
        if name not in D2_CASES:
            raise ValueError(f'case {name!r} has no side {side!r} (Detectron2 runs in {", ".join(D2_CASES)})')
        if name == 'inference_b1':
            return _jax_d2_inference(ctx) if side == 'jax_d2' else _d2_inference(ctx)
        if name == 'train_step_b2':
            samples = ctx.samples[:TRAIN_BATCH]
            return _jax_d2_train(ctx, samples) if side == 'jax_d2' else _d2_train(ctx, samples)
        return _jax_forward(ctx, ctx.d2_jax_predictor) if side == 'jax_d2' else _d2_forward(ctx)
    if side not in SIDES:
        raise ValueError(f'unknown side {side!r}; known: {", ".join(ALL_SIDES)}')
    if name in ('inference_b1', 'inference_b4'):
        b = 1 if name == 'inference_b1' else 4
        return _jax_inference(ctx, b) if j else _torch_inference(ctx, b)
    if name == 'forward_b1':
        return _jax_forward(ctx) if j else _torch_forward(ctx)
    if name == 'train_step_b2':
        samples = ctx.samples[:TRAIN_BATCH]
        return (_jax_train(ctx, samples, s.min_size, s.max_size) if j else _torch_train(ctx, samples))
    if name.startswith('roi_align_'):
        _, _, size, method = name.split('_')
        out = int(size.split('x')[0])
        return _jax_roi_align(ctx, out, method) if j else _torch_roi_align(ctx, out)
    if name.startswith('nms_'):
        n = int(name.split('_')[1])
        return _jax_nms(ctx, n) if j else _torch_nms(ctx, n)
    if name == 'paste_rle_100':
        return _jax_paste(ctx) if j else _torch_paste(ctx)
    if name == 'train_1024_bf16':
        samples, size = _throughput_samples(ctx), s.throughput_size
        return (_jax_train(ctx, samples, size, size, 'bfloat16', prefetch=True) if j else
                _torch_train(ctx, samples, size, bf16=True, prefetch=True))
    if name == 'inference_bf16_b8':
        return (_jax_inference(ctx, s.infer_batch, 'bfloat16') if j else
                _torch_inference(ctx, s.infer_batch, bf16=True))
    raise ValueError(f'unknown case {name!r}; known: {", ".join(CASES)}')


def case_params(name: str, ctx: Context) -> str:
    s = ctx.settings
    if name in MODEL_CASES:
        n = {'inference_b1': 1, 'inference_b4': 4, 'forward_b1': 1, 'train_step_b2': TRAIN_BATCH}[name]
        shapes = ', '.join(f'{x.image.shape[1]}x{x.image.shape[0]}' for x in ctx.samples[:n])
        return f'{s.min_size}/{s.max_size} sizing, images {shapes}'
    if name.startswith('roi_align_'):
        return _roi_params(s, int(name.split('_')[2].split('x')[0]))
    if name.startswith('nms_'):
        return f'N={name.split("_")[1]} clustered boxes, IoU 0.7, all kept boxes returned'
    if name == 'train_1024_bf16':
        return (f'{s.throughput_batch} photos letterboxed on {s.throughput_size}x{s.throughput_size}, '
                f'bf16 compute (torch autocast), fp32 params')
    if name == 'inference_bf16_b8':
        return f'{s.infer_batch} photos, {s.min_size}/{s.max_size} sizing, bf16 compute (torch autocast)'
    if name == 'paste_rle_100':
        return f'{s.paste_n} masks 28x28 -> {PASTE_IMAGE_HW[0]}x{PASTE_IMAGE_HW[1]}, > 0.5, RLE'
    return ''
