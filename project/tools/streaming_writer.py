"""The streaming writer: an image folder (or the built-in data) written once as a litdata dataset that
`ImageDataModule` streams (`project.data.streaming` reads it; scripts/optimize_data.py runs this).

A write survives being killed: its worker processes die with it, and the same command run again keeps the
splits the killed write finished and writes the others from scratch. A local output's size is estimated
and checked against the free space before anything is written; a disk that fills up anyway ends the write
with one line, and the folder, refused for training, names the command that completes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import io
import json
import multiprocessing
import os
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from litdata import optimize
from PIL import Image

from project.data import ImageDataModule
from project.data.folder import BadImageError, load_image
from project.data.streaming import METADATA, RECORD, SPLITS, is_url, join
from project.runtime.checkpoints import DISK_FULL, is_alive
from project.runtime.faults import named_line
from project.tools.streaming_reader import object_store, read_json

# litdata's advice (64 MB): few requests per epoch, and only a few chunks per worker on the local disk at a time
CHUNK_BYTES = 64 * 1000**2
IMAGE_SIZE = 256  # the stored shorter side: room for random crops and the 224 px most backbones take
JPEG_QUALITY = 90  # as the built-in dataset is written: no visible loss, a quarter of PNG's bytes
# the size estimate: this many images re-encoded (well under a second even at 1024 px), their mean size
# times the count, plus 10 % for litdata's per-item headers and the chunks' index
SIZE_SAMPLE, SIZE_MARGIN = 16, 1.1
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


# ---------------------------------------------------------------------------------------------- workers
def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux), and end it now if `parent` is gone.

    Without it, litdata's workers outlive a killed writer: one whose queue runs dry waits 300 s
    (DATA_OPTIMIZER_TIMEOUT) for more inputs, then writes its last chunk and index into the output folder,
    over what the next run writes there. litdata itself never checks for its parent.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above: no signal will come
        os._exit(1)


_forking_parent: int | None = None  # while a split is written: the PID of the process that forks


def _before_fork() -> None:
    global _forking_parent
    if _forking_parent is not None:
        _forking_parent = os.getpid()  # the writer, or one of its workers starting a helper process


def _after_fork_in_child() -> None:
    if _forking_parent is not None:
        die_with_parent(_forking_parent)


@functools.cache
def watch_forks() -> None:
    """Under fork (the start method on Linux up to Python 3.13) each worker watches its parent from its first
    instant. Registered at the first write, once (a fork hook cannot be removed), not at import."""
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def remove_dead_writers_inputs() -> None:
    """Remove the input lists killed writers left in the temporary folder.

    litdata's writer keeps its inputs in <tmp>/litdata-node-<rank>-items-<pid>-<random>.pkl and removes the
    file only when it ends well: each kill would leak one, as big as the list of inputs.
    """
    for path in Path(tempfile.gettempdir()).glob("litdata-node-*-items-*-*.pkl"):
        pid = path.name.split("-items-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not is_alive(int(pid)):
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- samples
def encode_image(path: str, max_size: int) -> bytes:
    """`path` decoded (RGB, upright), its shorter side brought down to `max_size` (never up), as JPEG bytes.

    Every image is re-encoded, even one already small enough: training then decodes one kind of file
    (baseline RGB JPEG, no EXIF rotation, no alpha, no CMYK).
    """
    image = load_image(path, min_size=max_size)
    scale = max_size / min(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)  # done once: the sharpest filter is affordable
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


class EncodeSample:
    """optimize()'s function, run in its workers: `(path, label)` -> one sample, or none for an unreadable
    file when skipping them (named on stderr; the count is the gap between inputs and samples written)."""

    def __init__(self, image_size: int, skip_bad_images: bool) -> None:
        self.image_size, self.skip_bad_images = image_size, skip_bad_images
        self.watching = False

    def __call__(self, item: tuple[str, int]) -> Iterator[dict[str, Any]]:
        # spawn and forkserver start workers without the fork hook above
        if not self.watching and multiprocessing.parent_process() is not None:
            self.watching = True
            die_with_parent(os.getppid())
        path, label = item
        try:
            image = encode_image(path, self.image_size)
        except BadImageError as error:
            if not self.skip_bad_images:
                raise
            print(f"skipped {named_line(error)}", file=sys.stderr)
            return
        yield {"image": image, "label": int(label)}


def estimate_bytes(samples: Sequence[tuple[str, int]], image_size: int) -> int:
    """About how many bytes `samples` take once written, from a few of them re-encoded (spread over the list)."""
    picked = samples[:: max(1, len(samples) // SIZE_SAMPLE)][:SIZE_SAMPLE]
    sizes = []
    for path, _ in picked:
        with contextlib.suppress(BadImageError):  # the write names it, or skips it
            sizes.append(len(encode_image(path, image_size)))
    return round(statistics.fmean(sizes) * len(samples) * SIZE_MARGIN) if sizes else 0


def check_free_space(folder: str, needed: int) -> None:
    """`OSError(ENOSPC)` naming `folder` when its disk has fewer than `needed` bytes free."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):  # the folder is made by the write
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise OSError(
            errno.ENOSPC,
            f"{folder}: the dataset needs about {needed:,} bytes, the disk has {free:,} free; "
            "free some space or pick another --output_dir",
        )


# ---------------------------------------------------------------------------------------------- writing
def write_json(root: str, name: str, content: dict[str, Any]) -> None:
    text = json.dumps(content, indent=1)
    if not is_url(root):
        os.makedirs(root, exist_ok=True)
        partial = join(root, name + ".partial")
        with open(partial, "w") as f:
            f.write(text)
        os.replace(partial, join(root, name))  # renamed into place: never half-written
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, name)
        with open(local, "w") as f:
            f.write(text)
        object_store(root).upload_file(local, join(root, name))


def count_samples(root: str) -> int:
    return sum(chunk["chunk_size"] for chunk in read_json(root, "index.json")["chunks"])


def disk_full(output_dir: str) -> OSError:
    free = shutil.disk_usage(output_dir).free if os.path.isdir(output_dir) else 0
    return OSError(
        errno.ENOSPC,
        f"the disk of {output_dir} filled up ({free:,} bytes free); free some space, then run the same "
        "command again to complete the dataset",
    )


def write_split(
    samples: Sequence[tuple[str, int]],
    output_dir: str,
    image_size: int,
    num_workers: int,
    seed: int,
    skip_bad_images: bool = False,
    progress: bool = True,
    chunk_bytes: int = CHUNK_BYTES,
) -> int:
    """One split as a litdata optimized dataset at `output_dir` (a folder or a URL); returns the samples written.

    A full disk is an `OSError(ENOSPC)` saying so in one line; the split's partial chunks are then removed.
    """
    global _forking_parent
    # litdata shuffles chunks and items within a chunk, never across: a class-sorted folder written in order
    # would give batches of one class, so the order is shuffled (seeded) once, here
    order = np.random.default_rng(seed).permutation(len(samples))
    inputs = [tuple(samples[i]) for i in order]
    # litdata's verbose mode prints setup chatter on stdout; its progress bar is on stderr and stays
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            watch_forks()
            _forking_parent = os.getpid()
            optimize(
                fn=EncodeSample(image_size, skip_bad_images),
                inputs=inputs,
                output_dir=output_dir,
                chunk_bytes=chunk_bytes,
                num_workers=max(1, num_workers),
                # a split cut short is written again whole (a URL's leftovers deleted by "overwrite", a folder's
                # by clear_output): litdata resumes one (use_checkpoint) only with a fixed share of the inputs
                # per worker (keep_data_ordered=True), which leaves a helper process behind when a worker
                # fails; and "append" resumes nothing, it numbers new chunks after the old ones
                mode="overwrite",
                reorder_files=False,  # its default orders the inputs by file size, undoing the shuffle
                # workers share one queue of the shuffled inputs (the order written is that one, give or take which
                # worker finishes first)
                keep_data_ordered=False,
                # the current method, which optimize() would otherwise switch to spawn for the whole process
                start_method=multiprocessing.get_start_method(),
                verbose=progress,
            )
        # a worker's failure arrives as its traceback, text in a RuntimeError; one in this process (merging the
        # workers' indexes) as itself
        except (RuntimeError, OSError) as error:
            if progress:
                print(file=sys.stderr)  # the failed write's progress bar leaves its line unfinished
            text = str(error)
            if getattr(error, "errno", None) in DISK_FULL or any(f"[Errno {code}]" in text for code in DISK_FULL):
                remove_split(output_dir)  # gives the space back; the next run writes the split again
                raise disk_full(os.path.dirname(output_dir)) from None
            if "cannot read image " in text:
                raise BadImageError(text) from None
            raise
        finally:
            _forking_parent = None
    return count_samples(output_dir)


def remove_split(folder: str) -> None:
    if not is_url(folder):
        shutil.rmtree(folder, ignore_errors=True)


def rerun_command(datamodule: ImageDataModule, output_dir: str, image_size: int, chunk_bytes: int) -> str:
    """The optimize_data.py command that writes this output, with absolute paths (it is run from anywhere)."""
    h = datamodule.hparams
    argv = ["python", "scripts/optimize_data.py"]
    if h.data_dir is not None:
        argv += ["--data_dir", os.path.abspath(h.data_dir)]
    argv += ["--output_dir", output_dir if is_url(output_dir) else os.path.abspath(output_dir)]
    argv += ["--image_size", str(image_size)] if image_size != IMAGE_SIZE else []
    argv += ["--seed", str(h.seed)] if h.seed != 0 else []
    argv += ["--skip_bad_images"] if h.skip_bad_images else []
    argv += ["--chunk_bytes", str(chunk_bytes)] if chunk_bytes != CHUNK_BYTES else []
    return shlex.join(argv)


def finished_splits(root: str, settings: dict[str, Any]) -> list[str]:
    """The splits of a local folder that an earlier write with the same `settings` finished (litdata writes a
    split's index.json last): a run after a kill keeps them."""
    if not os.path.isfile(join(root, RECORD)) or read_json(root, RECORD).get("settings") != settings:
        return []
    return [split for split in SPLITS if os.path.isfile(join(root, split, "index.json"))]


def folder_bytes(folder: str) -> int:
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def clear_output(root: str, kept: Sequence[str]) -> None:
    """Remove what an earlier write left in a local folder, but the splits in `kept`."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(join(root, METADATA))  # until every split is written, the folder is not complete
    for split in SPLITS:
        if split not in kept:
            remove_split(join(root, split))  # a killed write's chunks, or another dataset's


def optimize_datamodule(
    datamodule: ImageDataModule,
    output_dir: str,
    image_size: int = IMAGE_SIZE,
    num_workers: int = 1,
    progress: bool = True,
    chunk_bytes: int = CHUNK_BYTES,
) -> dict[str, Any]:
    """Write the splits an `ImageDataModule` reads from its image folder (or the built-in data) as a streaming
    source at `output_dir`: the same train/val/test rules (val split off train/ when there is no val/),
    classes, seed and bad-image handling. Returns the metadata written to classes.json.

    In a local folder, the splits that an interrupted write of the same command finished are kept.
    """
    if datamodule.source.stores_decoded:
        raise ValueError(
            f"--data_dir {datamodule.hparams.data_dir}: give an image folder, not a {datamodule.source.name}"
        )
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("test")
    h = datamodule.hparams
    datasets = {split: getattr(datamodule, f"{split}_set") for split in SPLITS}
    datasets = {split: dataset for split, dataset in datasets.items() if dataset is not None}
    settings = {
        "data_dir": None if h.data_dir is None else os.path.abspath(h.data_dir),
        "images": {split: len(dataset) for split, dataset in datasets.items()},  # a changed folder starts over
        **{name: h.get(name) for name in ("seed", "val_fraction", "skip_bad_images")},
        "image_size": image_size,
        "chunk_bytes": chunk_bytes,
    }
    remove_dead_writers_inputs()
    kept = [] if is_url(output_dir) else finished_splits(output_dir, settings)
    if not is_url(output_dir):
        todo = [sample for split, dataset in datasets.items() if split not in kept for sample in dataset.samples]
        replaced = sum(folder_bytes(join(output_dir, split)) for split in SPLITS if split not in kept)
        check_free_space(output_dir, estimate_bytes(todo, image_size) - replaced)  # before anything is removed
        clear_output(output_dir, kept)
    command = rerun_command(datamodule, output_dir, image_size, chunk_bytes)
    write_json(output_dir, RECORD, {"command": command, "settings": settings})  # first: the command completes it
    samples = {}
    for split, dataset in datasets.items():
        folder = join(output_dir, split)
        if split in kept:
            samples[split] = count_samples(folder)
            if progress:
                print(f"{folder}: kept, written by an earlier run of this command", file=sys.stderr)
            continue
        if progress:
            print(f"{folder}: {len(dataset)} images", file=sys.stderr)
        samples[split] = write_split(
            dataset.samples,
            folder,
            image_size,
            num_workers,
            seed=h.seed,
            skip_bad_images=h.skip_bad_images,
            progress=progress,
            chunk_bytes=chunk_bytes,
        )
    skipped = {split: len(dataset) - samples[split] for split, dataset in datasets.items()}
    metadata = {"classes": list(datamodule.classes), "image_size": image_size, "samples": samples, "skipped": skipped}
    write_json(output_dir, METADATA, metadata)  # last: its presence means every split is complete
    return metadata
