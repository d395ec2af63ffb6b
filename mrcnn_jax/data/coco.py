"""COCO instances json → validated per-image records; segmentation (polygons / RLE) → masks.

Two levels of checks, both counted in a `SkipLog` (or raised with `strict=True`):
    * `load_coco_json`: the json itself. Unparsable json or a broken top-level structure is a
      `DataError` naming the file; a bad annotation (missing field, unknown image or category,
      w or h <= 0, non-finite numbers, undecodable segmentation) is skipped, naming its id.
    * `build_instances`: one image with its real size: boxes are clipped to the image; a box
      with no overlap is skipped.
Images without annotations (negatives) are kept.

Keypoints (a category's `keypoints` names; K of them per dataset):
    * an annotation whose `keypoints` are not 3 * K finite numbers with visibility flags 0, 1
      or 2 is skipped (`bad_keypoints`; a DataError when strict). K is the categories' list; a
      json without names takes K from the config (`load_coco_json(num_keypoints=...)`), else
      from its annotations (the most keypoints any has).
    * a labelled keypoint outside the image becomes (0, 0, 0), 'not labelled', as Detectron2
      marks out-of-image keypoints (counted: note `keypoint_outside_image`); one outside its box
      is kept (both references' keypoint targets ignore it; note `keypoint_outside_box`); an
      instance with no labelled keypoint stays a box instance (note `no_labelled_keypoints`).

Conventions: `bbox` [x, y, w, h] → xyxy in pixels, the image spanning [0, W] x [0, H] (COCO and
torchvision alike); keypoints kept as given (x, y, v) in pixels.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from mrcnn_jax.data import files
from mrcnn_jax.data import validation as val
from mrcnn_jax.data.validation import DataError, SkipLog

# COCO 2017 detection categories: (id, name), ids 1..90 with gaps; tfds 'coco/2017' labels 0..79
# index this list in order.
COCO_CATEGORIES = (
    (1, 'person'), (2, 'bicycle'), (3, 'car'), (4, 'motorcycle'), (5, 'airplane'), (6, 'bus'),
    (7, 'train'), (8, 'truck'), (9, 'boat'), (10, 'traffic light'), (11, 'fire hydrant'),
    (13, 'stop sign'), (14, 'parking meter'), (15, 'bench'), (16, 'bird'), (17, 'cat'),
    (18, 'dog'), (19, 'horse'), (20, 'sheep'), (21, 'cow'), (22, 'elephant'), (23, 'bear'),
    (24, 'zebra'), (25, 'giraffe'), (27, 'backpack'), (28, 'umbrella'), (31, 'handbag'),
    (32, 'tie'), (33, 'suitcase'), (34, 'frisbee'), (35, 'skis'), (36, 'snowboard'),
    (37, 'sports ball'), (38, 'kite'), (39, 'baseball bat'), (40, 'baseball glove'),
    (41, 'skateboard'), (42, 'surfboard'), (43, 'tennis racket'), (44, 'bottle'),
    (46, 'wine glass'), (47, 'cup'), (48, 'fork'), (49, 'knife'), (50, 'spoon'), (51, 'bowl'),
    (52, 'banana'), (53, 'apple'), (54, 'sandwich'), (55, 'orange'), (56, 'broccoli'),
    (57, 'carrot'), (58, 'hot dog'), (59, 'pizza'), (60, 'donut'), (61, 'cake'), (62, 'chair'),
    (63, 'couch'), (64, 'potted plant'), (65, 'bed'), (67, 'dining table'), (70, 'toilet'),
    (72, 'tv'), (73, 'laptop'), (74, 'mouse'), (75, 'remote'), (76, 'keyboard'),
    (77, 'cell phone'), (78, 'microwave'), (79, 'oven'), (80, 'toaster'), (81, 'sink'),
    (82, 'refrigerator'), (84, 'book'), (85, 'clock'), (86, 'vase'), (87, 'scissors'),
    (88, 'teddy bear'), (89, 'hair drier'), (90, 'toothbrush'),
)

COCO_PERSON_KEYPOINTS = (
    'nose', 'left_eye', 'right_eye', 'left_ear', 'right_ear', 'left_shoulder', 'right_shoulder',
    'left_elbow', 'right_elbow', 'left_wrist', 'right_wrist', 'left_hip', 'right_hip',
    'left_knee', 'right_knee', 'left_ankle', 'right_ankle',
)

# COCO's person skeleton as its json gives it: pairs of 1-based indices into
# COCO_PERSON_KEYPOINTS (category 'skeleton' of person_keypoints_*.json).
COCO_PERSON_SKELETON = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9),
    (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)

MISSING_SEGMENTATION = 'missing_segmentation'


@dataclasses.dataclass(frozen=True)
class ImageEntry:
    id: int
    file_name: str
    height: int | None   # None: not in the json; taken from the image
    width: int | None


@dataclasses.dataclass(frozen=True)
class Annotation:
    id: int
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]   # COCO [x, y, w, h], w > 0 and h > 0
    is_crowd: bool
    area: float                               # the json's area; <= 0 when absent
    segmentation: Any                         # polygons (list of lists), RLE dict, or None
    keypoints: tuple[float, ...] | None       # flat (x, y, v) * K


@dataclasses.dataclass
class CocoDataset:
    """A validated COCO instances json. `annotations[image_id]` keeps json order."""
    path: str
    images: list[ImageEntry]
    annotations: dict[int, list[Annotation]]
    categories: list[dict]                    # sorted by id: {'id', 'name', ...}
    keypoint_names: tuple[str, ...]           # () when no category has keypoints
    has_segmentation: bool                    # any annotation carries a segmentation
    skips: SkipLog
    keypoint_skeleton: tuple[tuple[int, int], ...] = ()   # 0-based index pairs (the json's are 1-based)

    @property
    def category_ids(self) -> list[int]:
        return [c['id'] for c in self.categories]

    @property
    def category_names(self) -> list[str]:
        return [str(c.get('name', c['id'])) for c in self.categories]

    @property
    def num_instances(self) -> int:
        return sum(len(a) for a in self.annotations.values())


@dataclasses.dataclass
class Instances:
    """The instances of one image, after validation. n may be 0 (a negative image)."""
    boxes: np.ndarray          # [n, 4] float32 xyxy, pixels, clipped to the image
    category_ids: np.ndarray   # [n] int64 (dataset category ids, not contiguous indices)
    is_crowd: np.ndarray       # [n] bool
    areas: np.ndarray          # [n] float32 (annotation area; mask or box area when absent)
    ids: np.ndarray            # [n] int64 annotation ids
    masks: np.ndarray | None   # [n, H, W] uint8 {0, 1}
    keypoints: np.ndarray | None  # [n, K, 3] float32 (x, y, v); zeros for instances without

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


def _read_json(path: str) -> Any:
    try:
        return json.loads(files.read_bytes(path).decode('utf-8'))
    except FileNotFoundError as e:
        raise DataError(f'{path}: annotation file not found') from e
    except json.JSONDecodeError as e:
        raise DataError(f'{path}: malformed JSON: {e.msg} at line {e.lineno} column '
                        f'{e.colno}') from e
    except UnicodeDecodeError as e:
        raise DataError(f'{path}: not UTF-8 text: {e}') from e


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _parse_skeleton(raw: Any, num_keypoints: int) -> tuple[tuple[int, int], ...]:
    """A category's 'skeleton' (1-based pairs) → 0-based pairs; pairs that are not two indices in
    1..K are dropped (the skeleton only draws lines)."""
    if not isinstance(raw, list):
        return ()
    pairs = []
    for pair in raw:
        if (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(map(_is_int, pair))
                and all(1 <= i <= num_keypoints for i in pair)):
            pairs.append((pair[0] - 1, pair[1] - 1))
    return tuple(pairs)


def _parse_categories(raw: Any, path: str) -> tuple[list[dict], tuple[str, ...]]:
    if not isinstance(raw, list):
        raise DataError(f"{path}: 'categories' must be a list")
    seen = set()
    for c in raw:
        if not isinstance(c, dict) or not _is_int(c.get('id')):
            raise DataError(f'{path}: category entry without an integer id: {str(c)[:100]}')
        if c['id'] in seen:
            raise DataError(f"{path}: duplicate category id {c['id']}")
        seen.add(c['id'])
    categories = sorted(raw, key=lambda c: c['id'])
    keypoint_names: tuple[str, ...] = ()
    for c in categories:
        if c.get('keypoints'):
            names = tuple(str(n) for n in c['keypoints'])
            if keypoint_names and names != keypoint_names:
                raise DataError(f"{path}: categories {categories[0]['id']}.. and {c['id']} "
                                'have different keypoint lists; one list per dataset is supported')
            keypoint_names = names
    return categories, keypoint_names


def _parse_images(raw: Any, path: str) -> list[ImageEntry]:
    if not isinstance(raw, list):
        raise DataError(f"{path}: 'images' must be a list")
    images, seen = [], set()
    for im in raw:
        if not isinstance(im, dict) or not _is_int(im.get('id')) or not isinstance(
                im.get('file_name'), str):
            raise DataError(f'{path}: image entry without integer id or file_name: {str(im)[:100]}')
        if im['id'] in seen:
            raise DataError(f"{path}: duplicate image id {im['id']}")
        seen.add(im['id'])
        h, w = im.get('height'), im.get('width')
        if any(v is not None and not (_is_int(v) and v > 0) for v in (h, w)):
            raise DataError(f"{path}: image id {im['id']}: height/width must be positive integers")
        images.append(ImageEntry(im['id'], im['file_name'], h, w))
    return images


def _check_segmentation(seg: Any) -> str | None:
    """None if `seg` is a structurally valid polygon list or RLE, else the reason."""
    if isinstance(seg, list):
        for poly in seg:
            if not isinstance(poly, list) or len(poly) % 2 or not all(map(_is_number, poly)):
                return 'polygon must be a list of an even number of finite numbers'
        return None
    if isinstance(seg, dict):
        size, counts = seg.get('size'), seg.get('counts')
        if not (isinstance(size, list) and len(size) == 2
                and all(_is_int(s) and s >= 0 for s in size)):
            return "RLE needs 'size': [h, w]"
        if not isinstance(counts, (str, list)):
            return "RLE 'counts' must be a string or a list"
        return None
    return f'unsupported segmentation type {type(seg).__name__}'


def _parse_annotation(a: Any, path: str, image_ids: set, category_ids: set,
                      num_keypoints: int, skips: SkipLog, keypoint_source: str = '') -> Annotation | None:
    ann_id = a.get('id') if isinstance(a, dict) else None
    where = f'{path}: annotation id {ann_id}'
    if not isinstance(a, dict) or not _is_int(ann_id):
        skips.skip_instance(val.MALFORMED_ANNOTATION, f'{path}: annotation without an integer id: '
                            f'{str(a)[:100]}')
        return None
    for field, ok in (('image_id', _is_int), ('category_id', _is_int)):
        if not ok(a.get(field)):
            skips.skip_instance(val.MALFORMED_ANNOTATION,
                                f'{where}: missing or non-integer {field}')
            return None
    bbox = a.get('bbox')
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(map(_is_number, bbox))):
        skips.skip_instance(val.MALFORMED_ANNOTATION, f'{where}: bbox must be 4 finite numbers, '
                            f'got {str(bbox)[:60]}')
        return None
    if a['image_id'] not in image_ids:
        skips.skip_instance(val.UNKNOWN_IMAGE_ID,
                            f"{where}: image_id {a['image_id']} is not in 'images'")
        return None
    if a['category_id'] not in category_ids:
        skips.skip_instance(val.UNKNOWN_CATEGORY,
                            f"{where}: category_id {a['category_id']} is not in 'categories'")
        return None
    if bbox[2] <= 0 or bbox[3] <= 0:
        skips.skip_instance(val.ZERO_AREA_BOX, f'{where}: bbox {bbox} has zero area')
        return None
    crowd = a.get('iscrowd', 0)
    if crowd not in (0, 1, True, False):
        skips.skip_instance(val.MALFORMED_ANNOTATION, f'{where}: iscrowd must be 0 or 1')
        return None
    area = a.get('area', -1.0)
    area = float(area) if _is_number(area) else -1.0
    seg = a.get('segmentation')
    if seg in ([], {}, None):
        seg = None
    elif (reason := _check_segmentation(seg)) is not None:
        skips.skip_instance(val.BAD_SEGMENTATION, f'{where}: {reason}')
        return None
    kps = a.get('keypoints')
    if kps == []:
        kps = None
    if kps is not None:
        if not (isinstance(kps, list) and all(map(_is_number, kps)) and len(kps) % 3 == 0):
            skips.skip_instance(val.BAD_KEYPOINTS, f'{where}: keypoints must be a list of '
                                '(x, y, v) triples of finite numbers')
            return None
        if num_keypoints and len(kps) != 3 * num_keypoints:
            skips.skip_instance(val.BAD_KEYPOINTS, f'{where}: {len(kps) // 3} keypoints, expected '
                                f'{num_keypoints} ({keypoint_source})')
            return None
        if any(v not in (0, 1, 2) for v in kps[2::3]):
            skips.skip_instance(val.BAD_KEYPOINTS, f'{where}: keypoint visibility flags must be '
                                f'0, 1 or 2, got {sorted(set(kps[2::3]) - {0, 1, 2})[:5]}')
            return None
        kps = tuple(float(k) for k in kps)
    return Annotation(ann_id, a['image_id'], a['category_id'], tuple(float(b) for b in bbox),
                      bool(crowd), area, seg, kps)


def load_coco_json(path: str, *, strict: bool = False,
                   num_keypoints: int | None = None) -> CocoDataset:
    """Reads and validates a COCO instances json (see module docstring for what is checked).

    Raises DataError for an unreadable file or broken structure; bad annotations are skipped and
    counted in the returned dataset's `skips` (or raise, with `strict=True`). num_keypoints: K
    that the config expects (`data.num_keypoints` when training on keypoints): the count of a
    json whose categories name no keypoints. (A json whose categories name another number is
    the pipeline's clear error, `pipeline._check_config`, not a skip of every annotation.)
    """
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise DataError(f'{path}: top level must be an object with images/annotations/categories')
    for key in ('images', 'categories'):
        if key not in raw:
            raise DataError(f"{path}: missing '{key}'")
    raw_annotations = raw.get('annotations', [])
    if not isinstance(raw_annotations, list):
        raise DataError(f"{path}: 'annotations' must be a list")
    categories, keypoint_names = _parse_categories(raw['categories'], path)
    skeleton = next((_parse_skeleton(c.get('skeleton'), len(keypoint_names)) for c in categories
                     if c.get('keypoints')), ())
    images = _parse_images(raw['images'], path)
    skips = SkipLog(strict=strict)
    image_ids = {im.id for im in images}
    category_ids = {c['id'] for c in categories}
    annotations: dict[int, list[Annotation]] = {im.id: [] for im in images}
    seen_ids = set()
    has_segmentation = False
    num_named = len(keypoint_names) or num_keypoints or 0
    source = "the categories' keypoint names" if keypoint_names else 'data.num_keypoints'
    parsed = []
    for a in raw_annotations:
        ann = _parse_annotation(a, path, image_ids, category_ids, num_named, skips, source)
        if ann is not None:
            parsed.append(ann)
    if not num_named:   # no names, no config: K is the most keypoints an annotation has
        num_named = max((len(a.keypoints) // 3 for a in parsed if a.keypoints), default=0)
        if num_named:
            kept = []
            for ann in parsed:
                if ann.keypoints and len(ann.keypoints) != 3 * num_named:
                    skips.skip_instance(val.BAD_KEYPOINTS, f'{path}: annotation id {ann.id}: '
                                        f'{len(ann.keypoints) // 3} keypoints, expected '
                                        f'{num_named} (the most any annotation has)')
                    continue
                kept.append(ann)
            parsed = kept
    for ann in parsed:
        if ann.id in seen_ids:
            skips.skip_instance(val.MALFORMED_ANNOTATION,
                                f'{path}: duplicate annotation id {ann.id}')
            continue
        seen_ids.add(ann.id)
        has_segmentation |= ann.segmentation is not None
        annotations[ann.image_id].append(ann)
    if not keypoint_names and any(a.keypoints for anns in annotations.values() for a in anns):
        keypoint_names = tuple(f'keypoint_{i}' for i in range(num_named))
    return CocoDataset(path, images, annotations, categories, keypoint_names, has_segmentation,
                       skips, skeleton)


def segmentation_to_mask(seg: Any, height: int, width: int) -> np.ndarray:
    """Polygons or RLE → [height, width] uint8 {0, 1}. Raises ValueError when undecodable.

    Sub-polygons with fewer than 3 points are dropped: pycocotools would read a 4-number polygon
    as a box (`frPyObjects` treats a list of 4-lists as bboxes).
    """
    from pycocotools import mask as mask_utils
    if isinstance(seg, list):
        polys = [p for p in seg if len(p) >= 6]
        if not polys:
            return np.zeros((height, width), np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(seg, dict):
        if list(seg['size']) != [height, width]:
            raise ValueError(f"RLE size {seg['size']} != image size {[height, width]}")
        if isinstance(seg['counts'], list):
            if sum(seg['counts']) != height * width:
                raise ValueError('uncompressed RLE counts do not sum to h*w')
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = {'size': seg['size'], 'counts': seg['counts'].encode('ascii')}
    else:
        raise ValueError(f'unsupported segmentation {type(seg).__name__}')
    mask = mask_utils.decode(rle)
    if mask.shape != (height, width):
        raise ValueError(f'decoded mask shape {mask.shape} != {(height, width)}')
    return np.ascontiguousarray(mask, dtype=np.uint8)


def build_instances(annotations: Sequence[Annotation], height: int, width: int, *,
                    with_masks: bool, num_keypoints: int, skips: SkipLog,
                    file_name: str = '') -> Instances:
    """One image's annotations, given its real (upright) size → Instances (see module docstring)."""
    boxes, cats, crowd, areas, ids, masks, kps = [], [], [], [], [], [], []
    for a in annotations:
        where = f'{file_name}: annotation id {a.id}'
        x, y, w, h = a.bbox
        x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
        if x2 <= x1 or y2 <= y1:
            skips.skip_instance(val.BOX_OUTSIDE_IMAGE, f'{where}: bbox {list(a.bbox)} lies outside '
                                f'the {width}x{height} image')
            continue
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            skips.note('box_clipped_to_image')
        mask = None
        if with_masks:
            if a.segmentation is None:
                skips.skip_instance(MISSING_SEGMENTATION, f'{where}: no segmentation in a dataset '
                                    'with masks')
                continue
            try:
                mask = segmentation_to_mask(a.segmentation, height, width)
            except Exception as e:  # pycocotools raises assorted types on odd input
                skips.skip_instance(val.BAD_SEGMENTATION, f'{where}: {type(e).__name__}: {e}')
                continue
            if not mask.any():
                skips.note('empty_mask')
        area = a.area
        if area <= 0:
            area = float(mask.sum()) if mask is not None else (x2 - x1) * (y2 - y1)
        boxes.append((x1, y1, x2, y2))
        cats.append(a.category_id)
        crowd.append(a.is_crowd)
        areas.append(area)
        ids.append(a.id)
        if with_masks:
            masks.append(mask)
        if num_keypoints:
            kps.append(_instance_keypoints(a, num_keypoints, (x1, y1, x2, y2), height, width,
                                           skips))
    n = len(boxes)
    return Instances(
        boxes=np.asarray(boxes, np.float32).reshape(n, 4),
        category_ids=np.asarray(cats, np.int64).reshape(n),
        is_crowd=np.asarray(crowd, bool).reshape(n),
        areas=np.asarray(areas, np.float32).reshape(n),
        ids=np.asarray(ids, np.int64).reshape(n),
        masks=(np.stack(masks) if masks else np.zeros((0, height, width), np.uint8))
        if with_masks else None,
        keypoints=(np.stack(kps) if kps else np.zeros((0, num_keypoints, 3), np.float32))
        if num_keypoints else None)


def _instance_keypoints(a: Annotation, num_keypoints: int, box, height: int, width: int,
                        skips: SkipLog) -> np.ndarray:
    """[K, 3] float32 (x, y, v) of one annotation (module docstring: keypoints); zeros when it has
    none."""
    if a.keypoints is None or len(a.keypoints) != 3 * num_keypoints:
        return np.zeros((num_keypoints, 3), np.float32)
    kps = np.asarray(a.keypoints, np.float32).reshape(num_keypoints, 3)
    labelled = kps[:, 2] > 0
    x, y = kps[:, 0], kps[:, 1]
    outside = labelled & ((x < 0) | (x > width) | (y < 0) | (y > height))
    if outside.any():
        skips.note('keypoint_outside_image', int(outside.sum()))
        kps[outside] = 0.0
        labelled &= ~outside
    x1, y1, x2, y2 = box
    off_box = labelled & ((x < x1) | (x > x2) | (y < y1) | (y > y2))
    if off_box.any():
        skips.note('keypoint_outside_box', int(off_box.sum()))
    if not labelled.any():
        skips.note('no_labelled_keypoints')
    return kps


def image_path(images_dir: str, entry: ImageEntry) -> str:
    return os.path.join(images_dir, entry.file_name)
