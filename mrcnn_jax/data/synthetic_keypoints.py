"""A generated COCO person-keypoints dataset of stick figures: the keypoint demo's data and tests.

`generate(out_dir, num_images, image_size, seed, split_name)` writes, like `synthetic.generate`,
    out_dir/annotations_<split>.json   COCO person keypoints: one category 'person' (id 1) with
                                       the 13 `KEYPOINT_NAMES` and the `SKELETON` (1-based, as
                                       COCO's json); per figure `keypoints` (x, y, v) * 13,
                                       `num_keypoints`, and, from the exact mask of its visible
                                       part, a compressed-RLE `segmentation`, `bbox` and `area`
    out_dir/<split>/000000.png ...     RGB images
deterministic per (seed, split_name). `data.source='synthetic'` with `data.synthetic_task=
'keypoints'` selects it (`synthetic.ensure_synthetic` caches it like the shapes).

A figure: a filled torso (a trapezoid from the shoulders to the hips), a disc for the head on a
neck, and two-segment arms and legs as thick strokes with round ends, in random pose (each
shoulder from hanging to raised, each elbow and knee bent either way, a lean of up to 15 degrees),
proportions, size (38-72 % of the image height) and colour (limbs a darker shade of the body).
Figures face the camera: the figure's left side is on the image's right, as for a person facing
the photographer, so left and right follow from the body's layout and the names' left_/right_
pairs give the horizontal-flip permutation (`metadata.keypoint_flip_map`). 1-3 figures per image on
the shapes dataset's textured background, drawn in z-order: a later figure may hide part of an
earlier one, which keeps at least 70 % of its area and loses at most 3 joints to it (and the two
figures' boxes overlap by IoU <= 0.3).

Keypoint coordinates are pixel indices, as in COCO (the centre of pixel (i, j) is (x, y) = (j, i);
the figures are drawn in that frame). Visibility, COCO's flags:
    v = 2  labelled and visible: the joint's pixel belongs to the figure's visible part
    v = 1  labelled, not visible: hidden behind a later figure (still a target, as in COCO)
    v = 0  not labelled, (x, y, v) = (0, 0, 0): outside the image (a figure may stand partly
           outside it), or dropped at random (2 % of the visible joints, as an annotator skips one)

OKS sigmas (keypoint AP, `evaluation/keypoints.py`): the 12 joints that COCO's person has get
COCO's sigmas (shoulders 0.079, elbows 0.072, wrists 0.062, hips 0.107, knees 0.087, ankles
0.089), so the metric is as strict as COCO's per joint; 'head', the centre of the head's disc,
which COCO does not annotate, gets the shoulders' 0.079. Areas are those of the visible masks,
as COCO's.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from mrcnn_jax.data import synthetic

VERSION = 1           # bump when the generator's output changes: cached datasets regenerate

KEYPOINT_NAMES = (
    'head', 'left_shoulder', 'right_shoulder', 'left_elbow', 'right_elbow', 'left_wrist',
    'right_wrist', 'left_hip', 'right_hip', 'left_knee', 'right_knee', 'left_ankle', 'right_ankle',
)
# Pairs of keypoint indices (0-based) joined by a line when drawn.
SKELETON = ((0, 1), (0, 2), (1, 2), (1, 3), (3, 5), (2, 4), (4, 6), (1, 7), (2, 8), (7, 8),
            (7, 9), (9, 11), (8, 10), (10, 12))
OKS_SIGMAS = (0.079, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087, 0.087,
              0.089, 0.089)
CATEGORIES = ({'id': 1, 'name': 'person', 'supercategory': 'person',
               'keypoints': list(KEYPOINT_NAMES),
               'skeleton': [[a + 1, b + 1] for a, b in SKELETON]},)

_MIN_VISIBLE = 0.7        # fraction of a figure's area that must stay visible
_MAX_BOX_IOU = 0.3        # between the boxes of two figures (whole figures, hidden parts too)
_MAX_HIDDEN_JOINTS = 3    # joints a later figure may hide
_DROP_LABEL = 0.02        # chance that a visible joint is left unlabelled (v = 0)
_NUM_FIGURES = (1, 3)     # per image, inclusive


def _pose(rng: np.random.Generator) -> tuple[np.ndarray, float, float, float]:
    """One figure in its own frame (unit: the figure's height; pelvis centre at 0; y down).

    Returns (joints [13, 2] float64 in KEYPOINT_NAMES order, head radius, limb width, the
    torso's width at the shoulders); the figure's left (+x) is the image's right.
    """
    torso = rng.uniform(0.30, 0.35)
    shoulders = rng.uniform(0.22, 0.30)
    hips = rng.uniform(0.15, 0.20)
    neck = 0.05
    head_r = rng.uniform(0.075, 0.09)
    upper_arm, forearm = rng.uniform(0.16, 0.19), rng.uniform(0.14, 0.17)
    thigh, shin = rng.uniform(0.21, 0.25), rng.uniform(0.20, 0.24)
    limb = rng.uniform(0.06, 0.08)
    j = np.zeros((len(KEYPOINT_NAMES), 2))
    j[0] = (0.0, -torso - neck - head_r)
    for side, s in ((0, 1.0), (1, -1.0)):       # left (+x), right (-x)
        def step(start, length, angle):         # angle from straight down, outward positive
            return start + length * np.array([s * math.sin(angle), math.cos(angle)])
        shoulder = np.array([s * shoulders / 2, -torso])
        a1 = math.radians(rng.uniform(-20, 170))
        a2 = a1 + math.radians(rng.uniform(-110, 110))
        elbow = step(shoulder, upper_arm, a1)
        hip = np.array([s * hips / 2, 0.0])
        t1 = math.radians(rng.uniform(-10, 50))
        t2 = t1 + math.radians(rng.uniform(-50, 50))
        knee = step(hip, thigh, t1)
        j[1 + side], j[3 + side], j[5 + side] = shoulder, elbow, step(elbow, forearm, a2)
        j[7 + side], j[9 + side], j[11 + side] = hip, knee, step(knee, shin, t2)
    lean = math.radians(rng.uniform(-15, 15))
    rot = np.array([[math.cos(lean), -math.sin(lean)], [math.sin(lean), math.cos(lean)]])
    return j @ rot.T, head_r, limb, shoulders


def _draw_figure(joints: np.ndarray, head_r: float, limb: float, size: int) -> np.ndarray:
    """[size, size] uint8 label map of one figure in image pixels: 1 torso and head, 2 limbs
    and neck (drawn over the torso), 0 elsewhere. Aliased drawing: exact, binary."""
    canvas = Image.new('L', (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    pt = [tuple(float(v) for v in p) for p in joints]
    draw.polygon([pt[1], pt[2], pt[8], pt[7]], fill=1)                    # torso
    hx, hy = pt[0]
    draw.ellipse([hx - head_r, hy - head_r, hx + head_r, hy + head_r], fill=1)
    width = max(2, int(round(limb)))
    neck = tuple((np.asarray(pt[1]) + np.asarray(pt[2])) / 2)
    strokes = [(pt[0], neck)] + [(pt[a], pt[b]) for a, b in ((1, 3), (3, 5), (2, 4), (4, 6),
                                                             (7, 9), (9, 11), (8, 10), (10, 12))]
    r = width / 2
    for a, b in strokes:
        draw.line([a, b], fill=2, width=width)
        for x, y in (a, b):                                              # round ends and joints
            draw.ellipse([x - r, y - r, x + r, y + r], fill=2)
    draw.ellipse([hx - head_r, hy - head_r, hx + head_r, hy + head_r], fill=1)   # head on top
    return np.asarray(canvas)


def _joint_pixels(joints: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(inside [13] bool: the joint lies in the image, rows/cols [13, 2] int of its pixel)."""
    inside = ((joints >= -0.5) & (joints < size - 0.5)).all(axis=1)
    pix = np.clip(np.round(joints).astype(np.int64), 0, size - 1)
    return inside, pix[:, ::-1]


def _mask_box(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float64)


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _place(rng: np.random.Generator, size: int):
    """A posed figure in image pixels: (joints [13, 2], head radius px, limb width px)."""
    joints, head_r, limb, _ = _pose(rng)
    height = rng.uniform(0.38, 0.72) * size
    joints = joints * height
    head_r *= height
    limb *= height
    lo = joints.min(0) - [limb, limb]
    lo[1] = min(lo[1], joints[0, 1] - head_r)
    hi = joints.max(0) + [limb, limb]
    extent = hi - lo
    # mostly inside the image; one figure in six may stand up to 15 % of its size outside it
    slack = extent * (0.15 if rng.random() < 1 / 6 else 0.0)
    low = -lo - slack
    high = size - hi + slack
    offset = np.where(high > low, rng.uniform(low, np.maximum(high, low + 1e-6)), (low + high) / 2)
    return joints + offset, head_r, limb


def _render(rng: np.random.Generator, size: int):
    """One image: ([size, size, 3] uint8, [(visible mask, keypoints [13, 3]), ...])."""
    image = synthetic._background(rng, size)
    count = int(rng.integers(_NUM_FIGURES[0], _NUM_FIGURES[1] + 1))
    figures: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for _ in range(count):
        for _attempt in range(30):
            joints, head_r, limb = _place(rng, size)
            labels = _draw_figure(joints, head_r, limb, size)
            mask = labels > 0
            if mask.sum() < 0.01 * size * size:
                continue
            inside, pix = _joint_pixels(joints, size)
            # every earlier figure keeps >= 70 % of its area and loses <= 3 joints under this one
            box = _mask_box(mask)
            covered = mask.copy()
            ok = True
            for _, other, other_joints, _ in reversed(figures):
                visible = other & ~covered
                o_inside, o_pix = _joint_pixels(other_joints, size)
                hidden = o_inside & covered[o_pix[:, 0], o_pix[:, 1]]
                if (visible.sum() < _MIN_VISIBLE * other.sum() or hidden.sum() > _MAX_HIDDEN_JOINTS
                        or _box_iou(box, _mask_box(other)) > _MAX_BOX_IOU):
                    ok = False
                    break
                covered |= other
            if ok:
                hue = rng.random()
                body = synthetic._hsv(hue, rng.uniform(0.6, 1.0), rng.uniform(0.65, 1.0))
                figures.append((labels, mask, joints, np.stack([body, body * 0.7])))
                break
    for labels, _, _, colours in figures:
        image[labels == 1] = colours[0]
        image[labels == 2] = colours[1]
    image += rng.normal(0.0, 4.0, image.shape).astype(np.float32)
    pixels = np.clip(np.round(image), 0, 255).astype(np.uint8)
    objects = []
    above = np.zeros((size, size), bool)
    for _, mask, joints, _ in reversed(figures):
        visible = mask & ~above
        inside, pix = _joint_pixels(joints, size)
        seen = visible[pix[:, 0], pix[:, 1]]
        v = np.where(inside, np.where(seen, 2, 1), 0)
        v = np.where((v == 2) & (rng.random(len(v)) < _DROP_LABEL), 0, v)
        kps = np.concatenate([np.round(joints, 2), v[:, None].astype(np.float64)], axis=1)
        kps[v == 0] = 0.0
        objects.append((visible, kps))
        above |= mask
    return pixels, objects[::-1]


def generate(out_dir: str, num_images: int, image_size: int = 256, seed: int = 0,
             split_name: str = 'train') -> str:
    """Writes the split (module docstring); returns the annotation json path."""
    rng = synthetic._rng(seed, f'keypoints/{split_name}')

    def renders():
        for _ in range(num_images):
            pixels, objects = _render(rng, image_size)
            yield pixels, [(1, visible, {'keypoints': [float(v) for v in kps.ravel()],
                                         'num_keypoints': int((kps[:, 2] > 0).sum())})
                           for visible, kps in objects]
    return synthetic.write_split(
        out_dir, split_name, renders(), CATEGORIES,
        {'description': f'mrcnn_jax synthetic keypoint figures v{VERSION}', 'seed': seed,
         'split': split_name})
