"""How the DataModule picks its source and decides its placement: one table refuses flags that cannot work
together (one line naming both, exit 2 from train.py), augment_on auto follows the trainer's device, decided
once, and the one loader function gives every source the same settings."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import project.training as training
from project.conflicts import CONFLICTS, conflict
from project.data import (
    DecodedCacheSource,
    EncodedJpegSource,
    ImageDataModule,
    ImageFolderSource,
    StreamingSource,
    datamodule,
)
from project.feed.cache_builder import open_cache
from project.feed.device_decode import DecodeBatch
from project.runtime.bad_images import skip_bad_images
from project.tools.streaming_reader import StreamingReader
from tests.conftest import ROOT, load_script, train_exit_code

CSV = "examples.csv_datamodule.CsvDataModule"
# every row of the table, with flags that trip it: (the two flags named, flags for train.py)
REFUSED = {
    ("cache", "data_dir"): ["--cache", "--data_dir", "STREAM"],
    ("sampler", "data_dir"): ["--sampler", "balanced", "--data_dir", "STREAM"],
    ("skip_bad_images", "data_dir"): ["--skip_bad_images", "--data_dir", "STREAM"],
    ("max_cache_size", "data_dir"): ["--max_cache_size", "10GB", "--data_dir", "FOLDER"],
    ("decode_on", "data_dir"): ["--decode_on", "device", "--data_dir", "STREAM"],
    ("decode_on", "cache"): ["--decode_on", "device", "--cache", "--data_dir", "FOLDER"],
    ("decode_on", "datamodule"): ["--decode_on", "device", "--datamodule", CSV, "--data_dir", "FOLDER"],
    ("decode_on", "skip_bad_images"): ["--decode_on", "device", "--skip_bad_images", "--data_dir", "FOLDER"],
    ("decode_on", "accelerator"): ["--decode_on", "device", "--data_dir", "FOLDER"],
    ("auto_augment", "decode_on"): ["--auto_augment", "ta_wide", "--decode_on", "device", "--data_dir", "FOLDER"],
    ("random_erase", "decode_on"): ["--random_erase", "0.5", "--decode_on", "device", "--data_dir", "FOLDER"],
    ("cache", "skip_bad_images"): ["--cache", "--skip_bad_images", "--data_dir", "FOLDER"],
    ("unfreeze_at_epoch", "freeze_backbone"): ["--unfreeze_at_epoch", "1", "--data_dir", "FOLDER"],
    ("ema_decay", "strategy"): ["--ema_decay", "0.9", "--strategy", "fsdp", "--data_dir", "FOLDER"],
}


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder that reads as a streaming source (its classes.json); nothing is streamed by these tests."""
    root = tmp_path_factory.mktemp("stream")
    (root / "classes.json").write_text('{"classes": ["a", "b"], "image_size": 32, "samples": {"train": 4}}')
    return root


def test_every_row_of_the_table_has_a_test():
    assert {(flag, other) for flag, other, _, _ in CONFLICTS} == set(REFUSED)


@pytest.mark.parametrize(("named", "flags"), list(REFUSED.items()), ids=["+".join(k) for k in REFUSED])
def test_each_refused_combination_is_one_line_naming_both_flags(
    named, flags, tiny_shapes, stream, tmp_path, capsys, monkeypatch
):
    if named == ("decode_on", "accelerator") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    paths = {"STREAM": str(stream), "FOLDER": str(tiny_shapes)}
    argv = [paths.get(flag, flag) for flag in flags] + ["--default_root_dir", str(tmp_path), "--accelerator", "cpu"]
    monkeypatch.chdir(ROOT)  # where examples.csv_datamodule imports from
    try:
        assert train_exit_code(argv) == 2
    finally:
        sys.modules.pop("examples.csv_datamodule", None)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--{named[0]} and --{named[1]} cannot be combined" in err[0], err


def test_the_datamodule_refuses_the_same_table_when_built_from_python(tiny_shapes, stream):
    with pytest.raises(ValueError, match="--cache and --data_dir cannot be combined"):
        ImageDataModule(stream, cache=True)
    with pytest.raises(ValueError, match="--decode_on and --cache cannot be combined"):
        ImageDataModule(tiny_shapes, decode_on="device", cache=True)
    assert conflict({"cache": True, "skip_bad_images": False}) is None  # a row whose flags are missing is skipped


def test_the_flags_pick_one_source(tiny_shapes, tmp_path):
    assert type(ImageDataModule(tiny_shapes).source) is ImageFolderSource
    assert type(ImageDataModule(tiny_shapes, decode_on="device", decode_jpegs=DecodeBatch).source) is EncodedJpegSource
    cached = ImageDataModule(tiny_shapes, cache=True, cache_dir=str(tmp_path), open_cache=open_cache).source
    assert type(cached) is DecodedCacheSource and type(cached.base) is ImageFolderSource


class Accelerated:
    """A trainer whose strategy runs on `device` (no such device is needed: nothing is moved)."""

    def __init__(self, device: str) -> None:
        self.world_size, self.training = 1, True
        self.strategy = type("Strategy", (), {"root_device": torch.device(device)})()


@pytest.mark.parametrize(("device", "expected"), [("cuda", "device"), ("mps", "device"), ("cpu", "cpu")])
def test_augment_on_auto_follows_the_trainers_device_decided_once(tiny_shapes, device, expected):
    dm = ImageDataModule(tiny_shapes, image_size=32, num_workers=0, rotation=20)
    dm.trainer = Accelerated(device)
    dm.setup("fit")
    assert dm.augment_on == expected
    assert dm.device_transform.rotation == (20 if expected == "device" else 0)
    assert dm.pin_memory == (device == "cuda")
    dm.trainer = Accelerated("cpu" if device != "cpu" else "cuda")
    dm.setup("fit")  # fit's own setup: the choice the datasets were built with stays
    assert dm.augment_on == expected


def test_the_one_loader_function_gives_a_streaming_source_every_setting(tiny_shapes, tmp_path):
    out = tmp_path / "stream"
    argv = ["--data_dir", str(tiny_shapes), "--output_dir", str(out), "--num_workers", "1", "--image_size", "32"]
    assert load_script("optimize_data").main(argv) == 0
    dm = ImageDataModule(
        str(out),
        image_size=32,
        batch_size=5,
        num_workers=1,
        prefetch_factor=3,
        loader_timeout=9,
        open_stream=StreamingReader,
    )
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        assert (loader.batch_size, loader.num_workers, loader.prefetch_factor, loader.timeout) == (5, 1, 3, 9)
    first = dm.train_set
    dm.setup("fit")
    assert dm.train_set is not first, "streaming splits must be rebuilt in each setup: the process count is read then"


@pytest.mark.parametrize("flag", ["open_stream", "open_cache", "decode_jpegs", "bad_image_skipper"])
def test_a_flag_needing_an_extra_that_was_not_handed_over_is_refused(tiny_shapes, stream, flag):
    """The core imports no extras: a DataModule built from Python without the part a flag needs says which."""
    settings, handed, source = {
        "open_stream": ({"data_dir": stream}, StreamingReader, StreamingSource),
        "open_cache": ({"data_dir": tiny_shapes, "cache": True}, open_cache, DecodedCacheSource),
        "decode_jpegs": ({"data_dir": tiny_shapes, "decode_on": "device"}, DecodeBatch, EncodedJpegSource),
        "bad_image_skipper": ({"data_dir": tiny_shapes, "skip_bad_images": True}, skip_bad_images, ImageFolderSource),
    }[flag]
    with pytest.raises(ValueError, match=f"give the DataModule {flag}=.*project.training.HANDED_OVER"):
        ImageDataModule(**settings)
    assert type(ImageDataModule(**settings, **{flag: handed}).source) is source


def test_the_training_run_hands_over_every_part_the_datamodule_names(tiny_shapes):
    assert set(training.HANDED_OVER) == set(datamodule.HANDED_OVER)
    dm = ImageDataModule(tiny_shapes, cache=True, **training.HANDED_OVER)
    assert type(dm.source) is DecodedCacheSource
