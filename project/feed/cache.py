"""The decoded-image cache (`--cache`), read side: every image decoded and resized once, then read from memory.

`--cache` stores a split as one file: a small JSON header, the uint8 pixels at the training resolution,
`(N, S, S, 3)` in dataset order (channels last: the layout the CPU augmentation samples fastest), then the
`(N,)` int64 labels. Afterwards the loader only copies bytes out of a memory map: no file opening, no JPEG
decoding, no resizing.

Trust rules: the header holds a key over the source files (paths, sizes, mtimes, labels), the image size,
the split and the preprocessing recipe, and a CRC-32 of pixels and labels; a different key, size or checksum
means the cache is stale or damaged and is rebuilt, never trusted. The builder (`project.feed.cache_builder`)
writes it crash-safely, one process at a time; its `open_cache` is what the DataModule's cache source reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

MAGIC = b"PJCACHE2"
FORMAT_VERSION = 2
RECIPE = "decode-draft+resize-shorter+center-crop+uint8-hwc"  # change it when preprocessing changes
HEADER_BYTES = 4096  # the pixels start page-aligned after the header
CRC_CHUNK = 1 << 24  # 16 MiB at a time: bounded memory for any cache size
DEFAULT_CACHE_ROOT = "data/cache"  # relative to the working directory, git-ignored like data/shapes

_verified: dict[tuple, dict[str, Any]] = {}  # per process: don't re-checksum a file that did not change


def default_cache_dir(data_dir: str | os.PathLike, root: str | os.PathLike = DEFAULT_CACHE_ROOT) -> Path:
    """Where caches of `data_dir` go by default: `data/cache/<name>-<hash of its absolute path>`.

    Under the working directory rather than beside the data, because datasets are often on
    read-only or shared mounts.
    """
    source = Path(data_dir).resolve()
    digest = hashlib.sha256(os.fsencode(source)).hexdigest()[:10]
    return Path(root) / f"{source.name}-{digest}"


def cache_key(samples: Any, classes: Any, image_size: int, split: str) -> str:
    """A digest of everything a cached split depends on (its `(path, label)` samples' files, the classes, the
    size and the split); a different key means a stale cache."""
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT_VERSION, RECIPE, int(image_size), split, list(classes)]).encode())
    for path, target in samples:
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{target}\n".encode())
    return h.hexdigest()


def layout(count: int, image_size: int) -> tuple[int, int]:
    """(pixel bytes, file bytes) of a cache of `count` images."""
    pixels = count * image_size * image_size * 3
    return pixels, HEADER_BYTES + pixels + count * 8


def crc32(data: np.ndarray, crc: int = 0) -> int:
    flat = data.reshape(-1).view(np.uint8)
    for start in range(0, flat.size, CRC_CHUNK):
        crc = zlib.crc32(flat[start : start + CRC_CHUNK], crc)
    return crc


def read_header(path: Path) -> dict[str, Any]:
    """The header of a cache file; ValueError naming the problem when it is not one."""
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[: len(MAGIC)] != MAGIC:
        raise ValueError("not a cache file of this version, or a truncated header")
    length = int.from_bytes(head[len(MAGIC) : len(MAGIC) + 8], "little")
    start = len(MAGIC) + 8
    try:
        header = json.loads(head[start : start + length]) if 0 < length <= HEADER_BYTES - start else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
        raise ValueError("damaged header")
    return header


def open_arrays(path: Path, count: int, size: int, mode: str = "r") -> tuple[np.ndarray, np.ndarray]:
    """Memory maps of a cache's `(N, S, S, 3)` uint8 pixels and `(N,)` int64 labels."""
    pixels, _ = layout(count, size)
    images = np.memmap(path, dtype=np.uint8, mode=mode, offset=HEADER_BYTES, shape=(count, size, size, 3))
    labels = np.memmap(path, dtype=np.int64, mode=mode, offset=HEADER_BYTES + pixels, shape=(count,))
    return images, labels


def check_cache(path: Path, key: str) -> tuple[dict[str, Any] | None, str]:
    """`(header, "ok")` when `path` is a complete, intact cache for `key`, else `(None, why not)`."""
    if not path.is_file():
        return None, "not built yet"
    st = path.stat()
    stamp = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, key)
    if stamp in _verified:
        return _verified[stamp], "ok"
    try:
        header = read_header(path)
    except ValueError as error:
        return None, f"unreadable ({error})"
    if header.get("key") != key:
        return None, "stale (source files, image size or split changed)"
    count, size = int(header["count"]), int(header["image_size"])
    if st.st_size != layout(count, size)[1]:
        return None, f"truncated or padded ({st.st_size} bytes, expected {layout(count, size)[1]})"
    images, labels = open_arrays(path, count, size)
    if crc32(labels, crc32(images)) != header["crc32"]:
        return None, "corrupted (checksum mismatch)"
    _verified[stamp] = header
    return header, "ok"


class CachedImageDataset(Dataset):
    """A split read from a cache built by `ensure_cache`: `(3, S, S)` uint8 tensors and class indices.

    The memory maps are opened lazily in each process (a memmap pickled into a worker would be copied).

    Args:
        path: the cache file.
        transform: applied to the uint8 tensor (training augmentation on the CPU), or None.
    """

    def __init__(
        self, path: str | os.PathLike, transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> None:
        self.path = Path(path)
        header = read_header(self.path)
        self.count, self.image_size = int(header["count"]), int(header["image_size"])
        self.transform = transform
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def targets(self) -> np.ndarray:
        return np.array(self._open()[1])

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = open_arrays(self.path, self.count, self.image_size)
        return self._arrays

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images, labels = self._open()
        image = torch.from_numpy(np.array(images[index])).permute(2, 0, 1)  # a private (3, S, S) copy
        return (self.transform(image) if self.transform is not None else image), int(labels[index])
