"""Fields that several configs share: the small CPU models and the synthetic-shapes data."""

import ml_collections


def small_resnet18_fpn(c: ml_collections.ConfigDict, *, width: int, fpn_channels: int) -> ml_collections.ConfigDict:
    """A narrow ResNet-18 FPN trained from scratch (GroupNorm: no pretrained statistics to freeze)
    with anchors for small images and 5 classes (background + circle, square, triangle, star)."""
    m = c.model
    m.num_classes = 5
    m.backbone.depth = 18
    m.backbone.width = width
    m.backbone.norm = 'gn'
    m.backbone.frozen_stages = 0
    m.fpn.channels = fpn_channels
    m.anchors.sizes = (16, 32, 64, 128, 256)
    return c


def synthetic_shapes(c: ml_collections.ConfigDict, *, image_size: int) -> ml_collections.ConfigDict:
    """The built-in synthetic shapes dataset at image_size x image_size, trained and evaluated at
    that size on a canvas of the same size."""
    d = c.data
    d.source = 'synthetic'
    d.synthetic_image_size = image_size
    d.canvas = (image_size, image_size)
    d.min_size = (image_size,)
    d.max_size = image_size
    d.test_min_size = image_size
    d.test_max_size = image_size
    return c
