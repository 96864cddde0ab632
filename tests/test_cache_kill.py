"""The decoded cache killed, full or built by two runs at once: a killed build's leftovers are removed and the
cache is built again, a live builder is waited for and its cache reused, a disk without room is refused before
decoding anything, and a disk that fills up mid-write ends with one line, the previous cache intact."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

from project.feed import cache_builder as cache
from project.feed.cache import HEADER_BYTES, CachedImageDataset, check_cache, layout
from project.feed.cache_builder import ensure_cache
from tests.killing import Victim, leftovers

ROOT = Path(__file__).resolve().parents[1]
SIZE, KEY = 8, "the key"
BATCH = 64  # build_cache's batch size
LEFTOVERS = ("*.partial-*", "*.lock")

# builds a cache of the images `Synthetic` makes; from item `hold_at` on, each item waits for the file
# `<signals>/release` (60 s after the start at most), so the build is held mid-write while the test looks, and kills
HELD_BUILD = """
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, {root!r})
from project.feed.cache_builder import ensure_cache

path, signals, key = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
count, size, workers, hold_at = (int(arg) for arg in sys.argv[4:8])
deadline = time.monotonic() + 60


class Held(torch.utils.data.Dataset):
    def __len__(self):
        return count

    def __getitem__(self, index):
        if index >= hold_at:
            (signals / "held").touch()
            while not (signals / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        return torch.full((3, size, size), index % 250 + 1, dtype=torch.uint8), index % 7


ensure_cache(Held(), path, size, key, num_workers=workers, progress=False)
print("built", flush=True)
"""


class Synthetic(Dataset):
    """`count` (3, S, S) uint8 images, image i filled with i % 250 + 1, label i % 7; counts the items read."""

    def __init__(self, count: int) -> None:
        self.count, self.reads = count, 0

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        self.reads += 1
        return torch.full((3, SIZE, SIZE), index % 250 + 1, dtype=torch.uint8), index % 7


class Clock:
    """Stands in for `time` in project.feed.cache_builder, whose `sleep` is how `build_lock` waits."""

    def __init__(self, on_sleep: Callable[[float], Any]) -> None:
        self.on_sleep, self.sleeps = on_sleep, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.on_sleep(seconds)


class Waited(Exception):
    """Raised by a `Clock` that must not wait."""


def never_waits(monkeypatch: pytest.MonkeyPatch) -> Clock:
    def refuse(seconds: float) -> None:
        raise Waited("ensure_cache waited for a lock nobody will release")

    clock = Clock(refuse)
    monkeypatch.setattr(cache, "time", clock)
    return clock


def held_build(path: Path, signals: Path, count: int, workers: int, hold_at: int) -> Victim:
    argv = [str(path), str(signals), KEY, str(count), str(SIZE), str(workers), str(hold_at)]
    code = HELD_BUILD.format(root=str(ROOT))
    return Victim([sys.executable, "-c", code, *argv], cwd=ROOT, env={"OMP_NUM_THREADS": "1"})


def build(path: Path, count: int, key: str = KEY) -> Synthetic:
    dataset = Synthetic(count)
    ensure_cache(dataset, path, SIZE, key, num_workers=0, progress=False)
    return dataset


def assert_complete(path: Path, count: int, key: str = KEY) -> None:
    """`path` is a verified cache of `Synthetic(count)`, and nothing else is left beside it."""
    header, why = check_cache(path, key)
    assert header is not None, why
    ds = CachedImageDataset(path)
    assert len(ds) == count
    for index in (0, count // 2, count - 1):
        image, label = ds[index]
        assert bool((image == index % 250 + 1).all()) and label == index % 7
    assert leftovers(path.parent, *LEFTOVERS) == []


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def lock_of(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def test_a_build_killed_mid_write_leaves_no_stray_and_the_next_build_removes_its_leftovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, signals = tmp_path / "cache" / "train.u8", tmp_path / "signals"
    signals.mkdir()
    count = 3 * BATCH  # with 2 workers: batch 0 is written, the workers are held on batches 1 and 2
    first_image = slice(HEADER_BYTES, HEADER_BYTES + SIZE * SIZE * 3)
    with held_build(path, signals, count, workers=2, hold_at=BATCH) as victim:
        partial = victim.wait_for_file(path.parent, f"{path.name}.partial-*", timeout=120)
        assert partial.name == f"{path.name}.partial-{victim.process.pid}"
        deadline = time.monotonic() + 30
        while set(partial.read_bytes()[first_image]) != {1}:  # the first batch is in the file
            assert victim.process.poll() is None and time.monotonic() < deadline, victim.output
            time.sleep(0.01)
        victim.kill()
        (signals / "release").touch()  # the held workers go on with their batch; then they must notice, and end
        assert not victim.strays()
    assert not path.exists() and partial.exists()  # mid-write: nothing that looks complete
    assert lock_of(path).read_text() == f"{victim.process.pid} {socket.gethostname()}"

    clock = never_waits(monkeypatch)  # the dead builder's lock is taken over, not waited for
    dataset = build(path, count)
    assert dataset.reads == count and clock.sleeps == 0
    assert_complete(path, count)  # the dead writer's partial file and lock are gone too


def test_a_second_build_waits_for_the_live_builder_then_reuses_its_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, signals = tmp_path / "cache" / "train.u8", tmp_path / "signals"
    signals.mkdir()
    count = 100
    with held_build(path, signals, count, workers=0, hold_at=0) as victim:
        victim.wait_for_file(signals, "held", timeout=120)  # building, so holding the lock
        assert lock_of(path).read_text() == f"{victim.process.pid} {socket.gethostname()}"

        def release(seconds: float) -> None:  # once this process waits, the builder may finish
            (signals / "release").touch()
            time.sleep(seconds)

        clock = Clock(release)
        monkeypatch.setattr(cache, "time", clock)
        try:
            dataset = build(path, count)
        finally:
            (signals / "release").touch()  # had it not waited, the builder must not wait for the deadline
        built = path.stat()
        assert victim.wait() == 0, victim.output
    assert clock.sleeps >= 1  # it waited
    assert dataset.reads == 0  # and decoded nothing: the cache is the builder's, built once
    assert sum("building it" in line for line in victim.lines) == 1 and "built" in victim.lines
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (built.st_ino, built.st_mtime_ns)
    assert_complete(path, count)


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "cache" / "train.u8"
    path.parent.mkdir()
    dead = dead_pid()
    lock_of(path).write_text(f"{dead} {socket.gethostname()}")
    path.with_name(f"{path.name}.partial-{dead}").write_bytes(b"what a killed build left")
    clock = never_waits(monkeypatch)
    assert build(path, 10).reads == 10 and clock.sleeps == 0
    assert_complete(path, 10)


def test_a_lock_held_on_another_host_is_waited_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "cache" / "train.u8"
    path.parent.mkdir()
    lock_of(path).write_text(f"{dead_pid()} another-host")  # its PID means nothing here: maybe alive
    never_waits(monkeypatch)
    dataset = Synthetic(10)
    with pytest.raises(Waited):
        ensure_cache(dataset, path, SIZE, KEY, num_workers=0, progress=False)
    assert dataset.reads == 0 and lock_of(path).read_text().endswith(" another-host")


@pytest.mark.parametrize("previous", [True, False], ids=["over_a_previous_cache", "first_build"])
def test_not_enough_free_space_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, previous: bool
) -> None:
    path = tmp_path / "cache" / "train.u8"
    if previous:
        build(path, 10, key="old")
        before = path.read_bytes()
    free, asked = 12345, []

    def disk_usage(folder: str | os.PathLike) -> SimpleNamespace:
        asked.append(Path(folder))
        return SimpleNamespace(total=10**9, used=10**9 - free, free=free)

    monkeypatch.setattr(cache.shutil, "disk_usage", disk_usage)
    dataset = Synthetic(100)
    with pytest.raises(OSError) as error:
        ensure_cache(dataset, path, SIZE, "new", num_workers=0, progress=False)
    message = str(error.value)
    assert "\n" not in message and str(path.parent) in message, message
    digits = message.replace(",", "")
    assert str(layout(100, SIZE)[1]) in digits and str(free) in digits, message  # bytes needed and free
    assert error.value.errno == errno.ENOSPC
    assert asked == [path.parent]
    assert dataset.reads == 0  # nothing decoded
    assert leftovers(path.parent, *LEFTOVERS) == []
    if previous:
        assert path.read_bytes() == before
        assert_complete(path, 10, key="old")
    else:
        assert not path.exists()


def raise_enospc(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("writer", ["posix_fallocate", "fsync", "replace"])
def test_a_disk_that_fills_up_mid_write_ends_with_one_line_and_keeps_the_previous_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    if not hasattr(os, writer):
        pytest.skip(f"no os.{writer} here")
    path = tmp_path / "cache" / "train.u8"
    build(path, 10, key="old")
    before = path.read_bytes()
    with monkeypatch.context() as patched:
        patched.setattr(os, writer, raise_enospc)  # the allocation, the header's fsync, the rename into place
        with pytest.raises(OSError) as error:
            build(path, 100, key="new")
    message = str(error.value)
    assert "\n" not in message and str(path.parent) in message, message
    assert error.value.errno == errno.ENOSPC  # what the run's fault handling tells a full disk by
    assert path.read_bytes() == before
    assert_complete(path, 10, key="old")


def test_a_lock_that_cannot_be_written_is_not_left_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk fails first on the lock file's few bytes; an empty lock would make every later run wait."""
    path = tmp_path / "cache" / "train.u8"

    def full(fd: int, *args: Any, **kwargs: Any) -> None:
        os.close(fd)
        raise_enospc()

    with monkeypatch.context() as patched:
        patched.setattr(os, "fdopen", full)
        with pytest.raises(OSError):
            build(path, 10)
    assert leftovers(path.parent, *LEFTOVERS) == []
    never_waits(monkeypatch)
    build(path, 10)
    assert_complete(path, 10)
