"""The decoded-image cache: same pixels as decoding, reused when nothing changed, rebuilt when anything
did, and never trusted when damaged."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from project.data import ImageDataModule, generate_shapes
from project.data.cache import (
    HEADER_BYTES,
    CachedImageDataset,
    cache_key,
    check_cache,
    default_cache_dir,
    ensure_cache,
)
from project.data.folder import ImageFolderDataset
from project.data.transforms import eval_transform


@pytest.fixture()
def shapes(tmp_path: Path) -> Path:
    """A private copy (tests modify files): 8 classes x 3 train images at 48 px."""
    return generate_shapes(tmp_path / "shapes", image_size=48, per_class={"train": 3}, progress=False)


def folder(root: Path) -> ImageFolderDataset:
    return ImageFolderDataset(root / "train", decode_min_size=32)


def decoded(dataset: ImageFolderDataset, size: int) -> torch.Tensor:
    """What the uncached path yields for every image, without augmentation: (N, 3, S, S) uint8."""
    view = dataset.subset(np.arange(len(dataset)), transform=eval_transform(size))
    return torch.stack([view[i][0] for i in range(len(view))])


def cached(path: Path, dataset: ImageFolderDataset) -> torch.Tensor:
    ds = CachedImageDataset(path, dataset)
    return torch.stack([ds[i][0] for i in range(len(ds))])


def test_cache_holds_the_decoded_pixels_and_labels(shapes: Path, tmp_path: Path) -> None:
    dataset = folder(shapes)
    path = ensure_cache(dataset, tmp_path / "cache", 32, "train", num_workers=0)
    ds = CachedImageDataset(path, dataset)
    assert len(ds) == len(dataset) and ds.classes == dataset.classes
    image, label = ds[5]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert label == dataset[5][1]
    assert torch.equal(cached(path, dataset), decoded(dataset, 32))


def test_cache_is_reused_when_nothing_changed(shapes: Path, tmp_path: Path, capsys) -> None:
    path = ensure_cache(folder(shapes), tmp_path / "cache", 32, "train", num_workers=0)
    before = path.stat()
    again = ensure_cache(folder(shapes), tmp_path / "cache", 32, "train", num_workers=0)
    after = again.stat()
    assert again == path
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten


def test_cache_is_rebuilt_when_a_source_file_changes(shapes: Path, tmp_path: Path) -> None:
    dataset = folder(shapes)
    path = ensure_cache(dataset, tmp_path / "cache", 32, "train", num_workers=0)
    first = cached(path, dataset)
    changed, _ = dataset.samples[3]
    Image.new("RGB", (48, 48), (255, 0, 0)).save(changed, quality=95)
    st = os.stat(changed)
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse-mtime file systems too

    dataset = folder(shapes)
    header, why = check_cache(path, cache_key(dataset, 32, "train"))
    assert header is None and "stale" in why
    path = ensure_cache(dataset, tmp_path / "cache", 32, "train", num_workers=0)
    second = cached(path, dataset)
    assert torch.equal(second, decoded(dataset, 32))
    assert not torch.equal(second[3], first[3])
    assert torch.equal(second[4], first[4])
    red = second[3].float().mean(dim=(1, 2))
    assert red[0] > 200 and red[1] < 40


def test_key_depends_on_image_size_split_and_file_list(shapes: Path) -> None:
    dataset = folder(shapes)
    key = cache_key(dataset, 32, "train")
    assert key == cache_key(folder(shapes), 32, "train")
    assert key != cache_key(dataset, 40, "train")
    assert key != cache_key(dataset, 32, "val")
    assert key != cache_key(dataset.subset(np.arange(len(dataset) - 1)), 32, "train")


@pytest.mark.parametrize("damage", ["flip_pixel_byte", "truncate", "garbage_header", "empty"])
def test_damaged_cache_is_detected_and_rebuilt(shapes: Path, tmp_path: Path, damage: str) -> None:
    dataset = folder(shapes)
    path = ensure_cache(dataset, tmp_path / "cache", 32, "train", num_workers=0)
    data = bytearray(path.read_bytes())
    if damage == "flip_pixel_byte":
        data[HEADER_BYTES + len(data[HEADER_BYTES:]) // 2] ^= 0xFF
    elif damage == "truncate":
        data = data[:-100]
    elif damage == "garbage_header":
        data[10:30] = b"x" * 20
    else:
        data = bytearray()
    path.write_bytes(bytes(data))

    header, why = check_cache(path, cache_key(dataset, 32, "train"))
    assert header is None, why
    rebuilt = ensure_cache(dataset, tmp_path / "cache", 32, "train", num_workers=0)
    assert check_cache(rebuilt, cache_key(dataset, 32, "train"))[0] is not None
    assert torch.equal(cached(rebuilt, dataset), decoded(dataset, 32))


def test_interrupted_build_leaves_no_cache(shapes: Path, tmp_path: Path) -> None:
    dataset = folder(shapes)
    Path(dataset.samples[len(dataset) - 1][0]).write_bytes(b"not a jpeg")  # the build fails on the last batch
    with pytest.raises(Exception, match="cannot read image"):
        ensure_cache(dataset, tmp_path / "cache", 32, "train", num_workers=0)
    assert list((tmp_path / "cache").iterdir()) == []  # neither a final nor a partial file


def test_default_location_is_per_dataset_under_data_cache(tmp_path: Path) -> None:
    a, b = default_cache_dir(tmp_path / "x" / "flowers"), default_cache_dir(tmp_path / "y" / "flowers")
    assert a.parent == b.parent == Path("data/cache")
    assert a.name.startswith("flowers-") and a != b


def test_datamodule_cache_serves_uint8_batches_with_the_same_labels(shapes: Path, tmp_path: Path) -> None:
    kw = dict(image_size=32, batch_size=8, num_workers=0, shuffle=False, rotation=10.0, augment_on="cpu")
    plain = ImageDataModule(shapes, **kw)
    plain.setup("fit")
    dm = ImageDataModule(shapes, cache=True, cache_dir=tmp_path / "cache", **kw)
    dm.setup("fit")
    assert isinstance(dm.train_set, CachedImageDataset) and isinstance(dm.val_set, CachedImageDataset)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["train-32px.u8", "val-32px.u8"]
    assert dm.train_set.transform is not None and dm.val_set.transform is None  # augment train only

    images, labels = next(iter(dm.train_dataloader()))
    plain_images, plain_labels = next(iter(plain.train_dataloader()))
    assert images.dtype == plain_images.dtype == torch.uint8
    assert images.shape == plain_images.shape
    assert torch.equal(labels, plain_labels)
    # val is not augmented: exactly the decoded pixels
    val_images, _ = next(iter(dm.val_dataloader()))
    assert torch.equal(val_images, next(iter(plain.val_dataloader()))[0])


def test_cached_dataset_reads_in_worker_processes(shapes: Path, tmp_path: Path) -> None:
    dataset = folder(shapes)
    path = ensure_cache(dataset, tmp_path / "cache", 32, "train", num_workers=0)
    ds = CachedImageDataset(path, dataset)
    ds[0]  # opens the memory map in this process: it must not travel to the workers
    loader = torch.utils.data.DataLoader(ds, batch_size=6, num_workers=2)
    images = torch.cat([batch[0] for batch in loader])
    assert torch.equal(images, decoded(dataset, 32))
