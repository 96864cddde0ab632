"""A decoded-image cache: every image decoded and resized once, then read straight from memory.

`--cache` stores a split as one file of uint8 pixels at the training resolution, `(N, S, S, 3)` in
dataset order (channels last: the layout the CPU augmentation samples fastest), behind a small JSON
header. Afterwards the loader only copies bytes out of a memory map (and augments, if augmentation runs
on the CPU): no file opening, no JPEG decoding, no resizing.

Trust rules:
- the header holds a key over the source files (paths, sizes, mtimes, labels), the image size, the
  split and the preprocessing recipe; any difference means the cache is stale and is rebuilt;
- the header also holds a CRC-32 of the pixel data, checked (about 2 GB/s) with the file size when
  the cache is opened, so a truncated or corrupted file is rebuilt, never trusted;
- it is written to a temporary file and renamed into place, so an interrupted build leaves no file
  that looks complete.
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
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from tqdm import tqdm

from project.data.folder import ImageFolderDataset
from project.data.transforms import eval_transform

MAGIC = b"PJCACHE1"
FORMAT_VERSION = 1
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


def cache_key(dataset: ImageFolderDataset, image_size: int, split: str) -> str:
    """A digest of everything a cached split depends on; a different key means a stale cache."""
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT_VERSION, RECIPE, int(image_size), split, list(dataset.classes)]).encode())
    for path, target in dataset.samples:
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{target}\n".encode())
    return h.hexdigest()


def _crc32(data: np.ndarray) -> int:
    flat = data.reshape(-1)
    crc = 0
    for start in range(0, flat.size, CRC_CHUNK):
        crc = zlib.crc32(flat[start : start + CRC_CHUNK], crc)
    return crc


def read_header(path: Path) -> dict[str, Any]:
    """The header of a cache file; ValueError naming the problem when it is not one."""
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[: len(MAGIC)] != MAGIC:
        raise ValueError("not a cache file or truncated header")
    length = int.from_bytes(head[len(MAGIC) : len(MAGIC) + 8], "little")
    start = len(MAGIC) + 8
    if not 0 < length <= HEADER_BYTES - start:
        raise ValueError("damaged header")
    try:
        header = json.loads(head[start : start + length])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("damaged header") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
        raise ValueError("written by another version of the cache format")
    return header


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
    count, shape = int(header["count"]), tuple(header["shape"])
    expected = HEADER_BYTES + count * int(np.prod(shape))
    if st.st_size != expected:
        return None, f"truncated or padded ({st.st_size} bytes, expected {expected})"
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=HEADER_BYTES, shape=(count, *shape))
    crc = _crc32(data)
    del data
    if crc != header["crc32"]:
        return None, "corrupted (pixel checksum mismatch)"
    _verified[stamp] = header
    return header, "ok"


def build_cache(
    dataset: ImageFolderDataset,
    path: Path,
    image_size: int,
    key: str,
    num_workers: int = 2,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Decode and resize every image of `dataset` once (in DataLoader workers) into a cache at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count, shape = len(dataset), (image_size, image_size, 3)
    source = dataset.subset(np.arange(count), transform=eval_transform(image_size))  # no augmentation
    source.decode_min_size = image_size
    source.skip_bad_images = False  # a stand-in image would be cached under another image's label
    loader = DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")  # private: other ranks may build too
    try:
        size = HEADER_BYTES + count * int(np.prod(shape))
        with open(tmp, "wb") as f:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(f.fileno(), 0, size)  # a full disk fails here, not as SIGBUS mid-build
            else:
                f.truncate(size)
        data = np.memmap(tmp, dtype=np.uint8, mode="r+", offset=HEADER_BYTES, shape=(count, *shape))
        start = 0
        with tqdm(total=count, desc=f"caching {path.name}", unit="img", disable=not progress) as bar:
            for batch in loader:
                images = batch[0]  # (B, 3, S, S) uint8, in dataset order
                data[start : start + len(images)] = images.permute(0, 2, 3, 1).numpy()
                start += len(images)
                bar.update(len(images))
        if start != count:
            raise RuntimeError(f"the loader gave {start} of {count} images while building {path}")
        data.flush()
        header = {
            "format": FORMAT_VERSION,
            "key": key,
            "count": count,
            "shape": list(shape),
            "crc32": _crc32(data),
            "recipe": RECIPE,
            "source": str(dataset.root),
        }
        del data
        blob = json.dumps(header).encode()
        if len(MAGIC) + 8 + len(blob) > HEADER_BYTES:
            header["source"] = ""  # a very long path; it is informative only
            blob = json.dumps(header).encode()
        with open(tmp, "r+b") as f:
            f.write(MAGIC + len(blob).to_bytes(8, "little") + blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return header


def ensure_cache(
    dataset: ImageFolderDataset,
    cache_dir: str | os.PathLike,
    image_size: int,
    split: str,
    num_workers: int = 2,
    progress: bool = True,
) -> Path:
    """The path of an intact, up-to-date cache of `dataset`, building (or rebuilding) it if needed."""
    path = Path(cache_dir) / f"{split}-{image_size}px.u8"
    key = cache_key(dataset, image_size, split)
    header, why = check_cache(path, key)
    if header is None:
        rank_zero_info(f"cache {path}: {why}; building it from {len(dataset)} images")
        build_cache(dataset, path, image_size, key, num_workers=num_workers, progress=progress)
        header, why = check_cache(path, key)
        if header is None:
            raise RuntimeError(f"cache {path} is {why} right after building it; is the disk full?")
    else:
        rank_zero_info(f"cache {path}: reusing {header['count']} decoded images")
    return path


class CachedImageDataset(torch.utils.data.Dataset):
    """A split read from a cache built by `ensure_cache`: `(3, S, S)` uint8 tensors and class indices.

    The memory map is opened lazily in each process (a memmap pickled into a worker would be copied).
    Keeps the source dataset's `classes`, `class_to_idx`, `samples` and `targets`.

    Args:
        path: the cache file.
        source: the folder dataset it was built from (same sample order).
        transform: applied to the uint8 tensor (training augmentation on the CPU), or None.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        source: ImageFolderDataset,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.path = Path(path)
        header = read_header(self.path)
        self.count, self.shape = int(header["count"]), tuple(header["shape"])
        if self.count != len(source):
            raise ValueError(f"cache {self.path} holds {self.count} images, its source {len(source)}")
        self.root = source.root
        self.classes, self.class_to_idx = source.classes, source.class_to_idx
        self.samples = source.samples
        self.transform = transform
        self._data: np.ndarray | None = None

    @property
    def targets(self) -> np.ndarray:
        return self.samples.targets

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_data": None}

    def _images(self) -> np.ndarray:
        if self._data is None:
            self._data = np.memmap(
                self.path, dtype=np.uint8, mode="r", offset=HEADER_BYTES, shape=(self.count, *self.shape)
            )
        return self._data

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(np.array(self._images()[index])).permute(2, 0, 1)  # a private (3, S, S) copy
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.samples.targets[index])
