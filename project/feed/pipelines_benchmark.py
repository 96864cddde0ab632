"""The pipelines benchmark: the classic naive input pipeline as the yardstick, this project's fast path, its cache.

Every pipeline does the same work, from JPEG files on disk to the normalized float32 batch that
`training_step` receives: decode, random rotation, resize to `image_size`, convert, normalize. All use
the same workers, batch size and sampler; rates are measured in steady state (worker start-up and the
first prefetched batches are not timed), so the ratios say what each design choice buys:

- naive (the yardstick): what a user writes with torchvision's defaults: `ImageFolder` (PIL decode at full
  size), `RandomRotation(rotation)` as is (nearest-neighbour, at full size), `Resize((S, S))`, `ToTensor`,
  `Normalize`, float32 batches from a plain DataLoader;
- naive_bilinear: the same with a bilinear rotation, the quality the fast path keeps (slower: labelled
  as such, never the yardstick);
- fast: `ImageDataModule`: DCT-scaled JPEG decode, then resize, rotation and flip in one resampling at
  the training size, uint8 batches, float conversion and normalization batched after the loader;
- cache: the same DataModule with `cache=True`: the loader copies decoded pixels out of a memory map;
- streaming: the same DataModule reading the images written once as a local litdata dataset
  (`scripts/optimize_data.py`, JPEGs stored at 256 px), through its own StreamingDataLoader.

`compare_pipelines` returns rows like `{"pipeline": "naive", "images_per_s": 210.0, "vs_naive": 1.0, ...}`.
The loader, the timing and the repeats are `project.feed.throughput`'s (`steady_loader`,
`measure_loader`, `best_of`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision import transforms as T

from project.data.builtin import generate_shapes
from project.data.datamodule import ImageDataModule
from project.data.folder import load_image
from project.data.streaming import is_streaming_source
from project.data.transforms import IMAGENET_MEAN, IMAGENET_STD, RandomResizeRotateFlip
from project.feed.cache_builder import open_cache
from project.feed.throughput import (
    Rate,
    best_of,
    measure_loader,
    steady_loader,
    time_calls,
    torch_threads,
    usable_cpus,
)
from project.runtime.flags import unfinished_write
from project.tools.streaming_reader import StreamingReader
from project.tools.streaming_writer import optimize_datamodule


def make_benchmark_images(root: str | os.PathLike, image_size: int = 1024, per_class: int = 40) -> Path:
    """The built-in shapes as `image_size` px JPEGs in `root/train/<class>/` (reused when already there)."""
    return generate_shapes(root, image_size=image_size, per_class={"train": per_class}, progress=False)


def naive_transforms(image_size: int, rotation: float, bilinear: bool = False) -> list:
    """torchvision's classic recipe, called with its defaults (bilinear: the rotation's one change)."""
    bilinear_rotation = T.RandomRotation(rotation, interpolation=T.InterpolationMode.BILINEAR)
    rotate = bilinear_rotation if bilinear else T.RandomRotation(rotation)
    return [rotate, T.Resize((image_size, image_size)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def naive_dataset(
    data_dir: str | os.PathLike, image_size: int = 224, rotation: float = 30.0, bilinear: bool = False
) -> Dataset:
    """The yardstick: full-size PIL decode, then `naive_transforms`, through torchvision's `ImageFolder`."""
    transform = T.Compose(naive_transforms(image_size, rotation, bilinear))
    return datasets.ImageFolder(str(Path(data_dir) / "train"), transform=transform)


class NoWork(Dataset):
    """A dataset that does nothing per image: the loader's own ceiling (collate and inter-process copy)."""

    def __init__(self, length: int, image_size: int) -> None:
        self.length, self.image = length, torch.zeros(3, image_size, image_size, dtype=torch.uint8)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.image.clone(), 0


def compare_pipelines(
    data_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    image_size: int = 224,
    batch_size: int = 32,
    num_workers: int = 2,
    rotation: float = 30.0,
    batches: int = 20,
    warmup: int | None = None,
    rounds: int = 1,
    include: Iterable[str] = ("naive", "naive_bilinear", "fast", "fast_device_aug", "cache", "streaming", "no_work"),
) -> list[dict[str, Any]]:
    """Measure the pipelines on `data_dir/train` (e.g. from `make_benchmark_images`), side by side.

    Returns one row per pipeline: `{"pipeline", "description", "images_per_s", "vs_naive",
    "cpu_ms_per_image", "cpu_vs_naive"}` (the last: how many times less CPU work per image); with
    `rounds > 1` each pipeline is measured that many times (interleaved) and its best rate kept,
    which filters out other load on a shared machine. The cache is built in `cache_dir` first
    (not timed). `warmup`: batches fetched before timing (default: `throughput.warmup_batches`).

    The main process, whose only work here is the DataModule's batch transform (on a GPU, work for the
    device), runs with the CPUs the workers leave, at least one intra-op thread: with 2 workers on 2
    cores, a second thread would spin between batches on a core a worker needs.
    """
    include = list(include)

    stream_dir = Path(cache_dir) / "stream"

    def datamodule(augment_on: str, cache: bool, streaming: bool = False) -> tuple[DataLoader, Callable]:
        dm = ImageDataModule(
            stream_dir if streaming else data_dir,
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            rotation=rotation,
            hflip=False,
            augment_on=augment_on,
            cache=cache,
            cache_dir=None if streaming else cache_dir,
            open_cache=open_cache,
            open_stream=StreamingReader,
        )
        dm.setup("fit")
        if streaming:  # an iterable dataset: its own loader, read to its end at most once per measurement
            return dm.train_dataloader(), lambda images: dm.device_transform(images, augment=True)
        # its dataset through the same plain loader as the naive one, then what on_after_batch_transfer
        # does to a training batch (here the device is the CPU)
        loader = steady_loader(dm.train_set, batch_size, num_workers)
        return loader, lambda images: dm.device_transform(images, augment=True)

    def plain(dataset: Dataset) -> tuple[DataLoader, None]:
        return steady_loader(dataset, batch_size, num_workers), None

    described = {
        "naive": "torchvision defaults: PIL full decode, RandomRotation (nearest) at full size, Resize, ToTensor, "
        "Normalize; float32 batches",
        "naive_bilinear": "the naive pipeline with a bilinear rotation (slower than the yardstick)",
        "fast": "draft decode, one resample for resize+rotate at training size (workers); uint8, normalize after",
        "fast_device_aug": "draft decode, resize (workers); uint8 batches; batched rotation + normalize after",
        "cache": "uint8 pixels from the decoded cache, rotate (workers); normalize after",
        "streaming": "JPEGs stored at 256 px in local litdata chunks: decode, resize+rotate (workers); normalize after",
        "no_work": "a loader that does no per-image work: the ceiling for any cache",
    }
    builders: dict[str, Callable[[], tuple[DataLoader, Callable | None]]] = {
        "naive": lambda: plain(naive_dataset(data_dir, image_size, rotation)),
        "naive_bilinear": lambda: plain(naive_dataset(data_dir, image_size, rotation, bilinear=True)),
        "fast": lambda: datamodule("cpu", cache=False),
        "fast_device_aug": lambda: datamodule("device", cache=False),
        "cache": lambda: datamodule("cpu", cache=True),
        "streaming": lambda: datamodule("cpu", cache=False, streaming=True),
        "no_work": lambda: plain(NoWork(batch_size, image_size)),
    }

    def measure(name: str) -> Callable[[], Rate]:
        def run() -> Rate:
            loader, to_batch = builders[name]()
            return measure_loader(loader, batches=batches, warmup=warmup, to_batch=to_batch)

        return run

    if "cache" in include:
        datamodule("cpu", cache=True)  # build it now, outside the timing
    written = is_streaming_source(str(stream_dir)) and not unfinished_write(str(stream_dir))
    if "streaming" in include and not written:  # an interrupted earlier write is completed
        source = ImageDataModule(data_dir, image_size=image_size, num_workers=num_workers, val_fraction=0.05)
        optimize_datamodule(source, str(stream_dir), image_size=256, num_workers=max(1, num_workers), progress=False)
    with torch_threads(usable_cpus() - num_workers):
        best = best_of(rounds, {name: measure(name) for name in include})
    naive = best.get("naive")
    rows = []
    for name in include:
        rate, cpu = best[name], best[name].cpu_ms_per_sample
        rows.append(
            {
                "pipeline": name,
                "description": described[name],
                "images_per_s": round(rate.per_s, 1),
                "vs_naive": round(rate.per_s / naive.per_s, 2) if naive else None,
                # a loader whose workers are not this process's children (litdata's) shows none of their time
                "cpu_ms_per_image": round(cpu, 2) if cpu > 0 else None,
                "cpu_vs_naive": round(naive.cpu_ms_per_sample / cpu, 2) if naive and cpu > 0 else None,
            }
        )
    return rows


def stage_costs(
    data_dir: str | os.PathLike, image_size: int = 224, rotation: float = 30.0, images: int = 16, batch_size: int = 32
) -> list[dict[str, Any]]:
    """Per-image CPU milliseconds of each stage, for the naive pipeline and the fast one, on `images` files.

    read: the file's bytes; decode: PIL at full size (naive) or DCT-scaled (fast); rotate, resize: the naive
    pipeline's two full-size steps, and the fast path's single resampling (under rotate); to_tensor:
    ToTensor + Normalize to float32 (naive; the fast path's uint8 tensor comes out of its resampling);
    collate: stacking a batch; copy: a batch into shared memory, as a worker hands it over (both per image).
    Rows: `{"stage", "naive_cpu_ms", "fast_cpu_ms"}`, the last one the totals. Measured with one torch thread,
    as in a DataLoader worker (more threads would add their spinning to the CPU time, not speed).
    """
    with torch_threads(1):
        return _stage_costs(data_dir, image_size, rotation, images, batch_size)


def _stage_costs(data_dir: str | os.PathLike, image_size: int, rotation: float, images: int, batch_size: int) -> list:
    paths = sorted(str(p) for p in Path(data_dir, "train").rglob("*.jpg"))[:images]
    raw = [Path(p).read_bytes() for p in paths]
    full = [Image.open(io.BytesIO(b)).convert("RGB") for b in raw]
    rotate, resize, to_tensor, normalize = naive_transforms(image_size, rotation)
    rotated = [rotate(image) for image in full]
    small = [resize(image) for image in rotated]
    drafted = [load_image(p, image_size) for p in paths]
    augment = RandomResizeRotateFlip(image_size, rotation, hflip=False)
    outputs = {"naive": [normalize(to_tensor(image)) for image in small], "fast": [augment(i) for i in drafted]}

    def cpu_ms(fn: Callable[[int], Any], per_call: int = 1) -> float:
        return round(time_calls(fn, len(paths), min_seconds=0.2).cpu_ms_per_sample / per_call, 3)

    def batch(kind: str) -> list[torch.Tensor]:
        return [outputs[kind][i % len(paths)] for i in range(batch_size)]

    def batch_stages(kind: str) -> tuple[float, float]:
        stacked = torch.stack(batch(kind))
        collate = cpu_ms(lambda _: torch.stack(batch(kind)), batch_size)
        return collate, cpu_ms(lambda _: stacked.clone().share_memory_(), batch_size)

    (naive_collate, naive_copy), (fast_collate, fast_copy) = batch_stages("naive"), batch_stages("fast")
    read = cpu_ms(lambda i: Path(paths[i]).read_bytes())
    rows = [
        {"stage": "read", "naive_cpu_ms": read, "fast_cpu_ms": read},
        {
            "stage": "decode",
            "naive_cpu_ms": cpu_ms(lambda i: Image.open(io.BytesIO(raw[i])).convert("RGB")),
            "fast_cpu_ms": cpu_ms(lambda i: load_image(io.BytesIO(raw[i]), image_size)),  # bytes in memory: as naive
        },
        {
            "stage": "rotate",
            "naive_cpu_ms": cpu_ms(lambda i: rotate(full[i])),
            "fast_cpu_ms": cpu_ms(lambda i: augment(drafted[i])),
        },
        {"stage": "resize", "naive_cpu_ms": cpu_ms(lambda i: resize(rotated[i])), "fast_cpu_ms": 0.0},
        {"stage": "to_tensor", "naive_cpu_ms": cpu_ms(lambda i: normalize(to_tensor(small[i]))), "fast_cpu_ms": 0.0},
        {"stage": "collate", "naive_cpu_ms": naive_collate, "fast_cpu_ms": fast_collate},
        {"stage": "copy", "naive_cpu_ms": naive_copy, "fast_cpu_ms": fast_copy},
    ]
    totals = {key: round(sum(row[key] for row in rows), 2) for key in ("naive_cpu_ms", "fast_cpu_ms")}
    return [*rows, {"stage": "total", **totals}]
