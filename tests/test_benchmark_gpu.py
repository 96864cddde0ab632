"""scripts/benchmark_gpu.py: its data, and its table read from real train.py runs (on the CPU here)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.conftest import load_script

SCRIPT = load_script("benchmark_gpu")


def test_figures_are_read_from_train_py_lines():
    output = (
        "num_workers auto: loader img/s by num_workers {0: 90, 1: 170}; chose num_workers=1 (170 img/s ...)\n"
        "data feed: data-bound: training waited for data 42% of the time (wait 9.0 ms + step 12.4 ms per batch, "
        "1,234 img/s over 96 steps); raise --num_workers from 1 to 2\n"
    )
    assert SCRIPT.read_figures(output) == {"data wait": "42%", "img/s": "1,234", "num_workers": "1"}
    assert SCRIPT.read_figures("nothing here")["img/s"] == "?"


@pytest.mark.slow
def test_table_rows_come_from_real_runs(tmp_path, capsys):
    argv = ["--accelerator", "cpu", "--backbone", "simple_cnn", "--image_size", "32", "--batch_size", "8"]
    argv += ["--max_epochs", "1", "--images", "16", "--data_root", str(tmp_path), "--precision", "32-true"]
    assert SCRIPT.main([*argv, "--pipelines", "workers", "decode_on device"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 5")]
    with Image.open(next((tmp_path / "jpeg500x375").rglob("*.jpg"))) as image:
        assert image.size == (500, 375)
    workers = next(row for row in rows if "| workers |" in row).split("|")
    assert workers[3].strip().endswith("%") and int(workers[4].replace(",", "")) > 0
    device = next(row for row in rows if "| decode_on device |" in row)
    if not torch.cuda.is_available():  # train.py refuses it without CUDA, in one line, and the row says so
        assert "exit 2" in device and "CUDA" in device
