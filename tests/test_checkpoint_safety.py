"""load_classifier reads a checkpoint as data at every read: a pickled object that would import and call code
is refused, also when the file is swapped for one between the safety check and the model's own load."""

from __future__ import annotations

import contextlib
from pathlib import Path

import lightning as L
import pytest
import torch

from project.models import ImageClassifier
from project.runtime import checkpoints
from project.runtime.flags import UsageError

CALLS: list[str] = []


def record(tag: str) -> str:
    """What the hostile object makes a trusting unpickler import and call: harmless, but it leaves a trace."""
    CALLS.append(tag)
    return tag


class Hostile:
    def __reduce__(self):
        return record, ("unpickled",)


def checkpoint(path: Path, hostile: bool) -> Path:
    """A checkpoint as train.py writes it (a trusting loader would load it whole), with the hostile object or not."""
    model = ImageClassifier(num_classes=2, class_names=["a", "b"], image_size=32)
    content = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": L.__version__,
    }
    torch.save({**content, "extra": Hostile()} if hostile else content, path)
    return path


@pytest.fixture(autouse=True)
def no_calls():
    CALLS.clear()
    yield
    CALLS.clear()


def test_a_checkpoint_that_would_run_code_is_refused_in_one_line(tmp_path):
    path = checkpoint(tmp_path / "hostile.ckpt", hostile=True)
    with pytest.raises(UsageError) as refused:
        checkpoints.load_classifier(path)
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and str(path) in message and "--checkpoint" in message
    assert CALLS == [], "reading the checkpoint ran code from it"


def test_a_file_swapped_after_the_safety_check_is_read_as_data_too(tmp_path, monkeypatch):
    """load_classifier reads the file twice (the check, then the model's load): the second read must refuse
    code on its own, or a file replaced in between would run."""
    path = checkpoint(tmp_path / "model.ckpt", hostile=False)
    hostile = checkpoint(tmp_path / "hostile.ckpt", hostile=True)
    check = checkpoints.load_checkpoint_safely

    def check_then_swap(*args, **kwargs):
        result = check(*args, **kwargs)
        hostile.replace(path)
        return result

    monkeypatch.setattr(checkpoints, "load_checkpoint_safely", check_then_swap)
    loaded = None
    with contextlib.suppress(Exception):  # whatever the loader raises: what matters is what ran
        loaded = checkpoints.load_classifier(path)
    assert CALLS == [], "load_classifier's own load ran code from the checkpoint: it must load with weights_only=True"
    assert loaded is None, "load_classifier accepted a checkpoint holding an object that runs code"


def test_a_clean_checkpoint_loads(tmp_path):
    model = checkpoints.load_classifier(checkpoint(tmp_path / "model.ckpt", hostile=False))
    assert model.class_names == ["a", "b"] and CALLS == []
