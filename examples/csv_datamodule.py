"""Your own Dataset in a run: images listed in CSV files, trained with `scripts/train.py --datamodule`.

    python scripts/train.py --datamodule examples.csv_datamodule.CsvDataModule --data_dir my_csvs

`my_csvs/` holds train.csv and val.csv (test.csv optional) of `path,label` rows, paths relative to the
CSV file. The Dataset knows one sample; batching, workers, sampling and on-device work stay with the
loaders `ImageDataModule` builds, so every loader flag works unchanged.
"""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from project.data import ImageDataModule


class CsvImageDataset(Dataset):
    """Images listed in a CSV file of `path,label` rows (paths relative to the CSV)."""

    def __init__(self, csv_file: str | Path, classes: list[str], transform=None) -> None:
        root = Path(csv_file).parent
        with open(csv_file, newline="") as f:
            rows = list(csv.DictReader(f))
        self.classes = list(classes)
        self.samples = [(str(root / row["path"]), self.classes.index(row["label"])) for row in rows]
        self.targets = [label for _, label in self.samples]  # lets --sampler balanced count classes
        self.transform = transform  # set by ImageDataModule.setup: train or eval transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = Image.open(path).convert("RGB")
        return (self.transform(image) if self.transform else image), label


class CsvDataModule(ImageDataModule):
    """ImageDataModule over CSV-listed images; every parameter of ImageDataModule is a flag too.

    Args:
        data_dir: the folder holding train.csv, val.csv and optionally test.csv
    """

    def __init__(self, data_dir: str = "my_csvs", **kwargs) -> None:
        super().__init__(data_dir=data_dir, **kwargs)

    @property
    def classes(self) -> list[str]:
        with open(self.data_dir / "train.csv", newline="") as f:
            return sorted({row["label"] for row in csv.DictReader(f)})

    def prepare_data(self) -> None:
        pass  # nothing to download or generate

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = CsvImageDataset(self.data_dir / "train.csv", self.classes)
            self.val_set = CsvImageDataset(self.data_dir / "val.csv", self.classes)
        if self.test_set is None and (self.data_dir / "test.csv").is_file():
            self.test_set = CsvImageDataset(self.data_dir / "test.csv", self.classes)
        super().setup(stage)  # gives each dataset its transform; loaders and device work as usual
