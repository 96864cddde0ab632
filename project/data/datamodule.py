"""`ImageDataModule`: everything about data for a run, from folders on disk to normalized batches on the device.

It owns the datasets (train / val / test / predict), the DataLoaders with every setting people tune,
and the batch work done on the device after transfer (`on_after_batch_transfer`).
"""

from __future__ import annotations

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

from project.data.builtin import generate_shapes
from project.data.cache import CachedImageDataset, default_cache_dir, ensure_cache
from project.data.files import ImageFileDataset, list_images
from project.data.folder import BadImages, ImageFolderDataset, SkipBadCollate, find_classes, folder_summary
from project.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DeviceTransform,
    eval_transform,
    tensor_train_transform,
    train_transform,
)

BUILTIN_DIR = "data/shapes"  # relative to the working directory, like lightning_logs/
SAMPLERS = ("random", "balanced")
AUGMENT_ON = ("auto", "cpu", "device")
# value ranges the flags enforce (a bad value is a one-line usage error naming the flag)
Degrees = restricted_number_type("Degrees", float, [(">=", 0), ("<=", 180)])
Seed = restricted_number_type("Seed", int, [(">=", 0), ("<=", 2**32 - 1)])


def stratified_split(targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of sample indices keeping each class's share: (train_indices, val_indices).

    Every class with at least two samples gets at least one validation sample.
    """
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == label))
        n_val = int(round(len(members) * fraction))
        if len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


class ImageDataModule(L.LightningDataModule):
    """Image-folder data for training, evaluation and prediction.

    Every parameter is also a flag of `scripts/train.py` (same name, its type, default and the line
    below as help), and is kept in `self.hparams`.

    Args:
        data_dir: data_dir/train/<class>/* with optional val/ and test/ beside it (a folder of class folders alone is
            used as train/); None: the built-in shapes dataset
        image_size: side in pixels of the square images the model sees (shorter side resized, centre crop)
        batch_size: images per batch (per device)
        num_workers: DataLoader worker processes, or auto: the training run measures a short sweep and picks the count
        drop_last: drop the last incomplete training batch (validation and test keep every image)
        shuffle: shuffle the training data every epoch
        sampler: random (plain shuffle) or balanced (class-balanced weighted sampling with replacement)
        collate_fn: the DataLoaders' collate function (None: PyTorch's default)
        pin_memory: page-locked batches for faster copies to the GPU; None: on when training on a CUDA device
        persistent_workers: keep the worker processes alive between epochs
        prefetch_factor: batches each worker loads ahead (None: PyTorch's default, 2)
        rotation: random rotation range in degrees for training (0: off)
        hflip: random horizontal flips for training
        augment_on: where training augmentation runs: cpu (workers, per image), device (after transfer, one batched
            call), auto (device when the accelerator is not the CPU)
        cache: decode and resize every image once into a uint8 store at image_size; later epochs and runs read memory
            (rebuilt when the files, image_size or the split change)
        cache_dir: where the decoded caches go; None: data/cache/<dataset name>-<path hash>
        channels_last: hand the model NHWC-strided batches (faster convolutions on tensor-core GPUs)
        val_fraction: share of train/ held out (stratified, seeded) when there is no val/
        seed: seeds the validation split and order, the balanced sampler and (for a run) torch, numpy and the workers
        skip_bad_images: replace unreadable (corrupt, truncated) images by the next readable one, count and report them;
            default: stop with an error naming the file
        max_bad_fraction: with skip_bad_images: stop once more than this share of the images is unreadable
        loader_timeout: seconds a DataLoader worker may spend on one batch before the run stops (0: no limit)
        mean: per-channel normalization mean, applied on the device
        std: per-channel normalization standard deviation, applied on the device
        predict_paths: image files or folders for the predict loader
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
        sampler: Literal["random", "balanced"] = "random",
        collate_fn: Callable | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        prefetch_factor: PositiveInt | None = None,
        rotation: Degrees = 15.0,
        hflip: bool = True,
        augment_on: Literal["auto", "cpu", "device"] = "auto",
        cache: bool = False,
        cache_dir: str | None = None,
        channels_last: bool = False,
        val_fraction: OpenUnitInterval = 0.1,
        seed: Seed = 0,
        skip_bad_images: bool = False,
        # a broken dataset is mostly unreadable; a real folder has a few bad files (2 of 102 is 0.02)
        max_bad_fraction: ClosedUnitInterval = 0.1,
        loader_timeout: NonNegativeFloat = 0.0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        predict_paths: Sequence[str] | None = None,
        builtin_dir: str = BUILTIN_DIR,
    ) -> None:
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if augment_on not in AUGMENT_ON:
            raise ValueError(f"augment_on must be one of {AUGMENT_ON}, got {augment_on!r}")
        if num_workers == "auto":  # resolved by the training run's measured sweep; until then every CPU but one
            num_workers = max(0, (os.cpu_count() or 1) - 1)
        # primitives only (strings, not Paths): checkpoints must load with torch.load(weights_only=True)
        data_dir = None if data_dir is None else os.fspath(data_dir)
        cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        builtin_dir = os.fspath(builtin_dir)
        predict_paths = None if predict_paths is None else [os.fspath(p) for p in predict_paths]
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        self.save_hyperparameters(ignore=["collate_fn"])
        self.collate_fn = collate_fn  # a callable, not a hyperparameter

        self.data_dir = Path(data_dir) if data_dir is not None else Path(builtin_dir)
        self.is_builtin = data_dir is None
        self.bad_images: list[str] = []  # unreadable files met since BadImageMonitor last drained it
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.predict_set: Dataset | None = None
        self.device_transform = DeviceTransform(mean, std)

    # ----------------------------------------------------------------- layout
    @property
    def cache_dir(self) -> Path:
        return Path(self.hparams.cache_dir) if self.hparams.cache_dir else default_cache_dir(self.data_dir)

    @property
    def train_dir(self) -> Path:
        train = self.data_dir / "train"
        if train.is_dir():
            return train
        if (self.data_dir / "val").is_dir() or (self.data_dir / "test").is_dir():
            raise FileNotFoundError(f"{str(self.data_dir)!r} has val/ or test/ but no train/ folder")
        return self.data_dir  # a plain folder of class folders: all of it is training data

    def split_dir(self, split: str) -> Path | None:
        path = self.data_dir / split
        return path if self.train_dir != self.data_dir and path.is_dir() else None

    @property
    def classes(self) -> list[str]:
        """Class names, from the training folder; val and test must have the same ones."""
        return find_classes(self.train_dir)

    @property
    def preprocessing(self) -> dict[str, Any]:
        """What a model needs to see images as this DataModule shows them (saved in its checkpoint)."""
        return {"image_size": self.hparams.image_size, "mean": list(self.hparams.mean), "std": list(self.hparams.std)}

    # ------------------------------------------------------------- lifecycle
    def prepare_data(self) -> None:
        if self.is_builtin and self.hparams.predict_paths is not None:
            return  # prediction only: no training data to generate
        if self.is_builtin:
            generate_shapes(self.data_dir, image_size=64, seed=0)
        elif not self.data_dir.is_dir():
            raise FileNotFoundError(f"--data_dir {str(self.data_dir)!r} does not exist")

    def resolved_augment_on(self) -> str:
        if self.hparams.augment_on != "auto":
            return self.hparams.augment_on
        trainer = self.trainer
        on_accelerator = trainer is not None and trainer.strategy.root_device.type != "cpu"
        return "device" if on_accelerator else "cpu"

    def setup(self, stage: str | None = None) -> None:
        on_device = self.resolved_augment_on() == "device"
        cpu_rotation, cpu_hflip = (0.0, False) if on_device else (self.hparams.rotation, self.hparams.hflip)
        train_tf = train_transform(self.hparams.image_size, cpu_rotation, cpu_hflip)
        eval_tf = eval_transform(self.hparams.image_size)
        self.device_transform = DeviceTransform(
            self.hparams.mean,
            self.hparams.std,
            rotation=self.hparams.rotation if on_device else 0.0,
            hflip=self.hparams.hflip and on_device,
            channels_last=self.hparams.channels_last,
        )

        if stage in ("fit", "validate", None) and self.train_set is None:
            self._setup_train_val()
            rank_zero_info(folder_summary({"train": self.train_set, "val": self.val_set}))
        if stage in ("test", None) and self.test_set is None and self.split_dir("test"):
            self.test_set = self._mixed(self._folder(self.split_dir("test"), self.classes))
            rank_zero_info(folder_summary({"test": self.test_set}))
        if stage in ("predict", None) and self.hparams.predict_paths is not None:
            self.predict_set = ImageFileDataset(
                list_images(self.hparams.predict_paths),
                decode_min_size=self.hparams.image_size,
                skip_bad_images=self.hparams.skip_bad_images,
            )

        for dataset, transform in (
            (self.train_set, train_tf),
            (self.val_set, eval_tf),
            (self.test_set, eval_tf),
            (self.predict_set, eval_tf),
        ):
            if dataset is not None:
                dataset.transform = transform
        if self.hparams.cache:
            self._use_cache(tensor_train_transform(cpu_rotation, cpu_hflip))

    def _use_cache(self, train_tf: Callable | None) -> None:
        """Swap the train/val/test folder datasets for their decoded caches (built when missing or stale)."""
        trainer = self.trainer
        distributed = trainer is not None and trainer.world_size > 1
        for split in ("train", "val", "test"):
            dataset = getattr(self, f"{split}_set")
            if isinstance(dataset, ImageFolderDataset):
                if distributed:  # one process per machine builds; the others wait, then reuse it
                    if trainer.local_rank == 0:
                        ensure_cache(dataset, self.cache_dir, self.hparams.image_size, split, self.hparams.num_workers)
                    trainer.strategy.barrier(f"cache-{split}")
                path = ensure_cache(dataset, self.cache_dir, self.hparams.image_size, split, self.hparams.num_workers)
                dataset = CachedImageDataset(path, dataset)
                setattr(self, f"{split}_set", dataset)
            if dataset is not None:
                dataset.transform = train_tf if split == "train" else None  # cached images are resized

    def _folder(self, root: Path, classes: Sequence[str] | None = None) -> ImageFolderDataset:
        return ImageFolderDataset(
            root, classes=classes, decode_min_size=self.hparams.image_size, skip_bad_images=self.hparams.skip_bad_images
        )

    def _setup_train_val(self) -> None:
        full = self._folder(self.train_dir)
        val_dir = self.split_dir("val")
        if val_dir is not None:
            self.train_set = full
            self.val_set = self._mixed(self._folder(val_dir, full.classes))
        else:
            train_idx, val_idx = stratified_split(full.targets, self.hparams.val_fraction, self.hparams.seed)
            self.train_set, self.val_set = full.subset(train_idx), self._mixed(full.subset(val_idx))

    def _mixed(self, dataset: ImageFolderDataset) -> ImageFolderDataset:
        """The same images in a seeded, class-mixed order: folders list one class after another, so the first
        batches of a limited evaluation (--limit_val_batches 2) or of one DDP rank would hold one class."""
        return dataset.subset(np.random.default_rng(self.hparams.seed).permutation(len(dataset)))

    @property
    def has_test(self) -> bool:
        return self.split_dir("test") is not None

    # --------------------------------------------------------------- loaders
    def _pin_memory(self) -> bool:
        if self.hparams.pin_memory is not None:
            return self.hparams.pin_memory
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def _loader(self, dataset: torch.utils.data.Dataset, train: bool = False) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a DataLoader")
        workers = self.hparams.num_workers
        kwargs: dict[str, Any] = {}
        if workers > 0:
            kwargs["persistent_workers"] = self.hparams.persistent_workers
            kwargs["prefetch_factor"] = self.hparams.prefetch_factor
            kwargs["timeout"] = self.hparams.loader_timeout
        if train and self.hparams.sampler == "balanced":
            counts = np.bincount(dataset.targets)
            weights = torch.as_tensor(1.0 / counts[dataset.targets], dtype=torch.double)
            generator = torch.Generator().manual_seed(self.hparams.seed)
            kwargs["sampler"] = WeightedRandomSampler(weights, len(dataset), replacement=True, generator=generator)
        else:
            kwargs["shuffle"] = train and self.hparams.shuffle
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            num_workers=workers,
            drop_last=train and self.hparams.drop_last,
            collate_fn=SkipBadCollate(self.collate_fn) if self.hparams.skip_bad_images else self.collate_fn,
            pin_memory=self._pin_memory(),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch[-1], BadImages):
            self.bad_images.extend(batch[-1].paths)
            batch = batch[:-1]
        images, labels = batch[0], batch[1]
        trainer = self.trainer
        augment = trainer is not None and trainer.training
        return (self.device_transform(images, augment=augment), labels, *batch[2:])
