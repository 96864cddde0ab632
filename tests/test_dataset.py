"""ImageFolderDataset: the same classes and samples as torchvision's ImageFolder, hidden files skipped, RGB out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from project.data import ImageFolderDataset
from project.data.folder import SampleList, load_image
from tests.conftest import write_image


@pytest.fixture()
def messy_folder(tmp_path):
    """Classes whose names sort differently by case, nested folders, mixed-case extensions, many formats."""
    root = tmp_path / "train"
    names = ["B", "a", "c_class", "Zeta"]
    files = ["x.jpg", "y.PNG", "sub/z.jpeg", "sub/deeper/w.bmp", "v.WebP", "t.tif", "u.TIFF", "p.ppm", "g.pgm"]
    for ci, name in enumerate(names):
        for fi, rel in enumerate(files[: 3 + ci * 2]):
            write_image(root / name / rel, seed=ci * 10 + fi, mode="L" if rel.endswith(".pgm") else "RGB")
    return root


def test_matches_torchvision_imagefolder(messy_folder):
    ours = ImageFolderDataset(messy_folder)
    theirs = ImageFolder(messy_folder)
    assert ours.classes == theirs.classes
    assert ours.class_to_idx == theirs.class_to_idx
    assert list(ours.samples) == theirs.samples
    assert len(ours) == len(theirs)
    for i in range(len(ours)):
        image, label = ours[i]
        their_image, their_label = theirs[i]
        assert label == their_label
        assert image.mode == "RGB" and image.size == their_image.size
        assert np.array_equal(np.asarray(image), np.asarray(their_image.convert("RGB")))


def test_hidden_and_non_image_files_are_skipped_and_counted(tmp_path):
    root = tmp_path / "train"
    write_image(root / "cat" / "1.jpg")
    write_image(root / "cat" / ".hidden.jpg")
    write_image(root / "cat" / ".cache" / "2.jpg")
    write_image(root / ".ipynb_checkpoints" / "3.jpg")
    (root / "cat" / "notes.txt").write_text("not an image")
    write_image(root / "dog" / "4.png")
    ds = ImageFolderDataset(root)
    assert ds.classes == ["cat", "dog"]
    assert [p.split("/")[-1] for p, _ in ds.samples] == ["1.jpg", "4.png"]
    assert ds.skipped_files == 2  # .hidden.jpg and notes.txt; hidden folders are not even walked


def test_transform_and_labels(tmp_path):
    root = tmp_path / "train"
    write_image(root / "a" / "1.png", size=(8, 6))
    write_image(root / "b" / "2.png", size=(8, 6))
    ds = ImageFolderDataset(root, transform=lambda im: torch.tensor(im.size))
    assert [ds[i][1] for i in range(2)] == [0, 1]
    assert ds[0][0].tolist() == [8, 6]


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    path = tmp_path / "img.png" if mode != "CMYK" else tmp_path / "img.jpg"
    if mode == "I;16":
        Image.fromarray(np.full((4, 5), 65535, dtype=np.uint16)).save(path)
    else:
        write_image(path, mode=mode)
    image = load_image(str(path))
    assert image.mode == "RGB"
    if mode == "I;16":  # full-scale 16-bit white stays white instead of clipping garbage
        assert image.size == (5, 4) and np.asarray(image).min() == 255


def test_draft_decoding_never_goes_below_the_requested_size(tmp_path):
    path = write_image(tmp_path / "big.jpg", size=(1024, 768))
    image = load_image(str(path), min_size=224)
    assert min(image.size) >= 224 and image.size[0] < 1024  # DCT-scaled, yet large enough


def test_sample_list_is_compact_and_sequence_like():
    paths, targets = ["/a/1.jpg", "/b/ü.png", "/c/3.jpg"], [0, 1, 1]
    samples = SampleList(paths, targets)
    assert isinstance(samples.targets, np.ndarray) and samples.targets.dtype == np.int64
    assert list(samples) == list(zip(paths, targets, strict=True))
    assert samples[-1] == ("/c/3.jpg", 1)
    assert list(samples.take([2, 0])) == [("/c/3.jpg", 1), ("/a/1.jpg", 0)]
    with pytest.raises(IndexError):
        samples[3]


def test_val_split_must_have_train_classes(tmp_path):
    write_image(tmp_path / "val" / "a" / "1.png")
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        ImageFolderDataset(tmp_path / "val", classes=["a", "b"])


def test_empty_class_folder_is_an_error(tmp_path):
    write_image(tmp_path / "a" / "1.png")
    (tmp_path / "b").mkdir()
    with pytest.raises(FileNotFoundError, match=r"\['b'\]"):
        ImageFolderDataset(tmp_path)
