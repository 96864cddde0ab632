"""`--skip_bad_images`: unreadable images stood in for by the next readable one, counted and reported.

`skip_bad_images(dataset, collate_fn)` is what the training run hands the DataModule as `bad_image_skipper`: the
dataset wrapped so each item carries the files skipped for it, and a collate function that appends one report per
batch, which the DataModule adds to its `bad_images` after the transfer (`runtime.faults.BadImageMonitor` reads it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from project.data.folder import BadImageError


@dataclass  # not frozen: Lightning's batch transfer (apply_to_collection) rejects frozen dataclasses
class BadImages:
    """Unreadable files that were replaced in a batch; rides along as the batch's last element."""

    paths: tuple[str, ...]


class SkipBadImages(torch.utils.data.Dataset):
    """Any map-style dataset of `(image, label)` whose unreadable items are stood in for by the next readable one.

    Item `i` is `(image, label, BadImages(paths))`, `paths` naming what was skipped (usually nothing), so the main
    process can count them (workers cannot share a counter with it). A stand-in keeps batch sizes (and DDP
    ranks' batch counts) unchanged; the next index rather than a random one keeps seeded runs reproducible.
    """

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def _name(self, index: int, error: Exception) -> str:
        if isinstance(error, BadImageError) and error.path:
            return error.path
        samples = getattr(self.dataset, "samples", None)  # your own dataset: its file, when it lists them
        return str(samples[index][0]) if samples is not None else f"{type(self.dataset).__name__}[{index}]"

    def __getitem__(self, index: int) -> tuple[Any, Any, BadImages]:
        bad: list[str] = []
        for offset in range(len(self)):
            item = (index + offset) % len(self)
            try:
                image, target, *reported = self.dataset[item]  # a dataset may report its own (a blank stand-in)
            except Exception as error:  # your own dataset raises whatever its decoder raises
                bad.append(self._name(item, error))
                continue
            return image, target, BadImages(tuple(bad) + (reported[0].paths if reported else ()))
        raise BadImageError(f"cannot read image {bad[0]!r}, nor any other image of the dataset", bad[0])


class SkipBadCollate:
    """Collate for `SkipBadImages`: batches the samples with `collate_fn` as usual and appends one `BadImages`
    naming every file skipped in the batch (often none).
    """

    def __init__(self, collate_fn: Callable | None = None) -> None:
        self.collate_fn = collate_fn or default_collate

    def __call__(self, samples: Sequence[tuple]) -> Any:
        bad = [path for sample in samples for path in sample[2].paths]
        return (*self.collate_fn([sample[:2] for sample in samples]), BadImages(tuple(bad)))


def skip_bad_images(dataset: Dataset, collate_fn: Callable | None) -> tuple[Dataset, Callable]:
    """`dataset` with unreadable items stood in for, and `collate_fn` (None: PyTorch's) with the batch's report."""
    return SkipBadImages(dataset), SkipBadCollate(collate_fn)
