"""Your own Dataset in a run: images listed in CSV files, trained with `scripts/train.py --datamodule`.

    python scripts/train.py --datamodule examples.csv_datamodule.CsvDataModule --data_dir my_csvs

`my_csvs/` holds train.csv and val.csv (test.csv optional; without val.csv, --val_fraction of train is held
out) of `path,label` rows, paths relative to the CSV file. The Dataset knows one sample; batching, workers,
sampling, caching and on-device work stay with the loaders `ImageDataModule` builds, so its flags work as usual.
"""

from __future__ import annotations

import csv
from pathlib import Path

from torch.utils.data import Dataset

from project.data import ImageDataModule
from project.data.folder import load_image


class CsvImageDataset(Dataset):
    """Images listed in a CSV file of `path,label` rows (paths relative to the CSV)."""

    def __init__(self, csv_file: str | Path, classes: list[str], transform=None) -> None:
        root = Path(csv_file).parent
        with open(csv_file, newline="") as f:
            rows = list(csv.DictReader(f))
        self.classes = list(classes)  # names in label order
        self.samples = [(str(root / row["path"]), self.classes.index(row["label"])) for row in rows]  # for --cache
        self.targets = [label for _, label in self.samples]  # for --sampler balanced and a split-off val
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = load_image(path)  # RGB, EXIF orientation applied; a bad file raises an error naming it
        return (self.transform(image) if self.transform else image), label


class CsvDataModule(ImageDataModule):
    """ImageDataModule over CSV-listed images; every parameter of ImageDataModule is a flag too.

    Args:
        data_dir: the folder holding train.csv, and optionally val.csv and test.csv
    """

    def __init__(self, data_dir: str = "my_csvs", **kwargs) -> None:
        super().__init__(data_dir=data_dir, **kwargs)

    def datasets(self, train_transform, eval_transform) -> dict[str, Dataset]:
        with open(self.data_dir / "train.csv", newline="") as f:
            classes = sorted({row["label"] for row in csv.DictReader(f)})
        transforms = {"train": train_transform, "val": eval_transform, "test": eval_transform}
        return {
            split: CsvImageDataset(self.data_dir / f"{split}.csv", classes, transform)
            for split, transform in transforms.items()
            if (self.data_dir / f"{split}.csv").is_file()
        }
