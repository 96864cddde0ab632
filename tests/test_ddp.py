"""Scale-out: `--devices 2 --strategy ddp --accelerator cpu` trains and validates on CPU (gloo), splits the data
between the processes, and syncs the metrics: its val/acc is what one process measures on the same weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from project.data import ImageDataModule, generate_shapes
from project.models import ImageClassifier

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ddp_on_cpu_trains_validates_and_matches_a_single_process(tmp_path):
    # 32 train images -> 16 per process, 2 batches of 8; 16 val images -> 8 per process, no padding duplicates
    data = generate_shapes(tmp_path / "data", image_size=32, per_class={"train": 4, "val": 2}, progress=False)
    command = [
        sys.executable,
        str(ROOT / "scripts" / "train.py"),
        "--devices",
        "2",
        "--strategy",
        "ddp",
        "--accelerator",
        "cpu",
        "--data_dir",
        str(data),
        "--image_size",
        "32",
        "--batch_size",
        "8",
        "--max_epochs",
        "1",
        "--num_workers",
        "0",
        "--default_root_dir",
        str(tmp_path),
        "--no-feed_monitor",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "Starting with 2 processes" in result.stdout + result.stderr

    run = tmp_path / "lightning_logs" / "version_0"
    assert not (tmp_path / "lightning_logs" / "version_1").exists()  # one run folder, written by rank 0
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2  # each process stepped through its half of the 4 batches

    events = EventAccumulator(str(next(run.glob("events.out.tfevents.*"))))
    events.Reload()
    ddp_acc = events.Scalars("val/acc")[-1].value

    model = ImageClassifier.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    dm = ImageDataModule(data, image_size=32, batch_size=8, num_workers=0)
    single_acc = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/acc"]
    assert abs(ddp_acc - single_acc) < 1e-6, (ddp_acc, single_acc)
