"""`ImageDataModule`: everything about data for a run, from folders on disk to normalized batches on the device.

It owns the datasets (train / val / test / predict), the DataLoaders with every setting people tune,
and the batch work done on the device after transfer (`on_after_batch_transfer`). The data comes from an
image folder or, past one disk, from a streaming dataset (see `project.data.streaming`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

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
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from project.data.builtin import generate_shapes
from project.data.cache import CachedImageDataset, default_cache_dir, ensure_cache
from project.data.encoded import EncodedImageDataset, collate_encoded, decode_batch
from project.data.files import ImageFileDataset, list_images
from project.data.folder import BadImages, ImageFolderDataset, SkipBadCollate, find_classes, folder_summary
from project.data.streaming import (
    ResumableStreamingDataLoader,
    StreamingDataset,
    is_streaming_source,
    read_metadata,
    streaming_dataset,
)
from project.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DeviceTransform,
    eval_transform,
    tensor_train_transform,
    train_transform,
)

BUILTIN_DIR = "data/shapes"  # relative to the working directory, like lightning_logs/
Sampler = Literal["random", "balanced"]
AugmentOn = Literal["auto", "cpu", "device"]
SAMPLERS, AUGMENT_ON = get_args(Sampler), get_args(AugmentOn)  # checked in __init__ for calls from Python
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

    A streaming source (`data_dir` an s3:// or gs:// URL, or a folder holding classes.json or train/index.json,
    as scripts/optimize_data.py writes them; `self.streaming`) goes through the same transforms and device
    work, read by litdata's `StreamingDataLoader`. Under DDP each training epoch deals every rank
    floor(N / (ranks * batch_size)) full batches of distinct samples; the other N mod (ranks * batch_size)
    samples sit that epoch out (litdata's drop_last, which DDP needs: every rank must step as often). Which
    ones follows the chunk order, reshuffled every epoch; with a single chunk (a small dataset) it is the same
    ones each epoch. Validation and test see every sample once (the last rank takes the remainder). Its
    loader position is saved in checkpoints, so a run stopped mid-epoch resumes where it stopped.

    Args:
        data_dir: data_dir/train/<class>/* with optional val/ and test/ beside it (a folder of class folders alone is
            used as train/), or a streaming dataset written by optimize_data.py (its folder, or an s3:// / gs://
            URL); None: the built-in shapes dataset
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
        decode_on: where JPEGs are decoded: cpu (workers, at reduced DCT scale) or device (workers only read the
            bytes; each batch is decoded with nvJPEG on the GPU, then resized and augmented there)
        cache: decode and resize every image once into a uint8 store at image_size; later epochs and runs read memory
            (rebuilt when the files, image_size or the split change); refused for a streaming dataset, which
            caches its chunks itself
        cache_dir: where the decoded caches go; None: data/cache/<dataset name>-<path hash>; for a streaming URL:
            where its downloaded chunks go (None: ~/.lightning/chunks, or $LITDATA_CACHE_DIR)
        max_cache_size: streaming URL: disk budget for its downloaded chunks, e.g. 50GB; chunks already read are
            deleted past it (None: litdata's default, 75% of the free disk in recent releases)
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
        sampler: Sampler = "random",
        collate_fn: Callable | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        prefetch_factor: PositiveInt | None = None,
        rotation: Degrees = 15.0,
        hflip: bool = True,
        augment_on: AugmentOn = "auto",
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
        self.streaming = data_dir is not None and is_streaming_source(data_dir)
        self._metadata: dict[str, Any] | None = None  # a streaming source's classes.json, read once
        self._train_loader: ResumableStreamingDataLoader | None = None  # whose position checkpoints save
        self._loader_state: dict[str, Any] | None = None  # a checkpoint's loader position, until the loader exists
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
    def metadata(self) -> dict[str, Any]:
        """A streaming source's classes.json: class names, stored image size, samples per split."""
        if self._metadata is None:
            self._metadata = read_metadata(self.hparams.data_dir)
        return self._metadata

    @property
    def classes(self) -> list[str]:
        """Class names, from the training folder (val and test must have the same ones) or classes.json."""
        return list(self.metadata["classes"]) if self.streaming else find_classes(self.train_dir)

    @property
    def preprocessing(self) -> dict[str, Any]:
        """What a model needs to see images as this DataModule shows them (saved in its checkpoint)."""
        return {"image_size": self.hparams.image_size, "mean": list(self.hparams.mean), "std": list(self.hparams.std)}

    # ------------------------------------------------------------- lifecycle
    def prepare_data(self) -> None:
        if self.streaming or (self.is_builtin and self.hparams.predict_paths is not None):
            return  # written beforehand by optimize_data.py, or prediction only: no training data to generate
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
        decode_on_device = self.hparams.decode_on == "device"
        if decode_on_device and (self.hparams.cache or self.streaming):
            raise ValueError(
                "--decode_on device reads image files; it cannot be combined with --cache or a streaming dataset"
            )
        on_device = decode_on_device or self.resolved_augment_on() == "device"  # decoded there: augmented there
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

        if self.streaming:
            self._setup_streaming(stage, train_tf, eval_tf)
        else:
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
            if dataset is not None and not isinstance(dataset, StreamingDataset):  # those got theirs when built
                dataset.transform = transform
        if self.hparams.cache:
            self._use_cache(tensor_train_transform(cpu_rotation, cpu_hflip))
        if decode_on_device:
            for split in ("train", "val", "test"):  # JPEGs as bytes; other formats decoded and resized as before
                dataset = getattr(self, f"{split}_set")
                if isinstance(dataset, ImageFolderDataset):
                    setattr(self, f"{split}_set", EncodedImageDataset(dataset, eval_tf))

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

    def _setup_streaming(self, stage: str | None, train_tf: Callable, eval_tf: Callable) -> None:
        """The streaming splits, built on every call: the world size they read to share out the data is only
        known in fit's own setup, once the processes have started (the training run calls setup before)."""
        if self.hparams.cache:
            raise ValueError(
                "--cache decodes an image folder into a local store; a streaming dataset caches its chunks "
                "itself (--cache_dir, --max_cache_size): drop --cache"
            )
        if self.hparams.sampler == "balanced":
            raise ValueError("--sampler balanced draws images by index; a streaming dataset is read in chunks")
        samples, stored = self.metadata["samples"], self.metadata["image_size"]
        if self.hparams.image_size > stored and self.train_set is None:
            rank_zero_warn(f"--image_size {self.hparams.image_size} upscales images stored at {stored} px")
        first = self.train_set is None and self.test_set is None
        if stage in ("fit", "validate", None):
            self.train_set, self.val_set = self._stream("train", train_tf), self._stream("val", eval_tf)
        if stage in ("test", None) and "test" in samples:
            self.test_set = self._stream("test", eval_tf)
        if first:
            sizes = ", ".join(f"{split} {n}" for split, n in samples.items())
            rank_zero_info(f"data: streaming {self.hparams.data_dir}: {sizes} images in {len(self.classes)} classes")

    def _stream(self, split: str, transform: Callable) -> StreamingDataset:
        settings = self.hparams
        return streaming_dataset(
            settings.data_dir,
            split,
            transform,
            settings.image_size,
            settings.seed,
            settings.cache_dir,
            settings.max_cache_size,
        )

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
        return "test" in self.metadata["samples"] if self.streaming else self.split_dir("test") is not None

    # --------------------------------------------------------------- loaders
    def _pin_memory(self) -> bool:
        if self.hparams.pin_memory is not None:
            return self.hparams.pin_memory
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def _loader(self, dataset: torch.utils.data.Dataset, train: bool = False) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a DataLoader")
        if isinstance(dataset, StreamingDataset):
            return self._streaming_loader(dataset, train)
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
            collate_fn=self._collate_fn(dataset),
            pin_memory=self._pin_memory(),
            **kwargs,
        )

    def _collate_fn(self, dataset: Dataset) -> Callable | None:
        if isinstance(dataset, EncodedImageDataset):
            return self.collate_fn or collate_encoded  # byte strings of different lengths: a list
        return SkipBadCollate(self.collate_fn) if self.hparams.skip_bad_images else self.collate_fn

    def _streaming_loader(self, dataset: StreamingDataset, train: bool) -> ResumableStreamingDataLoader:
        workers = self.hparams.num_workers
        kwargs: dict[str, Any] = {}
        if workers > 0:
            kwargs = {"prefetch_factor": self.hparams.prefetch_factor, "timeout": self.hparams.loader_timeout}
        trainer = self.trainer
        distributed = trainer is not None and trainer.world_size > 1
        loader = ResumableStreamingDataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            num_workers=workers,
            shuffle=train and self.hparams.shuffle,
            # DDP: every rank must step as often, so training drops the remainder; evaluation keeps it (its
            # metrics are synced once, at the end of the epoch, so ranks may run different batch counts)
            drop_last=train and (self.hparams.drop_last or distributed),
            collate_fn=self.collate_fn,
            pin_memory=self._pin_memory(),
            # persistent workers keep their own epoch (the shuffle) and position, which move on only when a
            # worker reaches the end of its share: with --limit_train_batches every epoch would replay one order
            persistent_workers=False,
            **kwargs,
        )
        if train:
            if self._loader_state is not None:
                loader.load_state_dict(self._loader_state)
                self._loader_state = None
            self._train_loader = loader
        return loader

    def state_dict(self) -> dict[str, Any]:
        """A streaming training loader's position, which checkpoints keep, so a resumed run carries on mid-epoch.

        Lightning saves a stateful training loader's state itself, but loads it only into a loader built after
        the checkpoint is read; the learning-rate schedule's `estimated_stepping_batches` builds it before
        (Lightning #20550), so the DataModule, restored first, carries the position over.
        """
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loader_state = state_dict.get("train_loader")

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch[0], list):  # JPEG bytes (decode_on device): decoded straight onto the device
            device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
            return (decode_batch(batch[0], self.hparams.image_size, device), *batch[1:])
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch[-1], BadImages):
            self.bad_images.extend(batch[-1].paths)
            batch = batch[:-1]
        images, labels = batch[0], batch[1]
        trainer = self.trainer
        augment = trainer is not None and trainer.training
        return (self.device_transform(images, augment=augment), labels, *batch[2:])
