"""The pipelines benchmark: the classic naive input pipeline as the yardstick, this project's fast path, its cache.

Every pipeline does the same work, from JPEG files on disk to the normalized float32 batch that
`training_step` receives: decode, random rotation, resize to `image_size`, convert, normalize. All use
the same workers, batch size and sampler; rates are measured in steady state (worker start-up and the
first prefetched batches are not timed), so the ratios say what each design choice buys:

- naive: torchvision `ImageFolder` (PIL decode at full size), `RandomRotation` at full size, `Resize`,
  `ToTensor`, `Normalize`, float32 batches from a plain DataLoader;
- fast: `ImageDataModule`: DCT-scaled JPEG decode, resize first, rotate at the training size, uint8
  batches, float conversion and normalization batched after the loader (its `DeviceTransform`);
- cache: the same DataModule with `cache=True`: the loader copies decoded pixels out of a memory map.

`compare_pipelines` returns rows like `{"pipeline": "naive", "images_per_s": 210.0, "vs_naive": 1.0, ...}`.
The loader, the timing and the repeats are `project.feed.throughput`'s (`steady_loader`,
`measure_loader`, `best_of`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision import transforms as T

from project.data.builtin import generate_shapes
from project.data.datamodule import ImageDataModule
from project.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from project.feed.throughput import Rate, best_of, measure_loader, steady_loader


def make_benchmark_images(root: str | os.PathLike, image_size: int = 1024, per_class: int = 40) -> Path:
    """The built-in shapes as `image_size` px JPEGs in `root/train/<class>/` (reused when already there)."""
    return generate_shapes(root, image_size=image_size, per_class={"train": per_class}, progress=False)


def naive_dataset(data_dir: str | os.PathLike, image_size: int = 224, rotation: float = 15.0) -> Dataset:
    """The classic recipe: full-size PIL decode, rotation at full size, resize, float tensor, normalize."""
    return datasets.ImageFolder(
        str(Path(data_dir) / "train"),
        transform=T.Compose(
            [
                T.RandomRotation(rotation, interpolation=T.InterpolationMode.BILINEAR),
                T.Resize(image_size),
                T.CenterCrop(image_size),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        ),
    )


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
    rotation: float = 15.0,
    batches: int = 20,
    warmup: int | None = None,
    rounds: int = 1,
    include: Iterable[str] = ("naive", "fast", "fast_device_aug", "cache", "no_work"),
) -> list[dict[str, Any]]:
    """Measure the pipelines on `data_dir/train` (e.g. from `make_benchmark_images`), side by side.

    Returns one row per pipeline: `{"pipeline", "description", "images_per_s", "vs_naive",
    "cpu_ms_per_image", "cpu_vs_naive"}` (the last: how many times less CPU work per image); with
    `rounds > 1` each pipeline is measured that many times (interleaved) and its best rate kept,
    which filters out other load on a shared machine. The cache is built in `cache_dir` first
    (not timed). `warmup`: batches fetched before timing (default: `throughput.warmup_batches`).
    """
    include = list(include)

    def datamodule(augment_on: str, cache: bool) -> tuple[DataLoader, Callable]:
        dm = ImageDataModule(
            data_dir,
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            rotation=rotation,
            hflip=False,
            augment_on=augment_on,
            cache=cache,
            cache_dir=cache_dir,
        )
        dm.setup("fit")
        # its dataset through the same plain loader as the naive one, then what on_after_batch_transfer
        # does to a training batch (here the device is the CPU)
        loader = steady_loader(dm.train_set, batch_size, num_workers)
        return loader, lambda images: dm.device_transform(images, augment=True)

    def plain(dataset: Dataset) -> tuple[DataLoader, None]:
        return steady_loader(dataset, batch_size, num_workers), None

    described = {
        "naive": "PIL full decode, RandomRotation at full size, Resize, ToTensor, Normalize; float32 batches",
        "fast": "draft decode, resize, rotate at training size (workers); uint8 batches, normalize after",
        "fast_device_aug": "draft decode, resize (workers); uint8 batches; batched rotation + normalize after",
        "cache": "uint8 pixels from the decoded cache, rotate (workers); normalize after",
        "no_work": "a loader that does no per-image work: the ceiling for any cache",
    }
    builders: dict[str, Callable[[], tuple[DataLoader, Callable | None]]] = {
        "naive": lambda: plain(naive_dataset(data_dir, image_size, rotation)),
        "fast": lambda: datamodule("cpu", cache=False),
        "fast_device_aug": lambda: datamodule("device", cache=False),
        "cache": lambda: datamodule("cpu", cache=True),
        "no_work": lambda: plain(NoWork(batch_size, image_size)),
    }

    def measure(name: str) -> Callable[[], Rate]:
        def run() -> Rate:
            loader, to_batch = builders[name]()
            return measure_loader(loader, batches=batches, warmup=warmup, to_batch=to_batch)

        return run

    if "cache" in include:
        datamodule("cpu", cache=True)  # build it now, outside the timing
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
                "cpu_ms_per_image": round(cpu, 2),
                "cpu_vs_naive": round(naive.cpu_ms_per_sample / cpu, 2) if naive and cpu > 0 else None,
            }
        )
    return rows
