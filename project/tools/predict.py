"""Prediction with a trained checkpoint: image files and folders -> a CSV of labels and confidences.

The checkpoint carries its own preprocessing (image size, mean, std) and class names, so prediction
sees images exactly as validation did: `PredictDataModule`, an `ImageDataModule` whose predict loader reads
the listed files (eval transform in the workers, normalization on the device), feeding `Trainer.predict`.
Rows are written batch by batch, so a folder of a million images needs no memory for the results.
Unreadable files are reported by name on stderr and left out of the CSV; the run goes on.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from project.data import ImageDataModule
from project.data.folder import (
    IMG_EXTENSIONS,
    BadImageError,
    SampleList,
    is_image_file,
    load_image,
    walk_files,
)
from project.runtime.bad_images import BadImages, skip_bad_images
from project.runtime.checkpoints import load_classifier


def list_images(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Image files named by `inputs` (files, or folders walked recursively), in a stable order."""
    found: list[str] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found += [path for path in walk_files(item) if is_image_file(os.path.basename(path))]
        elif item.is_file():
            found.append(str(item))
        else:
            raise FileNotFoundError(f"no such file or folder: {str(item)!r}")
    return found


class ImageFileDataset(torch.utils.data.Dataset):
    """Unlabelled images by path, for prediction: item `i` is `(image, i)` so outputs map back to paths.

    Args:
        paths: image files, e.g. from `list_images`.
        transform: applied to the decoded RGB PIL image.
        decode_min_size: decode JPEGs at reduced scale, never below this size (see `load_image`).
        skip_bad_images: an unreadable file raises `BadImageError` naming it (default); with True its
            item is `(placeholder, i, BadImages((path,)))`, a black image through the same transform
            so the batch still stacks, and the predict step leaves that row out (see `SkipBadCollate`).
    """

    def __init__(
        self,
        paths: Sequence[str],
        transform: Callable | None = None,
        decode_min_size: int | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        self.samples = SampleList(paths, [-1] * len(paths))
        self.transform = transform
        self.decode_min_size = decode_min_size
        self.skip_bad_images = skip_bad_images

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        path = self.samples.path(index)
        try:
            image = load_image(path, self.decode_min_size)
        except BadImageError:
            if not self.skip_bad_images:
                raise
            # a stand-in from another file would duplicate that file's row; a blank one is dropped by path
            placeholder = Image.new("RGB", (1, 1))
            image = self.transform(placeholder) if self.transform is not None else placeholder
            return image, index, BadImages((path,))
        if self.transform is not None:
            image = self.transform(image)
        return image, index


class PredictDataModule(ImageDataModule):
    """`ImageDataModule` whose predict loader reads image files and folders (`paths`), with every other setting
    and the device work as usual; the training splits are built only if asked for."""

    def __init__(self, paths: Sequence[str | os.PathLike], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.paths = [os.fspath(p) for p in paths]
        self.predict_set: Dataset | None = None

    def prepare_data(self) -> None:
        if self.hparams.data_dir is not None:
            super().prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if stage != "predict":
            super().setup(stage)
        elif self.predict_set is None:
            self.decide_placement()
            self.predict_set = ImageFileDataset(
                list_images(self.paths),
                self.transforms.eval,
                decode_min_size=self.hparams.image_size,
                skip_bad_images=self.hparams.skip_bad_images,
            )

    def predict_dataloader(self) -> DataLoader:
        return self.loader(self.predict_set)


def csv_header(top_k: int) -> list[str]:
    """`path, label, confidence`, then `top{i}_label, top{i}_confidence` for i = 1..top_k."""
    columns = ["path", "label", "confidence"]
    for i in range(1, top_k + 1):
        columns += [f"top{i}_label", f"top{i}_confidence"]
    return columns


class CSVPredictionWriter(BasePredictionWriter):
    """Write one CSV row per readable image as each predict batch finishes.

    Args:
        output: the CSV file to (over)write.
        class_names: label names in class-index order (the checkpoint's).
        top_k: how many best classes get their own columns (at most the number of classes).
    """

    def __init__(self, output: str | os.PathLike, class_names: Sequence[str], top_k: int = 5) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)
        self.class_names = list(class_names)
        self.top_k = max(1, min(top_k, len(self.class_names)))
        self.rows = 0
        self.unreadable: list[str] = []
        self._file: Any = None
        self._writer: Any = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.output.open("w", newline="")
        self._writer = csv.writer(self._file)
        self._writer.writerow(csv_header(self.top_k))

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: torch.Tensor,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        datamodule = trainer.datamodule
        dataset = datamodule.predict_set
        bad = set(datamodule.bad_images)  # filled for this batch by on_after_batch_transfer
        confidences, classes = prediction.float().topk(self.top_k, dim=1)  # (B, k) each, best first
        for row, index in enumerate(batch[1].tolist()):
            path = dataset.samples.path(index)
            if path in bad:
                self._report(path)
                continue
            best = [
                (self.class_names[c], f"{p:.6f}")
                for c, p in zip(classes[row].tolist(), confidences[row].tolist(), strict=True)
            ]
            self._writer.writerow([path, *best[0], *(value for pair in best for value in pair)])
            self.rows += 1

    def _report(self, path: str) -> None:
        try:  # the worker's exception did not travel with the batch; opening the file again names the cause
            load_image(path)
            reason = "could not be read"
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"
        print(f"predict: skipped unreadable file {path!r} ({reason})", file=sys.stderr)
        self.unreadable.append(path)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._file.close()


def predict(
    checkpoint: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    accelerator: str = "auto",
    batch_size: int = 64,
    num_workers: int = 2,
    top_k: int = 5,
) -> dict[str, Any]:
    """Predict every image in `inputs` (files, or folders walked recursively) with `checkpoint` and
    write the CSV `output`. Returns `{"output", "rows", "unreadable"}` (the skipped paths).

    Runs on one device: rows are written by this process, in input order. A checkpoint that cannot be
    loaded safely raises `UsageError` (see `load_checkpoint_safely`); missing inputs `FileNotFoundError`.
    """
    model = load_classifier(checkpoint)
    if not list_images(inputs):  # also names a missing input
        raise FileNotFoundError(
            f"no image files in {[str(i) for i in inputs]} (extensions: {', '.join(IMG_EXTENSIONS)})"
        )
    hp = model.hparams
    datamodule = PredictDataModule(
        inputs,
        image_size=hp.image_size,
        mean=hp.mean,
        std=hp.std,
        batch_size=batch_size,
        num_workers=num_workers,
        skip_bad_images=True,
        bad_image_skipper=skip_bad_images,
    )
    writer = CSVPredictionWriter(output, model.class_names, top_k=top_k)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[writer],
    )
    trainer.predict(model, datamodule=datamodule, return_predictions=False)
    return {"output": str(output), "rows": writer.rows, "unreadable": writer.unreadable}
