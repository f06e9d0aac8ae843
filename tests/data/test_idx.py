"""read_idx on good and damaged files; load_idx_dataset end to end against a server on 127.0.0.1."""

from __future__ import annotations

import functools
import gzip
import hashlib
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from opsloop.config import DataConfig, DownloadFileConfig
from opsloop.data.idx import load_idx_dataset, read_idx
from opsloop.errors import ConfigError, DataError

TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}
FILENAMES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def idx_bytes(array: npt.NDArray[np.generic]) -> bytes:
    """Encode an array in the IDX format: magic, big-endian dims, big-endian payload."""
    header = bytes([0, 0, TYPE_CODES[array.dtype], array.ndim])
    dims = np.array(array.shape, dtype=">u4").tobytes()
    return header + dims + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: npt.NDArray[np.generic], *, compress: bool = True) -> bytes:
    data = idx_bytes(array)
    data = gzip.compress(data, mtime=0) if compress else data
    path.write_bytes(data)
    return data


@pytest.fixture
def images() -> npt.NDArray[np.uint8]:
    return np.random.default_rng(0).integers(0, 256, size=(20, 28, 28), dtype=np.uint8)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trips_images(
    tmp_path: Path, images: npt.NDArray[np.uint8], compress: bool
) -> None:
    path = tmp_path / "images.idx"
    write_idx(path, images, compress=compress)

    result = read_idx(path)

    assert result.dtype == np.uint8
    assert result.shape == (20, 28, 28)
    np.testing.assert_array_equal(result, images)
    assert result.flags.writeable


@pytest.mark.parametrize("dtype", [np.int32, np.float32])
def test_read_idx_decodes_big_endian_types(tmp_path: Path, dtype: type[np.generic]) -> None:
    array = np.arange(-6, 6).reshape(3, 4).astype(dtype)
    write_idx(tmp_path / "a.gz", array)

    result = read_idx(tmp_path / "a.gz")

    assert result.dtype == np.dtype(dtype)  # native byte order, not '>'
    np.testing.assert_array_equal(result, array)


def test_read_idx_rejects_truncated_payload(tmp_path: Path, images: npt.NDArray[np.uint8]) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(images)[:-10]))

    with pytest.raises(
        DataError,
        match=r"train-images-idx3-ubyte\.gz: payload is 15670 bytes.*"
        r"needs 15680; delete the file",
    ):
        read_idx(path)


def test_read_idx_rejects_cut_gzip_stream(tmp_path: Path, images: npt.NDArray[np.uint8]) -> None:
    path = tmp_path / "images.gz"
    data = gzip.compress(idx_bytes(images))
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(DataError, match=r"images\.gz: gzip stream is damaged.*re-download"):
        read_idx(path)


def test_read_idx_rejects_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "notidx.gz"
    path.write_bytes(gzip.compress(b"<html>503 Service Unavailable</html>"))

    with pytest.raises(DataError, match=r"notidx\.gz: bad magic number 3c68746d"):
        read_idx(path)


def test_read_idx_rejects_unknown_type_code(tmp_path: Path) -> None:
    path = tmp_path / "odd.idx"
    path.write_bytes(bytes([0, 0, 0x42, 1]) + (3).to_bytes(4, "big") + b"abc")

    with pytest.raises(DataError, match="unknown IDX type code 0x42"):
        read_idx(path)


def test_read_idx_reports_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "absent.gz")


@pytest.fixture
def served_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A real static file server on 127.0.0.1 over a fresh directory: (directory, base URL)."""
    root = tmp_path / "www"
    root.mkdir()

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root))
    )
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def publish_dataset(root: Path) -> dict[str, DownloadFileConfig]:
    """Write a tiny MNIST-shaped dataset (20 train, 8 test) and return its `data.files` config."""
    rng = np.random.default_rng(1)
    arrays = {
        "train_images": rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(20) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, size=(8, 28, 28), dtype=np.uint8),
        "test_labels": np.array([9, 8, 7, 6, 5, 4, 3, 2], dtype=np.uint8),
    }
    files = {}
    for key, array in arrays.items():
        data = write_idx(root / FILENAMES[key], array)
        files[key] = DownloadFileConfig(FILENAMES[key], hashlib.sha256(data).hexdigest())
    return files


def idx_config(tmp_path: Path, mirror: str, files: dict[str, DownloadFileConfig]) -> DataConfig:
    return DataConfig(
        name="tiny_mnist",
        source="idx",
        cache_dir=str(tmp_path / "raw"),
        mirrors=[mirror],
        files=files,
        retries=2,
        backoff_seconds=0.01,
        timeout_seconds=5.0,
    )


def test_load_idx_dataset_end_to_end(tmp_path: Path, served_dir: tuple[Path, str]) -> None:
    root, base_url = served_dir
    (root / "mnist").mkdir()
    # No trailing slash on the mirror: the loader must still join it to the filename correctly.
    cfg = idx_config(tmp_path, base_url + "mnist", publish_dataset(root / "mnist"))

    raw = load_idx_dataset(cfg)

    assert raw.images.shape == (20, 1, 28, 28)
    assert raw.images.dtype == np.uint8
    assert raw.labels.dtype == np.int64
    np.testing.assert_array_equal(raw.labels, np.arange(20) % 10)
    assert raw.test_images is not None
    assert raw.test_labels is not None
    assert raw.test_images.shape == (8, 1, 28, 28)
    np.testing.assert_array_equal(raw.test_labels, [9, 8, 7, 6, 5, 4, 3, 2])
    np.testing.assert_array_equal(
        raw.images[:, 0], read_idx(root / "mnist" / FILENAMES["train_images"])
    )
    assert raw.class_names == [str(i) for i in range(10)]
    assert raw.source == base_url + "mnist/train-images-idx3-ubyte.gz"
    assert raw.pixel_max == 255.0
    cached = sorted(p.name for p in (tmp_path / "raw" / "tiny_mnist").iterdir())
    assert cached == sorted(FILENAMES.values())


def test_load_idx_dataset_fetches_from_mirror_root(
    tmp_path: Path, served_dir: tuple[Path, str]
) -> None:
    root, base_url = served_dir
    files = publish_dataset(root)
    cfg = idx_config(tmp_path, base_url, files)
    cfg.class_names = list("abcdefghij")

    raw = load_idx_dataset(cfg)

    assert raw.class_names == list("abcdefghij")
    assert len(raw.images) == 20


def test_load_idx_dataset_names_missing_file_key(
    tmp_path: Path, served_dir: tuple[Path, str]
) -> None:
    root, base_url = served_dir
    files = publish_dataset(root)
    del files["test_labels"]

    with pytest.raises(ConfigError, match=r"data\.files\.test_labels is missing"):
        load_idx_dataset(idx_config(tmp_path, base_url, files))


def test_load_idx_dataset_requires_a_mirror(tmp_path: Path) -> None:
    cfg = idx_config(tmp_path, "unused", {})
    cfg.mirrors = []

    with pytest.raises(ConfigError, match=r"data\.mirrors is empty"):
        load_idx_dataset(cfg)
