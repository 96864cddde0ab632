"""Unlabelled image files for prediction: find them under files and folders, load them one by one."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from project.data.folder import BadImageError, BadImages, SampleList, is_image_file, load_image, walk_files


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
