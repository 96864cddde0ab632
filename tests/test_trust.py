"""Checkpoints are data, never code: a file that would run code when unpickled, a file that is not a checkpoint
and another model's checkpoint each end every entry point with one line naming the file, and exit code 2;
`--ckpt_path last` skips such a file and resumes from the next good one."""

from __future__ import annotations

import os
import random
import shlex
import shutil
import tarfile
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from project.data import generate_shapes
from project.runtime.checkpoints import AtomicCheckpointIO, load_checkpoint_safely, load_classifier
from project.runtime.flags import UsageError
from tests.conftest import load_script


class RunsCode:
    """Unpickling this runs a shell command: `touch marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def save(obj, path: Path, legacy: bool = False) -> Path:
    # torch.save writes its legacy (pre-1.6, non-zip) format only through this keyword
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def hostile(path: Path, marker: Path, legacy: bool) -> Path:
    """A file that looks like one of our checkpoints and runs code when unpickled by a trusting loader."""
    payload = {"state_dict": {}, "hyper_parameters": {"backbone": "simple_cnn", "num_classes": 2}}
    return save({**payload, "trap": RunsCode(marker)}, path, legacy)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished one-epoch train.py run (root folder) and the flags that made it."""
    root = tmp_path_factory.mktemp("trust")
    data = generate_shapes(root / "data", image_size=32, per_class={"train": 4, "val": 2}, progress=False)
    flags = ["--data_dir", str(data), "--image_size", "32", "--batch_size", "8", "--num_workers", "0"]
    flags += ["--accelerator", "cpu", "--limit_train_batches", "2", "--limit_val_batches", "1"]
    code = load_script("train").main([*flags, "--max_epochs", "1", "--default_root_dir", str(root / "runs")])
    assert code == 0
    return root / "runs", flags


@pytest.fixture(scope="module")
def good(run) -> Path:
    return run[0] / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


# kind -> what the one line says about it
BAD_FILES = {
    "hostile-legacy": "import posix.system",
    "hostile-zip": "import posix.system",
    "text": "not a checkpoint",
    "random-bytes": "not a checkpoint",
    "truncated": "not a checkpoint",
    "old-tar-format": "convert it once",
    "plain-state_dict": "plain state_dict",
    "other-model": "another model",
}


def bad_file(kind: str, folder: Path, good: Path, marker: Path) -> Path:
    path = folder / f"{kind}.ckpt"
    if kind.startswith("hostile"):
        return hostile(path, marker, legacy=kind.endswith("legacy"))
    if kind == "text":
        path.write_text("epoch: 3\nthis is a note, not a checkpoint\n")
    elif kind == "random-bytes":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "old-tar-format":  # torch's format before 0.4: a tar archive, which its safe loader refuses
        with tarfile.open(path, "w") as archive:
            archive.add(good, arcname="storages")
    else:
        checkpoint = torch.load(good, weights_only=True)
        if kind == "plain-state_dict":
            save(checkpoint["state_dict"], path)
        else:  # a Lightning checkpoint of a model without our hyperparameters, as BoringModel's
            del checkpoint["hyper_parameters"]
            save(checkpoint, path)
    return path


def entry_point_argv(script: str, checkpoint: Path, run: tuple[Path, list[str]], tmp_path: Path) -> list[str]:
    root, flags = run
    if script == "train":
        return [*flags, "--max_epochs", "1", "--default_root_dir", str(tmp_path), "--ckpt_path", str(checkpoint)]
    if script == "predict":
        image = next((root.parent / "data" / "val").rglob("*.jpg"))
        return ["--checkpoint", str(checkpoint), "--input", str(image), "--output", str(tmp_path / "p.csv")]
    if script == "export":
        return ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "exported" / "model")]
    return ["--checkpoint", str(checkpoint)]


@pytest.mark.parametrize("kind", BAD_FILES)
@pytest.mark.parametrize("script", ["train", "predict", "export", "inspect_model"])
def test_every_entry_point_refuses_a_bad_checkpoint_in_one_line(script, kind, run, good, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    checkpoint = bad_file(kind, tmp_path, good, marker)
    capsys.readouterr()
    code = load_script(script).main(entry_point_argv(script, checkpoint, run, tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert not marker.exists()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"{script}.py: error: ") and str(checkpoint) in err[0] and BAD_FILES[kind] in err[0]
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "exported").exists()


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_ckpt_path_last_skips_a_hostile_file_and_resumes_from_the_good_one(legacy, run, tmp_path, capsys):
    root, flags = run
    shutil.copytree(root, tmp_path / "runs")
    folder = tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints"
    marker = tmp_path / "MARKER"
    trap = hostile(folder / "interrupted.ckpt", marker, legacy)  # the name `last` tries first
    capsys.readouterr()
    argv = [*flags, "--max_epochs", "2", "--default_root_dir", str(tmp_path / "runs"), "--ckpt_path", "last"]
    code = load_script("train").main(argv)
    out, err = capsys.readouterr()
    assert not marker.exists()
    assert code == 0 and f"resuming from {folder / 'last.ckpt'}" in out
    said = [line for line in err.splitlines() if str(trap) in line]
    assert len(said) == 1 and "import posix.system" in said[0] and "Traceback" not in err
    resumed = tmp_path / "runs" / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt"
    assert torch.load(resumed, weights_only=True)["epoch"] == 1  # the second epoch, after the good file's first


def test_the_trainer_loads_checkpoints_as_data_even_when_torch_is_told_otherwise(tmp_path, monkeypatch):
    marker = tmp_path / "MARKER"
    trap = hostile(tmp_path / "trap.ckpt", marker, legacy=False)
    # this variable flips torch.load's default to unpickling anything, which Lightning's loader relies on
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, plugins=[AtomicCheckpointIO()]
    )
    with pytest.raises(Exception, match="posix.system"):
        trainer.fit(BoringModel(), ckpt_path=trap)
    with pytest.raises(Exception, match="posix.system"):
        AtomicCheckpointIO().load_checkpoint(trap, weights_only=False)
    assert not marker.exists()


def test_a_legacy_format_checkpoint_of_ours_loads_like_the_zip_one(good, tmp_path):
    legacy = save(torch.load(good, weights_only=True), tmp_path / "legacy.ckpt", legacy=True)
    assert legacy.read_bytes()[:2] != b"PK"  # not a zip archive
    assert load_checkpoint_safely(legacy)["epoch"] == load_checkpoint_safely(good)["epoch"]
    model, reference = load_classifier(legacy), load_classifier(good)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
    assert load_script("inspect_model").main(["--checkpoint", str(legacy)]) == 0


def test_a_checkpoint_whose_weights_do_not_fit_its_backbone_is_one_line(good, tmp_path):
    checkpoint = torch.load(good, weights_only=True)
    checkpoint["hyper_parameters"]["num_classes"] += 1  # the head no longer matches the weights
    path = save(checkpoint, tmp_path / "mismatch.ckpt")
    with pytest.raises(UsageError, match="does not fit ImageClassifier") as error:
        load_classifier(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
