"""The decoded-image cache: same pixels and labels as decoding, reused when nothing changed, rebuilt when
anything did, and never trusted when damaged. Kills, full disks and concurrent builds: test_cache_kill.py."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from project.data import ImageDataModule, generate_shapes
from project.data.folder import BadImageError, ImageFolderDataset
from project.data.transforms import eval_transform
from project.feed.cache import (
    HEADER_BYTES,
    CachedImageDataset,
    cache_key,
    check_cache,
    default_cache_dir,
    layout,
)
from project.feed.cache_builder import ensure_cache, open_cache

SIZE = 32


@pytest.fixture()
def shapes(tmp_path: Path) -> Path:
    """A private copy (tests modify files): 8 classes x 3 train images at 48 px."""
    return generate_shapes(tmp_path / "shapes", image_size=48, per_class={"train": 3}, progress=False)


def folder(root: Path, size: int = SIZE) -> ImageFolderDataset:
    """What `DecodedCacheSource` caches: the split decoded and resized, unaugmented, as (3, S, S) uint8."""
    return ImageFolderDataset(root / "train", eval_transform(size), decode_min_size=size)


def key_of(dataset: ImageFolderDataset, size: int = SIZE, split: str = "train") -> str:
    return cache_key(dataset.samples, dataset.classes, size, split)


def build(dataset: ImageFolderDataset, path: Path, size: int = SIZE) -> Path:
    return ensure_cache(dataset, path, size, key_of(dataset, size), num_workers=0, progress=False)


def decoded(dataset: ImageFolderDataset) -> torch.Tensor:
    """What the uncached path yields for every image: (N, 3, S, S) uint8."""
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def cached(path: Path) -> tuple[torch.Tensor, list[int]]:
    ds = CachedImageDataset(path)
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([image for image, _ in items]), [label for _, label in items]


def test_cache_holds_the_decoded_pixels_and_labels(shapes: Path, tmp_path: Path) -> None:
    dataset = folder(shapes)
    path = build(dataset, tmp_path / "cache" / "train.u8")
    assert path.stat().st_size == layout(len(dataset), SIZE)[1]
    ds = CachedImageDataset(path)
    assert len(ds) == len(dataset) == 24
    image, label = ds[5]
    assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE) and isinstance(label, int)
    images, labels = cached(path)
    assert torch.equal(images, decoded(dataset))
    # the labels come from the file, not from the dataset the cache was built from
    assert labels == list(dataset.targets) and ds.targets.tolist() == list(dataset.targets)
    assert sorted(set(labels)) == list(range(8))


def test_cache_is_reused_when_nothing_changed(shapes: Path, tmp_path: Path) -> None:
    path = build(folder(shapes), tmp_path / "cache" / "train.u8")
    before = path.stat()
    again = build(folder(shapes), tmp_path / "cache" / "train.u8")
    after = again.stat()
    assert again == path
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten


def test_cache_is_rebuilt_when_a_source_file_changes(shapes: Path, tmp_path: Path) -> None:
    dataset = folder(shapes)
    path = build(dataset, tmp_path / "cache" / "train.u8")
    first, _ = cached(path)
    changed, _ = dataset.samples[3]
    Image.new("RGB", (48, 48), (255, 0, 0)).save(changed, quality=95)
    st = os.stat(changed)
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse-mtime file systems too

    dataset = folder(shapes)
    header, why = check_cache(path, key_of(dataset))
    assert header is None and "stale" in why
    path = build(dataset, path)
    assert check_cache(path, key_of(dataset))[0] is not None
    second, _ = cached(path)
    assert torch.equal(second, decoded(dataset))
    assert not torch.equal(second[3], first[3])
    assert torch.equal(second[4], first[4])
    red = second[3].float().mean(dim=(1, 2))
    assert red[0] > 200 and red[1] < 40


def test_key_depends_on_image_size_split_and_file_list(shapes: Path) -> None:
    dataset = folder(shapes)
    samples, classes = dataset.samples, dataset.classes
    key = cache_key(samples, classes, SIZE, "train")
    assert key == key_of(folder(shapes))
    assert key != cache_key(samples, classes, 40, "train")
    assert key != cache_key(samples, classes, SIZE, "val")
    assert key != cache_key(list(samples)[:-1], classes, SIZE, "train")  # one file fewer
    relabelled = [(path, (target + 1) % 8) for path, target in samples]
    assert key != cache_key(relabelled, classes, SIZE, "train")
    assert key != cache_key(samples, list(reversed(classes)), SIZE, "train")
    path, _ = samples[0]
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten, same size: only the mtime says so
    assert key != key_of(folder(shapes))


@pytest.mark.parametrize(
    "damage", ["flip_pixel_byte", "flip_label_byte", "truncate", "garbage_header", "other_format", "empty"]
)
def test_damaged_cache_is_detected_and_rebuilt(shapes: Path, tmp_path: Path, damage: str) -> None:
    dataset = folder(shapes)
    path = build(dataset, tmp_path / "cache" / "train.u8")
    pixels, _ = layout(len(dataset), SIZE)
    data = bytearray(path.read_bytes())
    if damage == "flip_pixel_byte":
        data[HEADER_BYTES + pixels // 2] ^= 0xFF
    elif damage == "flip_label_byte":
        data[HEADER_BYTES + pixels + 8 * 5] ^= 0x01  # sample 5's label, off by one: still a valid class
    elif damage == "truncate":
        data = data[:-100]
    elif damage == "garbage_header":
        data[20:40] = b"x" * 20  # inside the JSON
    elif damage == "other_format":
        data[:8] = b"PJCACHE1"
    else:
        data = bytearray()
    path.write_bytes(bytes(data))

    header, why = check_cache(path, key_of(dataset))
    assert header is None, why
    rebuilt = build(dataset, path)
    assert check_cache(rebuilt, key_of(dataset))[0] is not None
    images, labels = cached(rebuilt)
    assert torch.equal(images, decoded(dataset)) and labels == list(dataset.targets)


def test_interrupted_build_leaves_no_cache(shapes: Path, tmp_path: Path) -> None:
    dataset = folder(shapes)
    bad = dataset.samples[len(dataset) - 1][0]
    Path(bad).write_bytes(b"not a jpeg")  # the build fails on the last image
    with pytest.raises(BadImageError, match="cannot read image") as error:
        build(dataset, tmp_path / "cache" / "train.u8")
    assert error.value.path == bad
    assert list((tmp_path / "cache").iterdir()) == []  # no final, partial or lock file


def test_default_location_is_per_dataset_under_data_cache(tmp_path: Path) -> None:
    a, b = default_cache_dir(tmp_path / "x" / "flowers"), default_cache_dir(tmp_path / "y" / "flowers")
    assert a.parent == b.parent == Path("data/cache")
    assert a.name.startswith("flowers-") and a != b
    assert default_cache_dir(tmp_path / "x" / "flowers") == a


def test_datamodule_cache_serves_uint8_batches_with_the_same_labels(shapes: Path, tmp_path: Path) -> None:
    kw = dict(image_size=SIZE, batch_size=8, num_workers=0, shuffle=False, rotation=10.0, augment_on="cpu")
    plain = ImageDataModule(shapes, **kw)
    plain.setup("fit")
    dm = ImageDataModule(shapes, cache=True, cache_dir=tmp_path / "cache", open_cache=open_cache, **kw)
    dm.setup("fit")
    assert isinstance(dm.train_set, CachedImageDataset) and isinstance(dm.val_set, CachedImageDataset)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"train-{SIZE}px.u8", f"val-{SIZE}px.u8"]
    assert dm.train_set.transform is not None and dm.val_set.transform is None  # augment train only

    images, labels = next(iter(dm.train_dataloader()))
    plain_images, plain_labels = next(iter(plain.train_dataloader()))
    assert images.dtype == plain_images.dtype == torch.uint8
    assert images.shape == plain_images.shape
    assert torch.equal(labels, plain_labels)
    # val is not augmented: exactly the decoded pixels, with the same labels
    (val_images, val_labels), (plain_val, plain_val_labels) = (next(iter(m.val_dataloader())) for m in (dm, plain))
    assert torch.equal(val_images, plain_val) and torch.equal(val_labels, plain_val_labels)


def test_cached_dataset_reads_in_worker_processes(shapes: Path, tmp_path: Path) -> None:
    dataset = folder(shapes)
    path = build(dataset, tmp_path / "cache" / "train.u8")
    ds = CachedImageDataset(path)
    ds[0]  # opens the memory map in this process: it must not travel to the workers
    loader = torch.utils.data.DataLoader(ds, batch_size=6, num_workers=2)
    batches = list(loader)
    assert torch.equal(torch.cat([images for images, _ in batches]), decoded(dataset))
    assert torch.cat([labels for _, labels in batches]).tolist() == list(dataset.targets)
    assert np.array_equal(ds.targets, dataset.targets)
