"""`ImageDataModule`: everything about data for a run, from files to normalized batches on the device: where the
data comes from (one source, `project.data.sources`), the datasets of each split, the DataLoaders with every
setting people tune, and the batch work done on the device after transfer (`on_after_batch_transfer`)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveInt,
    restricted_number_type,
)
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision.transforms import v2

from project.conflicts import conflict
from project.data import sources
from project.data import transforms as T
from project.data.builtin import generate_shapes
from project.data.streaming import is_streaming_source, is_url
from project.data.transforms import IMAGENET_MEAN, IMAGENET_STD, DeviceTransform

# the extras' parts some flags need, which the training run hands over (project.training.HANDED_OVER): the core
# imports no extras
HANDED_OVER = ("open_stream", "open_cache", "decode_jpegs", "bad_image_skipper")
BUILTIN_DIR = "data/shapes"  # relative to the working directory, like lightning_logs/
Sampler = Literal["random", "balanced"]
AugmentOn = Literal["auto", "cpu", "device"]
# value ranges the flags enforce (a bad value is a one-line usage error naming the flag)
Degrees = restricted_number_type("Degrees", float, [(">=", 0), ("<=", 180)])
Seed = restricted_number_type("Seed", int, [(">=", 0), ("<=", 2**32 - 1)])


class ImageDataModule(L.LightningDataModule):
    """Image data: an image folder, its decoded cache, a streaming dataset, or your own datasets (`datasets`).

    Every parameter is also a flag of `scripts/train.py` (same name, its type, default and the line below as
    help), and is kept in `self.hparams`. Flags that cannot work together are refused when it is built
    (`project.conflicts`).

    What the extras read (and never write): `source` (the `DataSource` the flags picked), `classes`,
    `preprocessing`, `num_workers` (the worker count in use: the training run alone sets it, after measuring),
    `augment_on` ("cpu" or "device", decided at the first `setup`), `pin_memory`, `bad_images` (unreadable
    files skipped so far; it only grows), `train_set`, `val_set`, `test_set`, `device_transform`.

    Args:
        data_dir: data_dir/train/<class>/* with optional val/ and test/ (or class folders alone), or a streaming
            dataset written by optimize_data.py (its folder, or an s3:// / gs:// URL); None: the built-in shapes
        image_size: side in pixels of the square images the model sees (shorter side resized, centre crop)
        batch_size: images per batch (per device)
        num_workers: DataLoader worker processes, or auto: the training run measures a short sweep and picks the count
        drop_last: drop the last incomplete training batch (validation and test keep every image)
        shuffle: shuffle the training data every epoch
        sampler: random (plain shuffle) or balanced (class-balanced weighted sampling with replacement)
        collate_fn: the DataLoaders' collate function (None: PyTorch's default)
        open_stream: opens a streaming data_dir (one of the extras' parts listed in HANDED_OVER, which train.py gives)
        open_cache: with cache: a split's decoded cache, built when missing or stale (HANDED_OVER)
        decode_jpegs: with decode_on device: makes the batch decoder for an image size (HANDED_OVER)
        bad_image_skipper: with skip_bad_images: wraps a dataset and its collate function (HANDED_OVER)
        pin_memory: page-locked batches for faster copies to the GPU; None: on when training on a CUDA device
        persistent_workers: keep the worker processes alive between epochs
        prefetch_factor: batches each worker loads ahead (None: PyTorch's default, 2)
        rotation: random rotation range in degrees for training (0: off)
        hflip: random horizontal flips for training
        augment_on: where training augmentation runs: cpu (workers, per image), device (after transfer, one batched
            call), auto (device when the accelerator is not the CPU)
        auto_augment: per-image policy in the workers, training only: none, ta_wide (TrivialAugmentWide), ra
            (RandAugment) or augmix
        random_erase: probability of erasing a random rectangle of each training image (in the workers)
        mixup_alpha: MixUp on the device, training batches only, Beta(alpha, alpha) mixing; 0: off
        cutmix_alpha: CutMix on the device, training batches only; 0: off (with mixup_alpha: one of them per batch)
        decode_on: where JPEGs are decoded: cpu (workers, at reduced DCT scale) or device (workers only read the
            bytes; each batch is decoded with nvJPEG on the GPU, then resized and augmented there)
        cache: decode and resize every image once into a uint8 store at image_size; later epochs and runs read memory
            (rebuilt when the files, image_size or the split change)
        cache_dir: where the decoded caches go; None: data/cache/<dataset name>-<path hash>; for a streaming URL:
            where its downloaded chunks go (None: ~/.lightning/chunks, or $LITDATA_CACHE_DIR)
        max_cache_size: streaming URL: disk budget for its downloaded chunks, e.g. 50GB; chunks already read are
            deleted past it (None: litdata's default, 75% of the free disk in recent releases)
        channels_last: hand the model NHWC-strided batches (faster convolutions on tensor-core GPUs)
        val_fraction: share of train/ held out (stratified, seeded) when there is no val/
        seed: seeds the validation split and order, the balanced sampler and (for a run) torch, numpy and the workers
        skip_bad_images: replace unreadable images by the next readable one, count and report them (default: stop)
        max_bad_fraction: with skip_bad_images: stop once more than this share of the images is unreadable
        loader_timeout: seconds a DataLoader worker may spend on one batch before the run stops (0: no limit)
        mean: per-channel normalization mean, applied on the device
        std: per-channel normalization standard deviation, applied on the device
        builtin_dir: where the built-in dataset is generated when data_dir is None
    """

    def __init__(
        self,
        data_dir: str | None = None,
        image_size: PositiveInt = 64,
        batch_size: PositiveInt = 32,
        num_workers: NonNegativeInt | Literal["auto"] = 2,
        drop_last: bool = False,
        shuffle: bool = True,
        sampler: Sampler = "random",
        collate_fn: Callable | None = None,
        open_stream: Callable | None = None,
        open_cache: Callable | None = None,
        decode_jpegs: Callable | None = None,
        bad_image_skipper: Callable | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        prefetch_factor: PositiveInt | None = None,
        rotation: Degrees = 15.0,
        hflip: bool = True,
        augment_on: AugmentOn = "auto",
        auto_augment: Literal["none", "ta_wide", "ra", "augmix"] = "none",
        random_erase: ClosedUnitInterval = 0.0,
        mixup_alpha: NonNegativeFloat = 0.0,
        cutmix_alpha: NonNegativeFloat = 0.0,
        decode_on: Literal["cpu", "device"] = "cpu",
        cache: bool = False,
        cache_dir: str | None = None,
        max_cache_size: str | None = None,
        channels_last: bool = False,
        val_fraction: OpenUnitInterval = 0.1,
        seed: Seed = 0,
        skip_bad_images: bool = False,
        # a broken dataset is mostly unreadable; a real folder has a few bad files (2 of 102 is 0.02)
        max_bad_fraction: ClosedUnitInterval = 0.1,
        loader_timeout: NonNegativeFloat = 0.0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        builtin_dir: str = BUILTIN_DIR,
    ) -> None:
        super().__init__()
        if num_workers == "auto":  # resolved by the training run's measured sweep; until then every CPU but one
            num_workers = max(0, (os.cpu_count() or 1) - 1)
        # primitives only (strings, not Paths): checkpoints must load with torch.load(weights_only=True)
        data_dir = None if data_dir is None else os.fspath(data_dir)
        cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        builtin_dir = os.fspath(builtin_dir)
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        self.save_hyperparameters(ignore=["collate_fn", *HANDED_OVER])
        # callables (the extras' ones handed over by the training run), not hyperparameters
        self.collate_fn, self.open_stream, self.open_cache = collate_fn, open_stream, open_cache
        self.decode_jpegs, self.bad_image_skipper = decode_jpegs, bad_image_skipper

        self.data_dir = Path(data_dir) if data_dir is not None else Path(builtin_dir)
        self.is_builtin = data_dir is None
        streaming = data_dir is not None and is_streaming_source(data_dir)
        facts = {"streaming": streaming, "url": data_dir is not None and is_url(data_dir)}
        if message := conflict({**self.hparams, **facts, "own_datasets": self.brings_own_datasets}):
            raise ValueError(message)
        needs = {"open_stream": streaming, "open_cache": cache, "bad_image_skipper": skip_bad_images}
        needs["decode_jpegs"] = decode_on == "device"  # which handed-over parts these flags need
        if missing := [name for name in HANDED_OVER if needs[name] and getattr(self, name) is None]:
            raise ValueError(f"give the DataModule {missing[0]}=..., as train.py does: project.training.HANDED_OVER")
        self.num_workers: int = num_workers
        self.source = self.make_source(streaming)
        self.augment_on: str | None = None
        self.pin_memory: bool | None = None
        self.bad_images: list[str] = []
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.device_transform = DeviceTransform(mean, std)

    # ------------------------------------------------------------------ source
    def datasets(self, train_transform: Callable, eval_transform: Callable) -> dict[str, Dataset]:
        """Override to bring your own data: return `{"train": ..., "val": ..., "test": ...}` ("val" and "test"
        optional), each built with the transform given here for it (a decoded RGB PIL image -> `(3, S, S)` uint8
        tensor). Items are `(image, label)`; the train dataset has `classes` (names in label order), and `targets`
        for `--sampler balanced` or a "val" split off it; `samples` ((path, label) pairs) for `--cache`.
        See examples/csv_datamodule.py. Not overridden: the image folder at data_dir.
        """
        raise NotImplementedError("the image folder source builds its own datasets")

    @property
    def brings_own_datasets(self) -> bool:
        return type(self).datasets is not ImageDataModule.datasets

    def make_source(self, streaming: bool) -> sources.DataSource:
        """Where the data comes from, picked from the flags: the one place they choose it."""
        h = self.hparams
        if streaming:
            stream = self.open_stream(h.data_dir, h.image_size, h.seed, h.cache_dir, h.max_cache_size)
            return sources.StreamingSource(stream)
        if self.brings_own_datasets:
            source: sources.DataSource = sources.OwnDatasetsSource(self.datasets, h.val_fraction, h.seed)
        elif h.decode_on == "device":
            decode = self.decode_jpegs(h.image_size)
            return sources.EncodedJpegSource(self.data_dir, h.image_size, h.val_fraction, h.seed, decode)
        else:
            source = sources.ImageFolderSource(self.data_dir, h.image_size, h.val_fraction, h.seed)
        if h.cache:
            settings = {"data_dir": str(self.data_dir), "cache_dir": h.cache_dir, "num_workers": self.num_workers}
            source = sources.DecodedCacheSource(
                source, functools.partial(self.open_cache, image_size=h.image_size, **settings)
            )
        return source

    @property
    def classes(self) -> list[str]:
        """Class names in label order (every split has the same ones)."""
        return self.source.classes

    @property
    def preprocessing(self) -> dict[str, Any]:
        """What a model needs to see images as this DataModule shows them (saved in its checkpoint)."""
        return {"image_size": self.hparams.image_size, "mean": list(self.hparams.mean), "std": list(self.hparams.std)}

    # --------------------------------------------------------------- lifecycle
    def prepare_data(self) -> None:
        if self.is_builtin and not self.brings_own_datasets:
            generate_shapes(self.data_dir, image_size=64, seed=0)

    def decide_placement(self) -> None:
        """Where the data work runs, decided once, at the first `setup` (the training run attaches its trainer
        before): augmentation on the accelerator when there is one and augment_on is auto (on the device always
        when the JPEGs are decoded there), pinned batches on CUDA; then the per-image transforms and the device
        step that follow from it."""
        h, trainer = self.hparams, self.trainer
        device = trainer.strategy.root_device.type if trainer is not None else "cpu"
        wanted = h.augment_on == "device" or (h.augment_on == "auto" and device != "cpu")
        on_device = wanted or self.source.decodes_on_device
        self.augment_on = "device" if on_device else "cpu"
        self.pin_memory = h.pin_memory if h.pin_memory is not None else device == "cuda"
        off, augment = (0.0, False), (h.rotation, h.hflip)  # (rotation, hflip): on one side only
        on_cpu, on_accelerator = (off, augment) if on_device else (augment, off)
        recipe = T.recipe_augment(h.auto_augment, h.random_erase, h.mean)  # per image: in the workers wherever
        self.transforms = sources.Transforms(
            T.then(T.train_transform(h.image_size, *on_cpu), recipe),
            T.eval_transform(h.image_size),
            T.then(T.tensor_train_transform(*on_cpu), recipe),
        )
        mixing = ((v2.MixUp, h.mixup_alpha), (v2.CutMix, h.cutmix_alpha))
        mixers = [mix(alpha=alpha, num_classes=len(self.classes)) for mix, alpha in mixing if alpha]
        self.mix = v2.RandomChoice(mixers) if mixers else None
        self.device_transform = DeviceTransform(h.mean, h.std, *on_accelerator, channels_last=h.channels_last)

    def setup(self, stage: str | None = None) -> None:
        if self.augment_on is None:
            self.decide_placement()
        first = self.train_set is None
        if first or self.source.rebuild_each_setup:
            built = self.source.datasets(self.transforms)
            self.train_set, self.val_set, self.test_set = built["train"], built["val"], built.get("test")
            if first:
                rank_zero_info(self.source.summary(built))
            if self.hparams.sampler == "balanced" and not hasattr(self.train_set, "targets"):
                raise ValueError("--sampler balanced weighs classes by the train dataset's `targets`; it has none")

    @property
    def has_test(self) -> bool:
        if self.augment_on is None:
            self.setup("test")
        return self.test_set is not None

    # ----------------------------------------------------------------- loaders
    def loader(self, dataset: Dataset | None, train: bool = False, num_workers: int | None = None) -> DataLoader:
        """The DataLoader of `dataset` with every setting of the flags (`num_workers`: another count, to measure)."""
        if dataset is None:
            raise RuntimeError("call setup() before asking for a DataLoader")
        h, trainer = self.hparams, self.trainer
        workers = self.num_workers if num_workers is None else num_workers
        collate = self.collate_fn or self.source.collate_fn
        settings: dict[str, Any] = {
            "batch_size": h.batch_size,
            "num_workers": workers,
            "drop_last": train and h.drop_last,
            "collate_fn": collate,
            "pin_memory": bool(self.pin_memory),
        }
        if workers > 0:
            settings.update(persistent_workers=h.persistent_workers, prefetch_factor=h.prefetch_factor)
            settings["timeout"] = h.loader_timeout
        if train and h.sampler == "balanced":
            targets = np.asarray(dataset.targets)
            weights = torch.as_tensor(1.0 / np.bincount(targets)[targets], dtype=torch.double)
            generator = torch.Generator().manual_seed(h.seed)
            settings["sampler"] = WeightedRandomSampler(weights, len(dataset), replacement=True, generator=generator)
        else:
            settings["shuffle"] = train and h.shuffle
        if h.skip_bad_images:
            dataset, settings["collate_fn"] = self.bad_image_skipper(dataset, collate)
        distributed = trainer is not None and trainer.world_size > 1
        return self.source.make_loader(dataset, train, distributed, **settings)

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.test_set)

    def state_dict(self) -> dict[str, Any]:
        """A streaming training loader's position, which checkpoints keep, so a resumed run carries on mid-epoch.
        (Lightning restores a loader's state only into one built after the checkpoint is read; the schedule's
        `estimated_stepping_batches` builds it before, #20550: the DataModule, restored first, carries it over.)"""
        return self.source.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.source.load_state_dict(state_dict)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        return self.source.before_transfer(batch, device)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.hparams.skip_bad_images:  # the bad_image_skipper's report of the files skipped in this batch
            *batch, skipped = batch
            self.bad_images.extend(skipped.paths)
        if self.augment_on is None:
            self.decide_placement()
        images, labels = batch[0], batch[1]
        augment = self.trainer is not None and self.trainer.training
        images = self.device_transform(images, augment=augment)
        if augment and self.mix is not None:  # one draw per batch: MixUp and CutMix mix pairs of images anyway
            mixed, targets = self.mix(images, labels)  # (B, C) soft targets; the labels stay for train/acc
            return (mixed, labels, targets)
        return (images, labels, *batch[2:])
