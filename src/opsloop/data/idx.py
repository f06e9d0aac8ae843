"""The IDX source: MNIST-style datasets (MNIST, Fashion-MNIST) downloaded and parsed from IDX files.

`load_idx_dataset(cfg)` downloads the four files named in `data.files` from `data.mirrors` into
`<data.cache_dir>/<data.name>/` (verified by SHA-256, cached) and returns a `RawDataset` holding the
official train and test splits. `read_idx(path)` parses one IDX file, gzip-compressed or not.
"""

from __future__ import annotations

import gzip
import logging
import math
import struct
import zlib
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt

from opsloop.config import DataConfig
from opsloop.data.download import download_file
from opsloop.data.raw import RawDataset
from opsloop.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FILE_KEYS = ("train_images", "train_labels", "test_images", "test_labels")

# IDX type codes (third magic byte) and the big-endian numpy dtype each one stores.
_IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | Path) -> npt.NDArray[Any]:
    """Parse an IDX file into an array in native byte order; `DataError` if it is corrupt."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        _corrupt(path, f"bad magic number {data[:4].hex() or '(empty)'}; not an IDX file")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        _corrupt(path, f"unknown IDX type code 0x{type_code:02x}")
    header_end = 4 + 4 * ndim
    if len(data) < header_end:
        _corrupt(path, f"header is cut short ({len(data)} bytes for {ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", data[4:header_end])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = math.prod(dims) * dtype.itemsize
    payload = memoryview(data)[header_end:]
    if len(payload) != expected:
        _corrupt(path, f"payload is {len(payload)} bytes but the header {dims} needs {expected}")
    # astype copies into native byte order, which also makes the array writable.
    return np.frombuffer(payload, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when it is gzip (detected by content, not by name)."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == _GZIP_MAGIC else raw
    except FileNotFoundError as exc:
        raise DataError(f"{path} does not exist; download the dataset first") from exc
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        _corrupt(path, f"gzip stream is damaged ({exc})")


def _corrupt(path: Path, problem: str) -> NoReturn:
    """Raise the one-line error for a damaged file; a fresh download is the fix."""
    raise DataError(f"{path}: {problem}; delete the file and run again to re-download it")


def load_idx_dataset(cfg: DataConfig) -> RawDataset:
    """Download (or reuse) the four IDX files of `cfg` and return them as a `RawDataset`."""
    if not cfg.mirrors:
        raise ConfigError(f"data.mirrors is empty for dataset '{cfg.name}'; list a mirror URL")
    paths = {key: _fetch(cfg, key) for key in FILE_KEYS}
    train_images = _images(paths["train_images"])
    train_labels = _labels(paths["train_labels"])
    test_images = _images(paths["test_images"])
    test_labels = _labels(paths["test_labels"])
    return RawDataset(
        images=train_images,
        labels=train_labels,
        class_names=_class_names(cfg, train_labels, test_labels),
        source=_join_url(cfg.mirrors[0], cfg.files["train_images"].filename),
        pixel_max=255.0,
        test_images=test_images,
        test_labels=test_labels,
    )


def _fetch(cfg: DataConfig, key: str) -> Path:
    """Download one of the four files (or find it cached) under <cache_dir>/<name>/."""
    if key not in cfg.files:
        raise ConfigError(
            f"data.files.{key} is missing for dataset '{cfg.name}'; add its filename and sha256 "
            "(see configs/data/mnist.yaml)"
        )
    spec = cfg.files[key]
    return download_file(
        [_join_url(mirror, spec.filename) for mirror in cfg.mirrors],
        Path(cfg.cache_dir) / cfg.name / spec.filename,
        spec.sha256,
        retries=cfg.retries,
        backoff_seconds=cfg.backoff_seconds,
        timeout_seconds=cfg.timeout_seconds,
    )


def _join_url(mirror: str, filename: str) -> str:
    """Mirror base + filename, whether or not the configured mirror ends with a slash."""
    return f"{mirror.rstrip('/')}/{filename}"


def _images(path: Path) -> npt.NDArray[np.uint8]:
    """An IDX image file as uint8 (N, 1, H, W)."""
    array = read_idx(path)
    if array.ndim != 3 or array.dtype != np.uint8:
        raise DataError(
            f"{path}: expected uint8 images (N, H, W), got {array.dtype} {array.shape}; "
            "check that data.files.*_images name image files"
        )
    return array[:, np.newaxis, :, :]


def _labels(path: Path) -> npt.NDArray[np.int64]:
    """An IDX label file as int64 (N,)."""
    array = read_idx(path)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise DataError(
            f"{path}: expected integer labels (N,), got {array.dtype} {array.shape}; "
            "check that data.files.*_labels name label files"
        )
    return array.astype(np.int64)


def _class_names(
    cfg: DataConfig, train: npt.NDArray[np.int64], test: npt.NDArray[np.int64]
) -> list[str]:
    """The configured class names, or "0".."k-1" for the labels present when none are set."""
    if cfg.class_names is not None:
        return list(cfg.class_names)
    top = max((int(a.max()) for a in (train, test) if a.size), default=-1)
    return [str(i) for i in range(top + 1)]
