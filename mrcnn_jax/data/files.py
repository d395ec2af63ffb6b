"""File access for local paths and, through TensorFlow's filesystems, remote ones (gs://, s3://).

Local paths use plain Python I/O so that processes which only convert data need not import
TensorFlow.
"""

from __future__ import annotations

import glob as _glob
import os


def _is_remote(path: str) -> bool:
    return '://' in path


def _gfile():
    from mrcnn_jax.data import tensorflow_on_cpu
    return tensorflow_on_cpu().io.gfile


def read_bytes(path: str) -> bytes:
    """Whole file; raises FileNotFoundError when absent."""
    if _is_remote(path):
        gfile = _gfile()
        if not gfile.exists(path):
            raise FileNotFoundError(path)
        with gfile.GFile(path, 'rb') as f:
            return f.read()
    with open(path, 'rb') as f:
        return f.read()


def read_range(path: str, offset: int, length: int) -> bytes:
    """`length` bytes at `offset`; raises OSError when the file is shorter."""
    if _is_remote(path):
        with _gfile().GFile(path, 'rb') as f:
            f.seek(offset)
            data = f.read(length)
    else:
        with open(path, 'rb') as f:
            f.seek(offset)
            data = f.read(length)
    if len(data) != length:
        raise OSError(f'{path}: wanted {length} bytes at offset {offset}, got {len(data)}')
    return data


def write_bytes(path: str, data: bytes) -> None:
    if _is_remote(path):
        with _gfile().GFile(path, 'wb') as f:
            f.write(data)
    else:
        with open(path, 'wb') as f:
            f.write(data)


def exists(path: str) -> bool:
    return _gfile().exists(path) if _is_remote(path) else os.path.exists(path)


def isfile(path: str) -> bool:
    if _is_remote(path):
        gfile = _gfile()
        return gfile.exists(path) and not gfile.isdir(path)
    return os.path.isfile(path)


def makedirs(path: str) -> None:
    if _is_remote(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def glob(pattern: str) -> list[str]:
    """Sorted matches of a file pattern."""
    return sorted(_gfile().glob(pattern) if _is_remote(pattern) else _glob.glob(pattern))
