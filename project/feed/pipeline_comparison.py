"""Input pipelines side by side: the classic naive one as the yardstick, this project's fast path, its cache.

Every pipeline does the same work, from JPEG files on disk to the normalized float32 batch that
`training_step` receives: decode, random rotation, resize to `image_size`, convert, normalize. All use
the same workers, batch size and sampler; rates are measured in steady state (worker start-up and the
first prefetched batches are not timed), so the ratios say what each design choice buys:

- naive: torchvision `ImageFolder` (PIL decode at full size), `RandomRotation` at full size, `Resize`,
  `ToTensor`, `Normalize`, float32 batches from a plain DataLoader;
- fast: `ImageDataModule`: DCT-scaled JPEG decode, resize first, rotate at the training size, uint8
  batches, float conversion and normalization batched after the loader (its `DeviceTransform`);
- cache: the same DataModule with `cache=True`: the loader copies decoded pixels out of a memory map.

`compare_pipelines` returns rows like `{"pipeline": "naive", "images_per_s": 210.0, "vs_naive": 1.0, ...}`;
`per_image_costs` times the single steps on one core. Rates come from `throughput.measure_loader`.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision import datasets
from torchvision import transforms as T
from torchvision.transforms import v2

from project.data.builtin import generate_shapes
from project.data.datamodule import ImageDataModule
from project.data.folder import load_image
from project.data.transforms import IMAGENET_MEAN, IMAGENET_STD, DeviceTransform
from project.feed.throughput import measure_loader


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


class _NoWork(Dataset):
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
    warmup: int = 4,
    rounds: int = 1,
    include: Iterable[str] = ("naive", "fast", "fast_device_aug", "cache", "no_work"),
) -> list[dict[str, Any]]:
    """Measure the pipelines on `data_dir/train` (e.g. from `make_benchmark_images`), side by side.

    Returns one row per pipeline: `{"pipeline", "description", "images_per_s", "vs_naive",
    "cpu_ms_per_image", "cpu_vs_naive"}` (the last: how many times less CPU work per image); with
    `rounds > 1` each pipeline is measured that many times (interleaved) and its best rate kept,
    which filters out other load on a shared machine. The cache is built in `cache_dir` first
    (not timed).
    """
    include = list(include)
    samples = batch_size * (batches + warmup)

    def loader(dataset: Dataset) -> DataLoader:
        # one long epoch, sampled with replacement: no epoch boundary (and no worker restart) inside the timing
        sampler = RandomSampler(
            dataset, replacement=True, num_samples=samples, generator=torch.Generator().manual_seed(0)
        )
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers)

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
        return loader(dm.train_set), lambda images: dm.device_transform(images, augment=True)

    described = {
        "naive": "PIL full decode, RandomRotation at full size, Resize, ToTensor, Normalize; float32 batches",
        "fast": "draft decode, resize, rotate at training size (workers); uint8 batches, normalize after",
        "fast_device_aug": "draft decode, resize (workers); uint8 batches; batched rotation + normalize after",
        "cache": "uint8 pixels from the decoded cache, rotate (workers); normalize after",
        "no_work": "a loader that does no per-image work: the ceiling for any cache",
    }
    builders: dict[str, Callable[[], tuple[DataLoader, Callable | None]]] = {
        "naive": lambda: (loader(naive_dataset(data_dir, image_size, rotation)), None),
        "fast": lambda: datamodule("cpu", cache=False),
        "fast_device_aug": lambda: datamodule("device", cache=False),
        "cache": lambda: datamodule("cpu", cache=True),
        "no_work": lambda: (loader(_NoWork(samples, image_size)), None),
    }
    if "cache" in include:
        datamodule("cpu", cache=True)  # build it now, outside the timing
    best: dict[str, dict[str, float]] = {}
    for _ in range(rounds):
        for name in include:
            timed_loader, to_batch = builders[name]()
            rate = measure_loader(timed_loader, batches=batches, warmup=warmup, to_batch=to_batch)
            if name not in best or rate.per_s > best[name]["images_per_s"]:
                best[name] = {"images_per_s": rate.per_s, "cpu_ms_per_image": rate.cpu_ms_per_sample}
    rows = []
    for name in include:
        rate, cpu = best[name]["images_per_s"], best[name]["cpu_ms_per_image"]
        naive = best.get("naive")
        rows.append(
            {
                "pipeline": name,
                "description": described[name],
                "images_per_s": round(rate, 1),
                "vs_naive": round(rate / naive["images_per_s"], 2) if naive else None,
                "cpu_ms_per_image": round(cpu, 2),
                "cpu_vs_naive": round(naive["cpu_ms_per_image"] / cpu, 2) if naive and cpu > 0 else None,
            }
        )
    return rows


def _time_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # first call pays for lazy imports and allocations
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def per_image_costs(
    path: str | os.PathLike, image_size: int = 224, rotation: float = 15.0, repeats: int = 10
) -> list[dict[str, Any]]:
    """Milliseconds per image for each step, on one core: `[{"step": ..., "ms": ...}, ...]`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = Path(path).read_bytes()  # from memory: time the decoder, not the disk
        full = Image.open(io.BytesIO(data)).convert("RGB")
        small = load_image(io.BytesIO(data), image_size)  # type: ignore[arg-type]
        small = T.CenterCrop(image_size)(T.Resize(image_size)(small))
        tensor = v2.functional.pil_to_tensor(small)
        rotate = T.RandomRotation(rotation, interpolation=T.InterpolationMode.BILINEAR)
        batch = torch.from_numpy(np.stack([np.asarray(small)] * 32)).permute(0, 3, 1, 2).contiguous()
        device_tf = DeviceTransform(rotation=rotation)
        steps = [
            (f"decode {full.width} px JPEG, full size", lambda: Image.open(io.BytesIO(data)).convert("RGB")),
            (f"decode DCT-scaled (draft) for {image_size} px", lambda: load_image(io.BytesIO(data), image_size)),
            (f"rotate at {full.width} px (PIL, bilinear)", lambda: rotate(full)),
            (f"rotate at {image_size} px (PIL, bilinear)", lambda: rotate(small)),
            (f"rotate at {image_size} px (uint8 tensor)", lambda: rotate(tensor)),
            (f"resize {full.width} -> {image_size} px", lambda: T.Resize(image_size)(full)),
            (
                f"ToTensor + Normalize at {image_size} px (float32)",
                lambda: T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(small)),
            ),
            (f"batched rotate + normalize at {image_size} px, per image of 32", lambda: device_tf(batch, augment=True)),
        ]
        rows = []
        for name, fn in steps:
            ms = _time_ms(fn, repeats)
            rows.append({"step": name, "ms": round(ms / 32 if "per image of 32" in name else ms, 2)})
        return rows
    finally:
        torch.set_num_threads(threads)
