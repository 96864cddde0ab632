"""Bad input data: unreadable images fail naming the file (from workers too) or are skipped, counted and reported;
non-image files are counted; layout mistakes are one-line errors; every image mode comes out as sensible RGB."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import PILToTensor

from project.data import ImageDataModule, ImageFolderDataset
from project.data.folder import BadImageError, load_image
from project.runtime.bad_images import BadImages, SkipBadCollate, SkipBadImages, skip_bad_images
from project.runtime.faults import named_line
from tests.conftest import load_script, write_image


def run(argv: list[str]) -> int:
    try:
        return load_script("train").main(argv)
    except SystemExit as stop:
        return stop.code


def one_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err[-2000:]
    return lines[0]


def spoil(path: Path, kind: str) -> Path:
    """Turn an image file into a corrupt one of `kind`."""
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(500))
    else:
        path.write_bytes(b"")
    return path


def image_folder(root: Path, classes=("a", "b"), per_class: int = 6, size=(16, 16)) -> Path:
    for ci, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"{i}.jpg", size=size, seed=ci * 100 + i)
    return root


def tensor_dataset(root: Path, **kw) -> ImageFolderDataset:
    return ImageFolderDataset(root, transform=PILToTensor(), **kw)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty"])
def test_unreadable_image_fails_naming_the_file(tmp_path, kind):
    root = image_folder(tmp_path / "train")
    bad = spoil(root / "a" / "2.jpg", kind)
    dataset = tensor_dataset(root)
    with pytest.raises(BadImageError, match="2.jpg") as error:
        dataset[2]
    assert named_line(error.value).startswith(f"cannot read image {str(bad)!r}")
    assert "--skip_bad_images" in named_line(error.value)


def test_worker_error_names_the_file_in_one_line(tmp_path):
    root = image_folder(tmp_path / "train")
    bad = spoil(root / "b" / "4.jpg", "truncated")
    loader = DataLoader(tensor_dataset(root), batch_size=4, num_workers=1)
    with pytest.raises(BadImageError) as error:
        list(loader)
    assert "worker process" in str(error.value)  # raised in a worker, re-raised here with its traceback
    summary = named_line(error.value)
    assert "\n" not in summary and str(bad) in summary


def test_skip_mode_substitutes_the_next_readable_image_and_reports_it(tmp_path):
    root = image_folder(tmp_path / "train")
    bad = spoil(root / "a" / "5.jpg", "garbage")  # the last of class a: its stand-in is b/0.jpg
    dataset = SkipBadImages(tensor_dataset(root))
    image, target, report = dataset[5]
    expected, expected_target, nothing = dataset[6]
    assert torch.equal(image, expected) and target == expected_target == 1
    assert report == BadImages((str(bad),)) and nothing == BadImages(())

    batch = SkipBadCollate()([dataset[4], dataset[5], dataset[6]])
    images, labels, report = batch
    assert images.shape == (3, 3, 16, 16) and labels.tolist() == [0, 1, 1]  # the batch keeps its size
    assert report.paths == (str(bad),)
    assert SkipBadCollate()([dataset[0], dataset[1]])[2] == BadImages(())  # an empty report when all is well

    dm = ImageDataModule(root.parent, skip_bad_images=True, num_workers=0, bad_image_skipper=skip_bad_images)
    out = dm.on_after_batch_transfer(batch, 0)
    assert len(out) == 2 and dm.bad_images == [str(bad)]  # counted in the main process, batch as usual


def test_skip_mode_works_for_your_own_dataset_naming_its_file(tmp_path):
    """Any map-style dataset is skipped through, whatever its decoder raises; the name comes from `samples`."""

    class Listed(torch.utils.data.Dataset):
        samples = [("good.jpg", 0), ("broken.jpg", 1), ("good2.jpg", 0)]

        def __len__(self):
            return 3

        def __getitem__(self, index):
            if index == 1:
                raise OSError("cannot identify image file")
            return torch.zeros(3, 2, 2, dtype=torch.uint8), 0

    assert SkipBadImages(Listed())[1][2] == BadImages(("broken.jpg",))


@pytest.fixture()
def lightning_log(caplog, monkeypatch):
    """The info lines Lightning's logger prints (it does not propagate them to pytest's capture)."""
    logger = logging.getLogger("lightning.pytorch")
    monkeypatch.setattr(logger, "handlers", [*logger.handlers, caplog.handler])
    caplog.set_level(logging.INFO)
    return lambda: [record.getMessage() for record in caplog.records]


def test_non_image_files_are_ignored_and_counted_in_a_one_line_summary(tmp_path, lightning_log):
    root = image_folder(tmp_path / "data" / "train")
    (root / "a" / "notes.txt").write_text("labels were checked")
    (root / "b" / "Thumbs.db").write_bytes(b"\0")
    write_image(root / ".ipynb_checkpoints" / "x.jpg")  # a hidden folder is not a class
    image_folder(tmp_path / "data" / "val", per_class=2)
    dm = ImageDataModule(tmp_path / "data", num_workers=0)
    dm.setup("fit")
    assert dm.classes == ["a", "b"]
    lines = [line for line in lightning_log() if line.startswith("data:")]
    assert lines == [
        "data: train 12, val 4 images in 2 classes; ignored 2 non-image files"
        f" (extensions: {', '.join(__import__('project').data.IMG_EXTENSIONS)})"
    ]


def test_empty_data_dir_is_one_line_listing_what_was_found(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "README.txt").write_text("")
    assert run(["--data_dir", str(tmp_path / "data"), "--default_root_dir", str(tmp_path)]) == 2
    line = one_line(capsys)
    assert "no class folders" in line and "README.txt" in line


def test_empty_class_folder_lists_the_counts(tmp_path):
    root = image_folder(tmp_path / "train")
    (root / "c").mkdir()
    (root / "c" / "c.txt").write_text("")
    with pytest.raises(FileNotFoundError, match=r"\['c'\].*a 6, b 6, c 0; 1 other files ignored"):
        ImageFolderDataset(root)


def test_val_classes_differing_from_train_is_one_line_naming_the_difference(tmp_path, capsys):
    image_folder(tmp_path / "data" / "train", classes=("a", "b", "c"), per_class=2)
    image_folder(tmp_path / "data" / "val", classes=("a", "c", "d"), per_class=1)
    assert run(["--data_dir", str(tmp_path / "data"), "--default_root_dir", str(tmp_path)]) == 2
    line = one_line(capsys)
    assert "missing ['b']" in line and "unexpected ['d']" in line


@pytest.mark.parametrize("min_size", [None, 4])  # full decode, and the DCT-scaled JPEG decode
def test_image_modes_come_out_rgb_with_sensible_values(tmp_path, min_size):
    def roundtrip(image: Image.Image, name: str) -> np.ndarray:
        image.save(tmp_path / name)
        out = load_image(str(tmp_path / name), min_size)
        assert out.mode == "RGB"
        return np.asarray(out).astype(int)

    cyan = roundtrip(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "cmyk.jpg")
    assert np.abs(cyan - [0, 255, 255]).max() <= 8
    clear = roundtrip(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "clear.png")
    assert clear.max() == 0  # transparent pixels are black, not the colour hidden under alpha
    half = roundtrip(Image.new("RGBA", (8, 8), (200, 100, 0, 255)), "opaque.png")
    assert (half == [200, 100, 0]).all()
    palette = Image.new("P", (8, 8))
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.paste(1, (0, 0, 8, 8))
    assert (roundtrip(palette, "palette.png") == [10, 200, 30]).all()
    grey16 = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    assert np.abs(roundtrip(grey16, "grey16.png") - 128).max() <= 1  # 16-bit mid grey stays mid grey
    assert (roundtrip(Image.new("L", (8, 8), 77), "grey.png") == 77).all()
    assert np.abs(roundtrip(Image.new("L", (8, 8), 77), "grey.jpg") - 77).max() <= 1
    assert np.abs(roundtrip(Image.new("RGB", (8, 8), (200, 40, 90)), "colour.jpg") - [200, 40, 90]).max() <= 4


@pytest.mark.parametrize("min_size", [None, 5])  # full decode, and the DCT-scaled decode (1/2 here)
def test_exif_orientation_is_applied(tmp_path, min_size):
    array = np.zeros((16, 32, 3), dtype=np.uint8)
    array[:, :16] = [255, 0, 0]  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: show rotated 90 degrees clockwise
    Image.fromarray(array).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    image = np.asarray(load_image(str(tmp_path / "phone.jpg"), min_size)).astype(int)
    height, width = image.shape[:2]
    assert height == 2 * width  # stored 2:1 wide, shown 1:2 tall
    assert width == 16 if min_size is None else min_size <= width < 16  # reduced, never below min_size
    assert image[2, 4, 0] > 200 and image[-3, 4, 0] < 60  # the red half is now on top


def train_argv(data: Path, root: Path, *extra: str) -> list[str]:
    return [
        "--data_dir",
        str(data),
        "--default_root_dir",
        str(root),
        "--image_size",
        "16",
        "--batch_size",
        "8",
        "--max_epochs",
        "1",
        "--num_workers",
        "2",
        "--accelerator",
        "cpu",
        "--no-feed_monitor",
        *extra,
    ]


@pytest.mark.slow
def test_training_on_a_corrupt_image_stops_in_one_line_naming_it(tmp_path, capsys):
    data = tmp_path / "data"
    image_folder(data / "train")
    image_folder(data / "val", per_class=3)
    bad = spoil(data / "val" / "b" / "1.jpg", "truncated")
    assert run(train_argv(data, tmp_path)) == 1
    line = one_line(capsys)
    assert line.startswith("train.py: error: cannot read image") and str(bad) in line


@pytest.mark.slow
def test_skip_bad_images_trains_reports_and_logs_them(tmp_path, capsys, lightning_log):
    data = tmp_path / "data"
    image_folder(data / "train", per_class=12)
    image_folder(data / "val", per_class=4)
    bad = [spoil(data / "train" / "a" / "3.jpg", "truncated"), spoil(data / "val" / "b" / "0.jpg", "garbage")]
    assert run(train_argv(data, tmp_path, "--skip_bad_images", "--max_bad_fraction", "0.2")) == 0
    capsys.readouterr()
    report = [line for line in lightning_log() if "unreadable images" in line]
    assert report and "skipped 2 unreadable images" in report[-1]
    assert all(str(path) in report[-1] for path in bad)
    run_dir = tmp_path / "lightning_logs" / "version_0"
    assert sorted((run_dir / "bad_images.txt").read_text().split()) == sorted(map(str, bad))
    events = EventAccumulator(str(next(run_dir.glob("events.out.tfevents.*"))))
    events.Reload()
    assert [e.value for e in events.Scalars("data/bad_images")] == [2.0]

    # the same folder with a lower tolerance: the run stops, saying why
    assert run(train_argv(data, tmp_path, "--skip_bad_images", "--max_bad_fraction", "0.01")) == 1
    line = one_line(capsys)
    assert "unreadable" in line and "--max_bad_fraction 0.01" in line


@pytest.mark.slow
@pytest.mark.parametrize("change", ["backbone", "classes"])
def test_resuming_with_another_backbone_or_other_classes_is_one_line(tmp_path, capsys, change):
    data = tmp_path / "data"
    image_folder(data / "train")
    image_folder(data / "val", per_class=3)
    assert run(train_argv(data, tmp_path)) == 0
    last = next(tmp_path.rglob("last.ckpt"))
    capsys.readouterr()
    if change == "classes":  # the same number of classes under other names: the labels would mean something else
        for split in ("train", "val"):
            (data / split / "b").rename(data / split / "z")
        argv = train_argv(data, tmp_path, "--ckpt_path", str(last))
    else:
        argv = train_argv(data, tmp_path, "--ckpt_path", str(last), "--backbone", "resnet18")
    assert run(argv) == 2
    line = one_line(capsys)
    assert str(last) in line and ("backbone 'simple_cnn'" in line if change == "backbone" else "class_names" in line)
