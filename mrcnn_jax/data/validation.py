"""Bad input: one error type, and a log that counts skipped images and instances by reason.

Every data problem is either a `DataError` whose message names the file and, where there is one,
the annotation id, or a counted skip. `SkipLog(strict=True)` turns every skip into a `DataError`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging

log = logging.getLogger(__name__)

# Reasons an image is skipped.
MISSING_IMAGE_FILE = 'missing_image_file'
UNREADABLE_IMAGE = 'unreadable_image'          # corrupt, truncated, not an image
SIZE_MISMATCH = 'image_size_mismatch'          # json height/width != the image (after EXIF)
# Reasons an instance (annotation) is skipped.
MALFORMED_ANNOTATION = 'malformed_annotation'  # missing/ill-typed fields, non-finite numbers
UNKNOWN_IMAGE_ID = 'unknown_image_id'          # annotation points at an image not in the json
UNKNOWN_CATEGORY = 'unknown_category_id'
ZERO_AREA_BOX = 'zero_area_box'                # w <= 0 or h <= 0, or empty after clipping
BOX_OUTSIDE_IMAGE = 'box_outside_image'        # no overlap with the image at all
BAD_SEGMENTATION = 'bad_segmentation'          # polygon/RLE that pycocotools cannot decode
BAD_KEYPOINTS = 'bad_keypoints'

_MAX_EXAMPLES = 5


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and the annotation id."""


@dataclasses.dataclass
class SkipLog:
    """Counts skips by reason and keeps a few example messages per reason.

    `strict=True`: `skip()` raises `DataError(message)` instead of counting.
    `notes` are counted facts that are not skips (boxes clipped to the image, empty masks, ...).
    """
    strict: bool = False
    images: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    instances: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    notes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict = dataclasses.field(default_factory=dict)

    def skip_image(self, reason: str, message: str) -> None:
        self._skip(self.images, reason, message)

    def skip_instance(self, reason: str, message: str) -> None:
        self._skip(self.instances, reason, message)

    def note(self, what: str, count: int = 1) -> None:
        self.notes[what] += count

    def _skip(self, counter: collections.Counter, reason: str, message: str) -> None:
        if self.strict:
            raise DataError(f'{message} [{reason}; strict mode]')
        counter[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < _MAX_EXAMPLES:
            examples.append(message)

    def merge(self, other: 'SkipLog') -> None:
        self.images.update(other.images)
        self.instances.update(other.instances)
        self.notes.update(other.notes)
        for reason, messages in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(messages[:_MAX_EXAMPLES - len(mine)])

    @property
    def num_skipped_images(self) -> int:
        return sum(self.images.values())

    @property
    def num_skipped_instances(self) -> int:
        return sum(self.instances.values())

    def to_dict(self) -> dict:
        return {'skipped_images': dict(self.images), 'skipped_instances': dict(self.instances),
                'notes': dict(self.notes), 'examples': dict(self.examples)}

    def format(self) -> str:
        lines = [f'skipped images: {self.num_skipped_images}'
                 + ''.join(f'\n  {r}: {n}' for r, n in sorted(self.images.items())),
                 f'skipped instances: {self.num_skipped_instances}'
                 + ''.join(f'\n  {r}: {n}' for r, n in sorted(self.instances.items()))]
        if self.notes:
            lines.append('notes:' + ''.join(f'\n  {r}: {n}' for r, n in sorted(self.notes.items())))
        for reason, messages in sorted(self.examples.items()):
            lines.append(f'e.g. {reason}:' + ''.join(f'\n  {m}' for m in messages))
        return '\n'.join(lines)
