"""`--ema_decay`: validation, the best checkpoint, test, predict and export use the moving average of the
weights; a resumed run restores both the average and the live weights; a bad decay is a usage error."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from project import training
from project.callbacks import EMA, build_callbacks
from project.data import ImageDataModule
from project.models import ImageClassifier
from project.runtime.checkpoints import load_classifier
from project.tools.inspection import weights_shown
from tests.conftest import load_script, train_exit_code

DECAY = 0.6  # far from 1, so a few steps move the average away from its start; not 0.5, where 1 - DECAY agrees
STEPS = 3  # training batches per epoch


def floats(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The floating-point entries (weights, batch-norm statistics) of a state_dict, copied."""
    return {k: v.detach().clone() for k, v in state.items() if v.is_floating_point()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


class Probe(L.Callback):
    """Records the weights the model holds at each stage; listed after EMA, so it sees them after EMA's swaps."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.initial: dict[str, torch.Tensor] = {}
        self.steps: list[dict[str, torch.Tensor]] = []  # live weights after each optimizer step
        self.validated: list[dict[str, Any]] = []  # per epoch: the weights validated, then the live ones
        self.tested: dict[str, torch.Tensor] = {}
        self.resumed: Path | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.trainer = trainer
        self.initial = floats(pl_module.state_dict())

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step:  # resumed: what the restored run holds, written as a checkpoint
            self.resumed = self.folder / "resumed.ckpt"
            trainer.save_checkpoint(self.resumed)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.steps.append(floats(pl_module.state_dict()))

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.validated.append({"weights": floats(pl_module.state_dict()), "steps": len(self.steps)})
            if len(self.validated) == 1:  # what an interrupt during validation would write
                trainer.save_checkpoint(self.folder / "mid_validation.ckpt")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.validated[-1]["live"] = floats(pl_module.state_dict())

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.validated[-1]["loss"] = float(trainer.callback_metrics["val/loss"])

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.tested = floats(pl_module.state_dict())


def run(data: Path, root: Path, probe: Probe, *extra: str) -> dict[str, Any]:
    argv = ["--data_dir", str(data), "--default_root_dir", str(root), "--image_size", "32", "--batch_size", "16"]
    argv += ["--num_workers", "0", "--accelerator", "cpu", "--limit_train_batches", str(STEPS), "--lr", "0.02"]
    argv += ["--ema_decay", str(DECAY), *extra]
    with pytest.MonkeyPatch.context() as patch:
        original = training.build_callbacks
        patch.setattr(training, "build_callbacks", lambda values: [*original(values), probe])
        return training.train(training.parse_train_flags(argv))


@pytest.fixture(scope="module")
def ema_run(tiny_shapes, tmp_path_factory) -> tuple[dict[str, Any], Probe, Path]:
    """Two epochs of three steps with --ema_decay DECAY."""
    root = tmp_path_factory.mktemp("ema")
    probe = Probe(root)
    return run(tiny_shapes, root, probe, "--max_epochs", "2"), probe, root


def expected_average(steps: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    average = steps[0]  # the first update copies the weights
    for live in steps[1:]:
        average = {k: DECAY * average[k] + (1 - DECAY) * live[k] for k in average}
    return average


def validate(checkpoint_state: dict[str, Any], path: Path, state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
    """val/loss and val/acc of the checkpoint at `path` with `state_dict` loaded, through a plain Trainer."""
    model = ImageClassifier.load_from_checkpoint(path)  # no arguments, as predict.py and export.py load it
    model.load_state_dict(state_dict)
    datamodule = ImageDataModule(**checkpoint_state["datamodule_hyper_parameters"])
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.validate(model, datamodule=datamodule, verbose=False)[0]


@pytest.mark.slow
def test_validation_uses_the_average_from_the_first_steps(ema_run):
    _, probe, _ = ema_run
    assert len(probe.validated) == 2 and len(probe.steps) == 2 * STEPS
    for seen in probe.validated:
        steps = probe.steps[: seen["steps"]]
        assert same(seen["weights"], expected_average(steps))
        # not the initial weights (Lightning's never-updated copy), nor the live ones
        assert not same(seen["weights"], probe.initial)
        assert not same(seen["weights"], seen["live"]) and same(seen["live"], steps[-1])


@pytest.mark.slow
def test_best_checkpoint_holds_the_average_and_reproduces_val_acc(ema_run):
    results, probe, _ = ema_run
    best = Path(results["best_checkpoint"])
    saved = torch.load(best, weights_only=True)
    epoch = saved["epoch"]
    assert same(floats(saved["state_dict"]), probe.validated[epoch]["weights"])
    assert same(floats(saved["current_model_state"]), probe.validated[epoch]["live"])

    averaged = validate(saved, best, saved["state_dict"])
    assert averaged["val/acc"] == pytest.approx(results["best_val_acc"], abs=1e-6)
    assert averaged["val/loss"] == pytest.approx(probe.validated[epoch]["loss"], rel=1e-5)
    live = validate(saved, best, saved["current_model_state"])
    assert live["val/loss"] != pytest.approx(probe.validated[epoch]["loss"], rel=1e-5)
    # validate() on the Trainer that fitted (Lightning's callback would swap in the average left by fit)
    datamodule = ImageDataModule(**saved["datamodule_hyper_parameters"])
    again = probe.trainer.validate(datamodule=datamodule, ckpt_path=best, verbose=False)[0]
    assert again["val/loss"] == pytest.approx(probe.validated[epoch]["loss"], rel=1e-5)
    assert results["stopped_early"] is None  # no --early_stopping_patience


@pytest.mark.slow
def test_test_predict_and_export_use_the_average(ema_run):
    results, probe, _ = ema_run
    best = Path(results["best_checkpoint"])
    saved = torch.load(best, weights_only=True)
    assert results["test_acc"] is not None
    assert same(probe.tested, floats(saved["state_dict"]))  # Lightning's own callback tests the live ones
    # predict.py and export.py load the model with load_classifier
    assert same(floats(load_classifier(best).state_dict()), floats(saved["state_dict"]))


@pytest.mark.slow
def test_checkpoint_written_during_validation_keeps_the_two_apart(ema_run):
    _, probe, root = ema_run
    saved = torch.load(root / "mid_validation.ckpt", weights_only=True)
    assert same(floats(saved["state_dict"]), probe.validated[0]["weights"])
    assert same(floats(saved["current_model_state"]), probe.validated[0]["live"])


@pytest.mark.slow
def test_resume_restores_the_average_and_the_live_weights(ema_run, tiny_shapes):
    results, _, root = ema_run
    last = torch.load(results["last_checkpoint"], weights_only=True)
    probe = Probe(root)
    resumed_results = run(tiny_shapes, root, probe, "--max_epochs", "3", "--ckpt_path", "last")
    resumed = torch.load(probe.resumed, weights_only=True)
    for key in ("state_dict", "current_model_state"):
        assert same(floats(resumed[key]), floats(last[key])), key
    assert not same(floats(last["state_dict"]), floats(last["current_model_state"]))
    # the average goes on from where it was: 2 epochs, then 1 more, of STEPS updates each
    final = torch.load(resumed_results["last_checkpoint"], weights_only=True)
    assert int(final["averaging_state"]["n_averaged"]) == 3 * STEPS


@pytest.mark.slow
def test_inspect_model_says_which_weights_it_shows(ema_run, capsys):
    results, _, _ = ema_run
    assert load_script("inspect_model").main(["--checkpoint", results["best_checkpoint"]]) == 0
    assert "weights: the moving average (--ema_decay)" in capsys.readouterr().out
    assert weights_shown({"state_dict": {}}).startswith("weights: as trained")


def test_compile_runs_once_and_weight_averaging_stays_quiet(monkeypatch):
    model = ImageClassifier(num_classes=3, image_size=32, compile=True)
    compiled = []
    monkeypatch.setattr(model.model, "compile", lambda *a, **k: compiled.append(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        EMA(0.9).setup(None, model, "fit")  # calls configure_model, then copies the model
    model.configure_model()  # as the Trainer does after the callbacks' setup
    assert compiled == [1]
    assert not [w for w in caught if "WeightAveraging" in str(w.message)]


def test_default_run_adds_no_callback_and_the_flag_adds_ema():
    assert not any(isinstance(c, EMA) for c in build_callbacks(training.parse_train_flags([])))
    found = [c for c in build_callbacks(training.parse_train_flags(["--ema_decay", "0.99"])) if isinstance(c, EMA)]
    assert [c.decay for c in found] == [0.99]


@pytest.mark.parametrize("value", ["1.5", "-1", "1"])
def test_decay_outside_0_to_1_is_a_usage_error(value, capsys):
    assert train_exit_code(["--ema_decay", value]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("train.py: error: argument --ema_decay")
