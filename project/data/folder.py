"""`ImageFolderDataset`: one labelled image at a time from a `root/<class>/...` folder. A `Dataset` knows one
sample; batching, workers, sampling and collation belong to the DataLoader that `ImageDataModule` builds."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, ImageOps

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class BadImageError(RuntimeError):
    """An image file that cannot be decoded (corrupt, truncated, or not an image at all), named in the message
    and in `path`. From a DataLoader worker it arrives with the worker's traceback as its message, from which
    `project.runtime.faults.named_line` takes the line that names the file."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def find_classes(root: str | os.PathLike) -> list[str]:
    """Class folder names, sorted exactly as torchvision's `ImageFolder` sorts them (hidden ones skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not is_hidden(e.name))
    if not classes:
        found = sorted(e.name for e in os.scandir(root))[:10]
        raise FileNotFoundError(
            f"no class folders in {str(root)!r} (found: {found or 'nothing'}); "
            "expected one sub-folder per class, e.g. root/cat/1.jpg, root/dog/2.jpg"
        )
    return classes


class SampleList(Sequence):
    """`(path, class_index)` pairs in numpy arrays: a list of tuples is copied page by page into every forked
    worker as soon as it touches it (reference counts are writes); one bytes buffer plus offsets is shared free."""

    def __init__(self, paths: Sequence[str], targets: Sequence[int]) -> None:
        encoded = [os.fsencode(p) for p in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.targets = np.asarray(targets, dtype=np.int64)

    def path(self, index: int) -> str:
        start, end = self._offsets[index], self._offsets[index + 1]
        return os.fsdecode(self._blob[start:end].tobytes())

    def take(self, indices: Sequence[int]) -> SampleList:
        indices = np.asarray(indices, dtype=np.int64)
        return SampleList([self.path(i) for i in indices], self.targets[indices])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[str, int]:  # type: ignore[override]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.path(index), int(self.targets[index])


def is_image_file(name: str) -> bool:
    return not is_hidden(name) and name.lower().endswith(IMG_EXTENSIONS)


def walk_files(folder: str | os.PathLike) -> Iterator[str]:
    """Every file under `folder`, hidden folders pruned, in torchvision's order (folders sorted, then files).
    Collected, then sorted: `sorted(os.walk(...))` would walk everything before `dirnames` is pruned."""
    walked = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]
        walked.append((dirpath, filenames))
    for dirpath, filenames in sorted(walked):
        for filename in sorted(filenames):
            yield os.path.join(dirpath, filename)


def scan_folder(root: Path, classes: Sequence[str]) -> tuple[SampleList, int]:
    """Walk `root/<class>/` recursively; return the image samples and how many other files were skipped."""
    paths: list[str] = []
    targets: list[int] = []
    skipped = 0
    for index, name in enumerate(classes):
        for path in walk_files(root / name):
            if is_image_file(os.path.basename(path)):
                paths.append(path)
                targets.append(index)
            else:
                skipped += 1
    return SampleList(paths, targets), skipped


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB with sensible values (16-bit and float images are rescaled, not clipped)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            array = array / 257.0
        elif array.size and array.max() > 255:
            array = array * (255.0 / array.max())
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L")
    elif image.mode in ("P", "PA", "LA", "RGBA"):
        # transparent pixels become black rather than whatever colour hides under alpha
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def load_image(path: str | IO[bytes], min_size: int | None = None, name: str | None = None) -> Image.Image:
    """Decode `path` (a file name or an open binary file) to an RGB PIL image, EXIF orientation applied.

    With `min_size`, JPEGs are decoded DCT-scaled (PIL `draft`) to the smallest of 1/1, 1/2, 1/4, 1/8
    whose sides are still >= `min_size`: a 1024 px JPEG wanted at 224 px decodes ~3x faster.
    Any failure is a `BadImageError` naming the file (`name`, else `path`).
    """
    try:
        with Image.open(path) as image:
            if min_size and image.format == "JPEG":
                image.draft("RGB", (min_size, min_size))
            image.load()  # pixels in memory: the image outlives the file
            ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of every image without a rotation
            return image if image.mode == "RGB" else to_rgb(image)
    except Exception as error:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        name = name or str(path)
        raise BadImageError(
            f"cannot read image {name!r} ({type(error).__name__}: {error}); "
            "fix or delete the file, or pass --skip_bad_images to skip unreadable files",
            name,
        ) from error


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images under `root/<class_name>/**` (found recursively) with the class index as label, like torchvision's
    `ImageFolder`. `transform` gets the decoded RGB PIL image; `classes` is the class list a val/test split must
    have (train's); JPEGs are decoded at reduced scale, never below `decode_min_size` (`load_image`). An unreadable
    file raises `BadImageError` naming it (`--skip_bad_images`: `project.runtime.bad_images`)."""

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Image.Image], Any] | None = None,
        classes: Sequence[str] | None = None,
        decode_min_size: int | None = None,
    ) -> None:
        self.root = Path(root)
        found = find_classes(self.root)
        if classes is not None and list(classes) != found:
            missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
            raise ValueError(
                f"classes in {str(self.root)!r} differ from the training classes: "
                f"missing {missing}, unexpected {extra}; every split needs the same class folders"
            )
        self.classes = found
        self.class_to_idx = {name: i for i, name in enumerate(found)}
        self.samples, self.skipped_files = scan_folder(self.root, found)
        counts = np.bincount(self.samples.targets, minlength=len(found))
        empty = [name for name, n in zip(found, counts, strict=True) if n == 0]
        if empty:
            found_counts = ", ".join(f"{name} {n}" for name, n in zip(found, counts, strict=True))
            raise FileNotFoundError(
                f"class folders without images in {str(self.root)!r}: {empty} (images found: {found_counts}; "
                f"{self.skipped_files} other files ignored; image extensions: {', '.join(IMG_EXTENSIONS)})"
            )
        self.transform = transform
        self.decode_min_size = decode_min_size

    @property
    def targets(self) -> np.ndarray:
        return self.samples.targets

    def subset(self, indices: Sequence[int], transform: Callable | None = None) -> ImageFolderDataset:
        """A dataset over some of these samples (e.g. a val split), with its own transform."""
        view = object.__new__(type(self))  # an EncodedImageFolder's split still hands over bytes
        view.__dict__.update(self.__dict__)
        view.samples = self.samples.take(indices)
        view.transform = transform
        return view

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        image = load_image(path, self.decode_min_size)
        return (self.transform(image) if self.transform is not None else image), target
