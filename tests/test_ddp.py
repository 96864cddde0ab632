"""Scale-out: `--devices 2 --strategy ddp --accelerator cpu` trains and validates on CPU (gloo), splits the data
between the processes, and syncs the metrics: its val/acc is what one process measures on the same weights;
and it ends cleanly: no thread of the process group and no process of the run outlives it."""

from __future__ import annotations

import hashlib
import json
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
from project.tools.streaming_reader import StreamingReader
from tests.killing import MARKER, marked_processes

ROOT = Path(__file__).resolve().parents[1]

# scripts/train.py, with each process saving the images it is handed (un-normalized back to uint8) per stage,
# rank and batch, and, as the very last thing before the interpreter shuts down, what is still running in it;
# "ddp" starts the second process by running this same file again
RECORDING_TRAIN = """
import atexit
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, {root!r})
from project.models import ImageClassifier

OUT = Path(os.environ["SEEN_DIR"])


def record_exit():
    native = []
    for task in Path("/proc/self/task").glob("*/comm"):  # every thread, also those Python does not know
        try:
            native.append(task.read_text().strip())
        except OSError:  # ended meanwhile
            pass
    state = {{"process_group": torch.distributed.is_initialized(), "native_threads": native}}
    (OUT / f"exit-rank{{os.environ.get('LOCAL_RANK', '0')}}.json").write_text(json.dumps(state))


atexit.register(record_exit)  # the first registered runs last


def save(self, stage, batch, batch_idx):
    mean = torch.tensor(self.hparams.mean).view(1, -1, 1, 1)
    std = torch.tensor(self.hparams.std).view(1, -1, 1, 1)
    images = (batch[0].detach().float().cpu() * std + mean).mul(255).round().to(torch.uint8)
    torch.save(images, OUT / f"{{stage}}-rank{{self.global_rank}}-batch{{batch_idx}}.pt")


def on_train_batch_start(self, batch, batch_idx):
    save(self, "train", batch, batch_idx)


def on_validation_batch_start(self, batch, batch_idx, dataloader_idx=0):
    if not self.trainer.sanity_checking:
        save(self, "val", batch, batch_idx)


ImageClassifier.on_train_batch_start = on_train_batch_start
ImageClassifier.on_validation_batch_start = on_validation_batch_start
spec = importlib.util.spec_from_file_location("train_script", {script!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.exit(module.main(sys.argv[1:]))
"""


def image_key(image: torch.Tensor) -> str:
    """The same key for an image and its mirror image (training flips at random)."""
    pixels = min(image.contiguous().numpy().tobytes(), image.flip(-1).contiguous().numpy().tobytes())
    return hashlib.sha256(pixels).hexdigest()[:16]


def seen_keys(folder: Path, stage: str, rank: int) -> list[str]:
    files = sorted(folder.glob(f"{stage}-rank{rank}-batch*.pt"))
    return [image_key(image) for path in files for image in torch.load(path, weights_only=True)]


@pytest.mark.slow
def test_ddp_on_cpu_trains_validates_and_matches_a_single_process(tmp_path):
    # 32 train images -> 16 per process, 2 batches of 8; 16 val images -> 8 per process, no padding duplicates
    data = generate_shapes(tmp_path / "data", image_size=32, per_class={"train": 4, "val": 2}, progress=False)
    driver = tmp_path / "recording_train.py"
    driver.write_text(RECORDING_TRAIN.format(root=str(ROOT), script=str(ROOT / "scripts" / "train.py")))
    seen = tmp_path / "seen"
    seen.mkdir()
    command = [
        sys.executable,
        str(driver),
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
        "--rotation",
        "0",  # images reach the model as stored, up to a flip, so they can be told apart
        "--default_root_dir",
        str(tmp_path),
        "--no-feed_monitor",
    ]
    marker = f"ddp-{os.getpid()}-{tmp_path.name}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEEN_DIR": str(seen), MARKER: marker}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "Starting with 2 processes" in result.stdout + result.stderr

    # a clean end: rank 0 waited for rank 1, and neither had a thread of torch's or gloo's own left at exit
    # (gloo's threads, alive while the interpreter shuts down, now and then abort it: exit code -6)
    assert not marked_processes(marker), "a process of the run outlived it"
    for rank in (0, 1):
        state = json.loads((seen / f"exit-rank{rank}.json").read_text())
        assert not state["process_group"], rank
        leftover = [name for name in state["native_threads"] if "gloo" in name or name.startswith("pt_")]
        assert not leftover, (rank, leftover)

    run = tmp_path / "lightning_logs" / "version_0"
    assert not (tmp_path / "lightning_logs" / "version_1").exists()  # one run folder, written by rank 0
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2  # each process stepped through its half of the 4 batches

    # the processes saw different samples, and together every one of them, in training and in validation
    reference = ImageDataModule(
        data, image_size=32, num_workers=0, rotation=0, hflip=False, augment_on="cpu", open_stream=StreamingReader
    )
    reference.setup("fit")
    for stage, dataset, per_rank in (("train", reference.train_set, 16), ("val", reference.val_set, 8)):
        everything = [image_key(dataset[i][0]) for i in range(len(dataset))]
        assert len(set(everything)) == len(everything) == 2 * per_rank  # every sample recognizable
        rank0, rank1 = seen_keys(seen, stage, 0), seen_keys(seen, stage, 1)
        assert len(rank0) == len(rank1) == per_rank, (stage, len(rank0), len(rank1))
        shared = set(rank0) & set(rank1)
        assert not shared, f"{stage}: {len(shared)} of {per_rank} samples went to both processes"
        assert set(rank0) | set(rank1) == set(everything), f"{stage}: samples no process saw"

    events = EventAccumulator(str(next(run.glob("events.out.tfevents.*"))))
    events.Reload()
    ddp_acc = events.Scalars("val/acc")[-1].value

    model = ImageClassifier.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    dm = ImageDataModule(data, image_size=32, batch_size=8, num_workers=0, open_stream=StreamingReader)
    single_acc = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/acc"]
    assert abs(ddp_acc - single_acc) < 1e-6, (ddp_acc, single_acc)
