"""Experiment configs: one Python file per experiment, `get_config()` -> ConfigDict.

A package, so that configs build on each other with plain imports (`from configs import
shapes_tiny`) and share helpers (`configs/common.py`). `mrcnn_jax.config.load_config` imports a
file under this folder as `configs.<name>`.
"""
