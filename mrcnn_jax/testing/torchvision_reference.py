"""torchvision reference models for parity tests and benchmarks: random, seeded, not degenerate.

`build_torchvision_maskrcnn` builds what `maskrcnn_resnet50_fpn(weights=COCO_V1)` builds
(FrozenBatchNorm2d with eps 0, 3 trainable backbone layers: `torchvision_architecture`, also
what a saved state_dict is loaded into) with random weights:
  * frozen-BN statistics are calibrated on an image, as in a trained network: each BN's
    running mean / variance are its input's per-channel statistics, perturbed, and its affine
    weight / bias random around (1, 0). Activations then stay O(1) through the 50 layers; with
    random statistics they grow to O(1e3) and every downstream number (RPN deltas of 100,
    boxes decoded far outside the image) becomes a test of float32 cancellation, not of the model;
  * the classifier is calibrated so that softmax scores spread over (0.05, 1) and vary by RoI:
    random fc7 features share a large common component, so raw random weights give near-uniform
    1/91 scores (no detection passes 0.05) or, scaled up, one class winning everywhere with
    saturated, tied scores. We project the mean fc7 feature out of the classifier weights and
    scale them to a chosen logit spread (`cls_logit_std`);
  * all the rest keeps torchvision's own initialisation under a fixed seed.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision
from torchvision.models.detection import FasterRCNN, KeypointRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection._utils import overwrite_eps
from torchvision.ops import misc as misc_nn_ops


def _calibrate_frozen_bn(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Set every FrozenBN's statistics from its input on a calibration image (in forward order)."""
    def hook(m, args):
        x = args[0]
        c = x.shape[1]
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3))
        m.running_mean.copy_(mean + 0.1 * var.sqrt() * torch.randn(c, generator=gen))
        m.running_var.copy_(var * (0.8 + 0.4 * torch.rand(c, generator=gen)) + 1e-3)
        m.weight.copy_(0.5 + torch.rand(c, generator=gen))
        m.bias.copy_(0.2 * torch.randn(c, generator=gen))
    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, misc_nn_ops.FrozenBatchNorm2d)]
    images, _ = model.transform([_calibration_image(gen)])
    model.backbone.body(images.tensors)
    for h in handles:
        h.remove()


def _calibration_image(gen: torch.Generator) -> torch.Tensor:
    """A smooth random image (blobs and edges at several scales), closer to photo statistics
    than white noise, so that calibrated statistics transfer to real photos."""
    img = torch.zeros(1, 3, 256, 320)
    for cells in ((4, 5), (16, 20), (64, 80)):
        noise = torch.rand(1, 3, *cells, generator=gen)
        img += torch.nn.functional.interpolate(noise, size=(256, 320), mode='bilinear', align_corners=False)
    return (img[0] / 3).clamp(0, 1)


def _calibrate_rpn(model: torch.nn.Module, images: list[torch.Tensor], logit_std: float, delta_std: float) -> None:
    """Scale the RPN outputs to a trained network's range: objectness logits with a moderate
    spread (a saturated sigmoid makes thousands of proposals tie at 1.0 in float32) and box
    deltas of ~0.1 (random weights give deltas of ~5, decoded boxes far outside the image)."""
    logits, deltas = [], []
    for im in images:
        il, _ = model.transform([im])
        o, d = model.rpn.head(list(model.backbone(il.tensors).values()))
        logits += [x.flatten() for x in o]
        deltas += [x.flatten() for x in d]
    head = model.rpn.head
    head.cls_logits.weight.mul_(logit_std / torch.cat(logits).std())
    head.cls_logits.bias.zero_()
    head.bbox_pred.weight.mul_(delta_std / torch.cat(deltas).std())
    head.bbox_pred.bias.zero_()


def _calibrate_classifier(model: torch.nn.Module, gen: torch.Generator, logit_std: float,
                          images: list[torch.Tensor]) -> None:
    model.eval()
    xs = []
    for im in images:
        il, _ = model.transform([im])
        features = model.backbone(il.tensors)
        proposals, _ = model.rpn(il, features)
        xs.append(model.roi_heads.box_head(model.roi_heads.box_roi_pool(features, proposals, il.image_sizes)))
    x = torch.cat(xs)
    mu = x.mean(0)
    mu = mu / mu.norm()
    layer = model.roi_heads.box_predictor.cls_score
    w = torch.randn(layer.weight.shape, generator=gen)
    w = w - (w @ mu)[:, None] * mu[None, :]
    std = (x @ w.T).std()
    layer.weight.copy_(w * (logit_std / std))
    layer.bias.zero_()
    # Class-specific box deltas of a trained head's size (~0.1 after the 10, 10, 5, 5 weights),
    # not the image-wide slivers random weights decode to.
    reg = model.roi_heads.box_predictor.bbox_pred
    reg.weight.mul_(1.0 / reg(x).std())
    reg.bias.zero_()


def torchvision_architecture(depth: int = 50, mask: bool = True, num_classes: int = 91,
                             keypoints: int = 0, **kwargs) -> torch.nn.Module:
    """torchvision's {mask,faster}rcnn_resnet{depth}_fpn as the v1 COCO weights load it
    (FrozenBatchNorm2d with eps 0, 3 trainable backbone layers), with torchvision's own random
    initialisation from the global torch seed; `kwargs` go to MaskRCNN / FasterRCNN (min_size,
    max_size, ...). keypoints = K > 0: keypointrcnn_resnet{depth}_fpn with K keypoints (no mask).
    For loading a saved state_dict, and the start of `build_torchvision_maskrcnn`."""
    resnet = {50: torchvision.models.resnet50, 18: torchvision.models.resnet18,
              101: torchvision.models.resnet101}[depth]
    body = resnet(weights=None, norm_layer=misc_nn_ops.FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(body, 3)
    if keypoints:
        k = None if 'keypoint_predictor' in kwargs else keypoints   # torchvision takes one or the other
        model = KeypointRCNN(backbone, num_classes=num_classes, num_keypoints=k, **kwargs)
    else:
        model = (MaskRCNN if mask else FasterRCNN)(backbone, num_classes=num_classes, **kwargs)
    overwrite_eps(model, 0.0)
    return model


def _calibrate_keypoint_logits(model: torch.nn.Module, images: list[torch.Tensor], logit_std: float) -> None:
    """Heatmap logits of a trained head's spread (std `logit_std` over the 56 x 56 cells):
    torchvision's random init gives logits of std ~0.05 whose softmax is nearly uniform and whose
    maxima differ from the runner-up by float32 noise. Scaled, each map keeps its random but
    smooth relief, and the argmax of the bicubic upsample is well separated."""
    layer = model.roi_heads.keypoint_predictor.kps_score_lowres
    maps = []
    hook = layer.register_forward_hook(lambda m, args, out: maps.append(out))
    for im in images:
        model([im])
    hook.remove()
    x = torch.cat(maps)
    layer.weight.mul_(logit_std / (x - layer.bias[None, :, None, None]).std())
    layer.bias.zero_()


@torch.no_grad()
def build_torchvision_maskrcnn(seed: int = 0, depth: int = 50, mask: bool = True, num_classes: int = 91,
                               cls_logit_std: float = 3.0, rpn_logit_std: float = 0.5,
                               rpn_delta_std: float = 0.1, calibration_images=(), keypoints: int = 0,
                               keypoint_logit_std: float = 3.0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = torchvision_architecture(depth, mask, num_classes, keypoints=keypoints, **kwargs)
    _calibrate_frozen_bn(model, gen)
    cal = [image_to_tensor(im) for im in calibration_images] or [_calibration_image(gen)]
    _calibrate_rpn(model, cal, rpn_logit_std, rpn_delta_std)
    _calibrate_classifier(model, gen, cls_logit_std, cal)
    model.eval()
    if keypoints:
        _calibrate_keypoint_logits(model, cal, keypoint_logit_std)
    return model


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def image_to_tensor(image_u8: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float in [0, 1], as torchvision.transforms.functional.to_tensor."""
    return torch.from_numpy(np.ascontiguousarray(image_u8)).permute(2, 0, 1).float().div(255)


def _rpn_with_scores(rpn, images, features):
    """RegionProposalNetwork.forward (eval) that also returns the proposals' scores."""
    from torchvision.models.detection.rpn import concat_box_prediction_layers
    feats = list(features.values())
    objectness, deltas = rpn.head(feats)
    anchors = rpn.anchor_generator(images, feats)
    num_per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
    return rpn.filter_proposals(proposals, objectness, images.image_sizes, num_per_level)


@torch.no_grad()
def run_stages(model: torch.nn.Module, image_u8: np.ndarray) -> dict:
    """torchvision inference on one image, keeping the intermediate stages."""
    x = image_to_tensor(image_u8)
    original = [tuple(x.shape[-2:])]
    images, _ = model.transform([x])
    features = model.backbone(images.tensors)
    proposals, proposal_scores = _rpn_with_scores(model.rpn, images, features)
    detections, _ = model.roi_heads(features, proposals, images.image_sizes)
    raw = [{k: v.clone() for k, v in d.items()} for d in detections]
    final = model.transform.postprocess(detections, images.image_sizes, original)
    return {
        'input': images.tensors[0].permute(1, 2, 0).numpy(),
        'image_size': tuple(images.image_sizes[0]),
        'features': {k: v[0].permute(1, 2, 0).numpy() for k, v in features.items()},
        'proposals': proposals[0].numpy(),
        'proposal_scores': proposal_scores[0].numpy(),
        'raw': {k: v.numpy() for k, v in raw[0].items()},
        'final': {k: v.numpy() for k, v in final[0].items()},
    }
