"""A decoded-image cache: every image decoded and resized once, then read straight from memory.

`--cache` stores a split as one file: a small JSON header, the uint8 pixels at the training resolution,
`(N, S, S, 3)` in dataset order (channels last: the layout the CPU augmentation samples fastest), then the
`(N,)` int64 labels. Afterwards the loader only copies bytes out of a memory map: no file opening, no JPEG
decoding, no resizing.

Trust rules:
- the header holds a key over the source files (paths, sizes, mtimes, labels), the image size, the split and
  the preprocessing recipe; any difference means the cache is stale and is rebuilt;
- it also holds a CRC-32 of pixels and labels, checked with the file size when the cache is opened, so a
  truncated or corrupted file is rebuilt, never trusted;
- it is written to `<name>.partial-<pid>` and renamed into place, so a killed build leaves no file that
  looks complete; the next build removes partial files whose writer is dead;
- one process builds a cache at a time (`<name>.lock` holds its PID and host): DDP ranks and runs started
  together on one folder wait, then reuse it;
- free space is checked before decoding anything; a disk that fills up anyway ends with one line.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

MAGIC = b"PJCACHE2"
FORMAT_VERSION = 2
RECIPE = "decode-draft+resize-shorter+center-crop+uint8-hwc"  # change it when preprocessing changes
HEADER_BYTES = 4096  # the pixels start page-aligned after the header
CRC_CHUNK = 1 << 24  # 16 MiB at a time: bounded memory for any cache size
DEFAULT_CACHE_ROOT = "data/cache"  # relative to the working directory, git-ignored like data/shapes
LOCK_POLL_S = 0.5

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


def _crc32(data: np.ndarray, crc: int = 0) -> int:
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
    if _crc32(labels, _crc32(images)) != header["crc32"]:
        return None, "corrupted (checksum mismatch)"
    _verified[stamp] = header
    return header, "ok"


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_dead_partials(path: Path) -> None:
    """Partial files of `path` whose writer (the PID in their name) is no longer alive: what a killed build left."""
    for partial in path.parent.glob(f"{path.name}.partial-*"):
        pid = partial.name.rpartition("-")[2]
        if pid.isdigit() and not is_alive(int(pid)):
            partial.unlink(missing_ok=True)


@contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """Hold `<path>.lock` (this PID and host) while building; wait while a live process holds it, take over
    one a dead process on this host left."""
    lock = path.with_name(path.name + ".lock")
    me, said = f"{os.getpid()} {socket.gethostname()}", False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            with suppress(FileNotFoundError):
                pid, _, host = lock.read_text().partition(" ")
                dead = host == socket.gethostname() and pid.isdigit() and not is_alive(int(pid))
                unwritten = not pid and time.time() - lock.stat().st_mtime > 10  # killed between create and write
                if dead or unwritten:  # nobody will release it; renamed first, so one waiter alone takes it over
                    claimed = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
                    lock.rename(claimed)
                    claimed.unlink()
                    continue
                if not said:
                    rank_zero_info(
                        f"cache {path}: waiting for process {pid or '?'} on {host or '?'}, which is building it "
                        f"(remove {lock} if that process is gone)"
                    )
                    said = True
            time.sleep(LOCK_POLL_S)
            continue
        break
    try:  # the lock is ours from here on: a failed write (a full disk) must not leave it empty, held forever
        with os.fdopen(fd, "w") as f:
            f.write(me)
        yield
    finally:
        lock.unlink(missing_ok=True)


def check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(
            errno.ENOSPC,
            f"cache: {folder} has {free:,} bytes free, the cache needs {needed:,}; free space or pass --cache_dir",
        )


def build_cache(
    dataset: Dataset, path: Path, image_size: int, key: str, num_workers: int = 2, progress: bool = True
) -> None:
    """Decode every `(3, S, S)` uint8 image of `dataset` once (in DataLoader workers) into a cache at `path`."""
    count = len(dataset)
    pixels, size = layout(count, image_size)
    check_free_space(path.parent, size)
    loader = DataLoader(dataset, batch_size=64, shuffle=False, num_workers=num_workers)
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(f.fileno(), 0, size)  # a full disk fails here, not as SIGBUS mid-build
            else:
                f.truncate(size)
        images, labels = open_arrays(tmp, count, image_size, mode="r+")
        start = 0
        with tqdm(total=count, desc=f"caching {path.name}", unit="img", disable=not progress) as bar:
            for batch, targets in loader:  # (B, 3, S, S) uint8, (B,), in dataset order
                images[start : start + len(batch)] = batch.permute(0, 2, 3, 1).numpy()
                labels[start : start + len(batch)] = targets.numpy()
                start += len(batch)
                bar.update(len(batch))
        if start != count:
            raise RuntimeError(f"the loader gave {start} of {count} images while building {path}")
        images.flush(), labels.flush()
        header = {"format": FORMAT_VERSION, "key": key, "count": count, "image_size": image_size}
        header["crc32"] = _crc32(labels, _crc32(images))
        del images, labels
        blob = json.dumps(header).encode()
        with open(tmp, "r+b") as f:
            f.write(MAGIC + len(blob).to_bytes(8, "little") + blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            message = f"cache: the disk of {path.parent} filled up while writing {path.name}; free space"
            raise OSError(errno.ENOSPC, message) from None  # the errno: how the run's fault handling tells it
        raise
    finally:
        tmp.unlink(missing_ok=True)


def ensure_cache(
    dataset: Dataset, path: Path, image_size: int, key: str, num_workers: int = 2, progress: bool = True
) -> Path:
    """The path of an intact, up-to-date cache of `dataset` at `path`, building (or rebuilding) it if needed."""
    header, why = check_cache(path, key)
    if header is not None:
        rank_zero_info(f"cache {path}: reusing {header['count']} decoded images")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(path):
        header, why = check_cache(path, key)  # another process may have built it while this one waited
        if header is None:
            remove_dead_partials(path)
            rank_zero_info(f"cache {path}: {why}; building it from {len(dataset)} images")
            build_cache(dataset, path, image_size, key, num_workers=num_workers, progress=progress)
            header, why = check_cache(path, key)
            if header is None:
                raise RuntimeError(f"cache {path} is {why} right after building it")
    return path


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
