"""Where the data comes from: one small class per way data reaches the loaders, all with one interface
(`DataSource`): the class names, each split built with its transform, and where needed a collate function, work
on a batch before it moves to the device, and the loader. `ImageDataModule.make_source` picks one from the flags.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from project.data.encoded import EncodedImageFolder, collate_encoded
from project.data.folder import IMG_EXTENSIONS, ImageFolderDataset, find_classes


@dataclasses.dataclass(frozen=True)
class Transforms:
    """The per-image transforms a source builds its datasets with, each giving a `(3, S, S)` uint8 tensor."""

    train: Callable  # a decoded PIL image, augmented when augmentation runs on the CPU
    eval: Callable  # a decoded PIL image, resized and centre-cropped
    resized_train: Callable | None  # an image already at (3, S, S) (a cached one); None: nothing to do


def stratified_split(targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of sample indices keeping each class's share: (train_indices, val_indices). Every class with
    at least two samples gets at least one validation sample."""
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


class Subset(torch.utils.data.Subset):
    """torch's `Subset`, with the `targets` and `samples` of the items it keeps when its dataset has them."""

    @property
    def targets(self) -> np.ndarray:
        return np.asarray(self.dataset.targets)[self.indices]

    @property
    def samples(self) -> list:
        return [self.dataset.samples[i] for i in self.indices]


class DataSource:
    """One way data reaches the loaders: `ImageFolderSource`, `EncodedJpegSource`, `DecodedCacheSource`,
    `StreamingSource` or `OwnDatasetsSource`."""

    name = "data"
    decodes_on_device = False  # batches arrive encoded, so augmentation runs on the device too
    stores_decoded = False  # nothing left to decode per epoch: --cache would not help
    rebuild_each_setup = False  # the datasets depend on the process count, known only in fit's own setup
    collate_fn: Callable | None = None  # None: PyTorch's default

    @property
    def classes(self) -> list[str]:
        raise NotImplementedError

    def datasets(self, transforms: Transforms) -> dict[str, Dataset]:
        """`{"train": ..., "val": ...}` and `"test"` when there is one, each built with its transform."""
        raise NotImplementedError

    def before_transfer(self, batch: Any, device: torch.device) -> Any:
        return batch

    def make_loader(self, dataset: Dataset, train: bool, distributed: bool, **settings: Any) -> DataLoader:
        return DataLoader(dataset, **settings)

    def summary(self, datasets: dict[str, Dataset]) -> str:
        sizes = ", ".join(f"{split} {len(d)}" for split, d in datasets.items())
        return f"data: {sizes} images in {len(self.classes)} classes"

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ImageFolderSource(DataSource):
    """`root/train/<class>/*` with optional `val/` and `test/` beside it; a folder of class folders alone is
    all training data. A missing `val/` is split off `train/`, stratified and seeded. Validation and test are
    in a seeded, class-mixed order: folders list one class after another, so the first batches of a limited
    evaluation (--limit_val_batches 2) or of one DDP rank would hold one class."""

    name = "image folder"
    dataset_class = ImageFolderDataset

    def __init__(self, root: Path, image_size: int, val_fraction: float, seed: int) -> None:
        self.root, self.image_size, self.val_fraction, self.seed = Path(root), image_size, val_fraction, seed

    @property
    def train_dir(self) -> Path:
        if (self.root / "train").is_dir():
            return self.root / "train"
        if (self.root / "val").is_dir() or (self.root / "test").is_dir():
            raise FileNotFoundError(f"{str(self.root)!r} has val/ or test/ but no train/ folder")
        return self.root

    def split_dir(self, split: str) -> Path | None:
        path = self.root / split
        return path if self.train_dir != self.root and path.is_dir() else None

    @property
    def classes(self) -> list[str]:
        return find_classes(self.train_dir)

    def _folder(self, root: Path, transform: Callable, classes: list[str] | None = None) -> ImageFolderDataset:
        return self.dataset_class(root, transform, classes=classes, decode_min_size=self.image_size)

    def _mixed(self, dataset: ImageFolderDataset) -> ImageFolderDataset:
        order = np.random.default_rng(self.seed).permutation(len(dataset))
        return dataset.subset(order, dataset.transform)

    def datasets(self, transforms: Transforms) -> dict[str, Dataset]:
        full = self._folder(self.train_dir, transforms.train)
        if (val_dir := self.split_dir("val")) is not None:
            built = {"train": full, "val": self._mixed(self._folder(val_dir, transforms.eval, full.classes))}
        else:
            train, val = stratified_split(full.targets, self.val_fraction, self.seed)
            built = {
                "train": full.subset(train, transforms.train),
                "val": self._mixed(full.subset(val, transforms.eval)),
            }
        if (test_dir := self.split_dir("test")) is not None:
            built["test"] = self._mixed(self._folder(test_dir, transforms.eval, full.classes))
        return built

    def summary(self, datasets: dict[str, Dataset]) -> str:
        skipped = {d.root: d.skipped_files for d in datasets.values()}  # a split-off val shares train's folder
        line = super().summary(datasets)
        if sum(skipped.values()):
            line += f"; ignored {sum(skipped.values())} non-image files (extensions: {', '.join(IMG_EXTENSIONS)})"
        return line


class EncodedJpegSource(ImageFolderSource):
    """An image folder whose JPEGs the workers only read; each batch is decoded on the device (nvJPEG), then
    resized and augmented there. Other formats are decoded and resized in the workers, as usual."""

    name = "image folder, JPEGs decoded on the device"
    dataset_class = EncodedImageFolder
    decodes_on_device = True
    collate_fn = staticmethod(collate_encoded)  # byte strings of different lengths: a list

    def __init__(self, root: Path, image_size: int, val_fraction: float, seed: int, decode: Callable) -> None:
        super().__init__(root, image_size, val_fraction, seed)
        self.decode = decode  # a batch of bytes and decoded images, a device -> (B, 3, S, S) uint8 on it

    def datasets(self, transforms: Transforms) -> dict[str, Dataset]:
        return super().datasets(dataclasses.replace(transforms, train=transforms.eval))  # augmented on the device

    def before_transfer(self, batch: Any, device: torch.device) -> Any:
        return (self.decode(batch[0], device), *batch[1:])


class DecodedCacheSource(DataSource):
    """Another source's images decoded and resized once into a verified uint8 store per split; later epochs and
    runs read memory. `open_cache(split, dataset, classes, transform)` returns a split's store, built when
    missing, stale or damaged (`project.feed.cache_builder.open_cache`, which the training run hands over)."""

    name = "decoded cache"
    stores_decoded = True

    def __init__(self, base: DataSource, open_cache: Callable[..., Dataset]) -> None:
        self.base, self.open_cache = base, open_cache

    @property
    def classes(self) -> list[str]:
        return self.base.classes

    def datasets(self, transforms: Transforms) -> dict[str, Dataset]:
        plain = self.base.datasets(dataclasses.replace(transforms, train=transforms.eval))  # cached unaugmented
        classes = self.classes  # a folder source lists its class folders at each call
        return {
            split: self.open_cache(split, dataset, classes, transforms.resized_train if split == "train" else None)
            for split, dataset in plain.items()
        }


class StreamingSource(DataSource):
    """A streaming dataset written by scripts/optimize_data.py (a folder, or an s3:// / gs:// URL), read through
    `stream` (a `project.tools.streaming_reader.StreamingReader`: the metadata, the splits, the resumable loader).
    Under DDP each training epoch deals every rank floor(N / (ranks * batch_size)) full batches of distinct samples;
    the other N mod (ranks * batch_size) sit that epoch out (which ones follows the chunk order, reshuffled every
    epoch). Validation and test see every sample once. A run stopped mid-epoch resumes where it stopped."""

    name = "streaming"
    stores_decoded = True  # chunks are cached locally by litdata
    rebuild_each_setup = True

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    @property
    def classes(self) -> list[str]:
        return list(self.stream.metadata["classes"])

    def datasets(self, transforms: Transforms) -> dict[str, Dataset]:
        splits = {"train": transforms.train, "val": transforms.eval, "test": transforms.eval}
        stored = self.stream.metadata["samples"]
        return {split: self.stream.dataset(split, transform) for split, transform in splits.items() if split in stored}

    def make_loader(self, dataset: Dataset, train: bool, distributed: bool, **settings: Any) -> DataLoader:
        # DDP: every rank must step as often, so training drops the remainder; evaluation keeps it (its metrics
        # are synced once, at the end of the epoch, so ranks may run different batch counts)
        settings["drop_last"] = settings["drop_last"] or (train and distributed)
        # persistent workers keep their own epoch (the shuffle) and position, which move on only when a worker
        # reaches the end of its share: with --limit_train_batches every epoch would replay one order
        settings["persistent_workers"] = False
        return self.stream.loader(dataset, train, **settings)

    def summary(self, datasets: dict[str, Dataset]) -> str:
        sizes = ", ".join(f"{split} {n}" for split, n in self.stream.metadata["samples"].items())
        return f"data: streaming {self.stream.url}: {sizes} images in {len(self.classes)} classes"

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


class OwnDatasetsSource(DataSource):
    """The datasets `build(train_transform, eval_transform)` returns (your DataModule's `datasets()` override).

    Without a `"val"` dataset, one is split off train by `val_fraction` (stratified, seeded; it needs the train
    dataset's `targets`). The class names are the train dataset's `classes`."""

    name = "your datasets"

    def __init__(self, build: Callable[[Callable, Callable], dict[str, Dataset]], val_fraction: float, seed: int):
        self.build, self.val_fraction, self.seed = build, val_fraction, seed
        self._classes: list[str] | None = None

    @property
    def classes(self) -> list[str]:
        if self._classes is None:
            train = self.build(None, None)["train"]
            if not hasattr(train, "classes"):
                raise ValueError(f"your train dataset ({type(train).__name__}) needs `classes`: names in label order")
            self._classes = list(train.classes)
        return self._classes

    def datasets(self, transforms: Transforms) -> dict[str, Dataset]:
        built = dict(self.build(transforms.train, transforms.eval))
        if "val" not in built:
            if not hasattr(built["train"], "targets"):
                raise ValueError(
                    "your datasets() returned no 'val', and its train dataset has no `targets` to split one off "
                    "by --val_fraction: return a 'val' dataset, or give the train dataset `targets`"
                )
            train, val = stratified_split(np.asarray(built["train"].targets), self.val_fraction, self.seed)
            built["val"] = Subset(self.build(transforms.eval, transforms.eval)["train"], val)
            built["train"] = Subset(built["train"], train)
        return built
