"""The decoded-cache builder: decodes a split once into the file `project.feed.cache` reads, crash-safely.

- it is written to `<name>.partial-<pid>` and renamed into place, so a killed build leaves no file that looks
  complete; the next build removes partial files whose writer is dead;
- one process builds a cache at a time (`<name>.lock` holds its PID and host): DDP ranks and runs started
  together on one folder wait, then reuse it;
- free space is checked before decoding anything; a disk that fills up anyway ends with one line.

`open_cache` is what the training run gives `ImageDataModule(cache=True)`: a split's cached dataset, checked
against its source files, built or rebuilt when missing, stale or damaged.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from project.feed.cache import (
    FORMAT_VERSION,
    MAGIC,
    CachedImageDataset,
    cache_key,
    check_cache,
    crc32,
    default_cache_dir,
    layout,
    open_arrays,
)
from project.runtime.checkpoints import is_alive

LOCK_POLL_S = 0.5


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
        header["crc32"] = crc32(labels, crc32(images))
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


def open_cache(
    split: str,
    dataset: Dataset,
    classes: Sequence[str],
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
    *,
    data_dir: str,
    cache_dir: str | None,
    image_size: int,
    num_workers: int,
) -> CachedImageDataset:
    """Split `split` of `dataset` (its `(3, S, S)` uint8 images, unaugmented) read from its cache under
    `cache_dir` (None: `default_cache_dir(data_dir)`), built first when missing, stale or damaged; `transform`
    augments the cached images."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        raise ValueError(
            f"--cache: your {split} dataset has no `samples` ((path, label) pairs) to tell when the cache is stale; "
            "give it one, as ImageFolderDataset has, or drop --cache"
        )
    path = Path(cache_dir) if cache_dir else default_cache_dir(data_dir)
    path = path / f"{split}-{image_size}px.u8"
    ensure_cache(dataset, path, image_size, cache_key(samples, classes, image_size, split), num_workers)
    return CachedImageDataset(path, transform)
