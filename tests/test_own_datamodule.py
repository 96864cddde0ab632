"""The README's "Bring your own Dataset" recipe, end to end: its code is examples/csv_datamodule.py's, and
`train.py --datamodule examples.csv_datamodule.CsvDataModule` trains, validates and tests on CSV-listed images."""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, load_script


def python_blocks(markdown: str, heading: str) -> list[str]:
    section = markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_shows_the_example_file_as_it_is():
    example = iter((ROOT / "examples" / "csv_datamodule.py").read_text().splitlines())
    blocks = python_blocks((ROOT / "README.md").read_text(), "Bring your own Dataset")
    shown = [line for block in blocks for line in block.splitlines() if line.strip()]
    assert shown and all(line in example for line in shown)  # the same lines, in the same order


def write_csvs(shapes: Path, out: Path, per_class: dict[str, int]) -> None:
    """CSV files listing the images of an image folder: the layout the example reads."""
    out.mkdir(parents=True)
    for split, count in per_class.items():
        with open(out / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label"])
            for class_dir in sorted(p for p in (shapes / split).iterdir() if p.is_dir()):
                for image in sorted(class_dir.iterdir())[:count]:
                    writer.writerow([str(image.resolve()), class_dir.name])


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--sampler", "balanced"], ["--cache", "--cache_dir", "CACHE"]])
def test_train_py_trains_the_example_datamodule(tiny_shapes, tmp_path, monkeypatch, flags):
    write_csvs(tiny_shapes, tmp_path / "my_csvs", {"train": 40, "val": 10, "test": 10})
    monkeypatch.chdir(ROOT)  # where `examples.csv_datamodule` imports from, as in the README
    argv = ["--datamodule", "examples.csv_datamodule.CsvDataModule", "--data_dir", str(tmp_path / "my_csvs")]
    argv += ["--default_root_dir", str(tmp_path), "--accelerator", "cpu", "--max_epochs", "1"]
    argv += ["--image_size", "32", "--num_workers", "0", *(str(tmp_path / f) if f == "CACHE" else f for f in flags)]
    try:
        assert load_script("train").main(argv) == 0
    finally:
        sys.modules.pop("examples.csv_datamodule", None)
    run = tmp_path / "lightning_logs" / "version_0"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["class_names"] == sorted(p.name for p in (tiny_shapes / "train").iterdir())
    assert checkpoint["datamodule_hyper_parameters"]["data_dir"] == str(tmp_path / "my_csvs")
    assert (run / "config.yaml").read_text().count("examples.csv_datamodule.CsvDataModule") == 1
    if "--cache" in flags:  # every split read from its decoded cache
        assert sorted(p.name for p in (tmp_path / "CACHE").glob("*.u8")) == [
            "test-32px.u8",
            "train-32px.u8",
            "val-32px.u8",
        ]


def example_datamodule(tiny_shapes: Path, tmp_path: Path, splits: dict[str, int], **kwargs):
    write_csvs(tiny_shapes, tmp_path / "my_csvs", splits)
    from examples.csv_datamodule import CsvDataModule

    return CsvDataModule(str(tmp_path / "my_csvs"), image_size=32, num_workers=0, **kwargs)


def test_without_val_csv_a_stratified_validation_split_is_held_out(tiny_shapes, tmp_path):
    dm = example_datamodule(tiny_shapes, tmp_path, {"train": 10}, val_fraction=0.2)
    dm.setup("fit")
    assert len(dm.val_set) == 16 and len(dm.train_set) == 64  # 2 of 10 per class
    assert sorted(np.bincount(dm.val_set.targets)) == [2] * 8
    assert not set(map(tuple, dm.val_set.samples)) & set(map(tuple, dm.train_set.samples))
    image, _ = dm.val_set[0]
    assert torch.equal(image, dm.val_set[0][0])  # the held-out split is not augmented


def test_device_decoding_is_refused_for_your_own_datasets(tiny_shapes, tmp_path):
    with pytest.raises(ValueError, match="--decode_on and --datamodule cannot be combined"):
        example_datamodule(tiny_shapes, tmp_path, {"train": 2, "val": 1}, decode_on="device")
