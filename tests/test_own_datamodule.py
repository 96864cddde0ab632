"""The README's "Bring your own Dataset" recipe, end to end: its code is examples/csv_datamodule.py's, and
`train.py --datamodule examples.csv_datamodule.CsvDataModule` trains, validates and tests on CSV-listed images."""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

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
def test_train_py_trains_the_example_datamodule(tiny_shapes, tmp_path, monkeypatch):
    write_csvs(tiny_shapes, tmp_path / "my_csvs", {"train": 40, "val": 10, "test": 10})
    monkeypatch.chdir(ROOT)  # where `examples.csv_datamodule` imports from, as in the README
    argv = ["--datamodule", "examples.csv_datamodule.CsvDataModule", "--data_dir", str(tmp_path / "my_csvs")]
    argv += ["--default_root_dir", str(tmp_path), "--accelerator", "cpu", "--max_epochs", "1"]
    argv += ["--image_size", "32", "--num_workers", "0", "--sampler", "balanced"]
    try:
        assert load_script("train").main(argv) == 0
    finally:
        sys.modules.pop("examples.csv_datamodule", None)
    run = tmp_path / "lightning_logs" / "version_0"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["class_names"] == sorted(p.name for p in (tiny_shapes / "train").iterdir())
    assert checkpoint["datamodule_hyper_parameters"]["data_dir"] == str(tmp_path / "my_csvs")
    assert (run / "config.yaml").read_text().count("examples.csv_datamodule.CsvDataModule") == 1
