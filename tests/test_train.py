"""scripts/train.py end to end on a small generated set: it learns, and its run folder is complete and reusable."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import yaml

from project.data import ImageDataModule, generate_shapes
from project.models import ImageClassifier
from project.runtime.flags import save_config, train_parser
from project.training import FLAGS, build_trainer, parse_train_flags
from tests.conftest import load_script


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One real training run: 8 classes at 32 px, 250 train images per class, 4 epochs."""
    tmp = tmp_path_factory.mktemp("train")
    data = generate_shapes(
        tmp / "shapes", image_size=32, per_class={"train": 250, "val": 20, "test": 20}, progress=False
    )
    argv = [
        "--data_dir",
        str(data),
        "--default_root_dir",
        str(tmp),
        "--image_size",
        "32",
        "--batch_size",
        "16",
        "--lr",
        "5e-3",
        "--max_epochs",
        "4",
        "--num_workers",
        "0",
        "--accelerator",
        "cpu",
        "--rotation",
        "0",
    ]
    code = load_script("train").main(argv)
    return code, tmp, argv


@pytest.mark.slow
def test_train_learns_far_above_chance(trained_run, capsys):
    code, tmp, _ = trained_run
    assert code == 0
    run = tmp / "lightning_logs" / "version_0"
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    score = torch.load(best, weights_only=True)["callbacks"]
    acc = max(float(state["best_model_score"]) for key, state in score.items() if "ModelCheckpoint" in key)
    assert acc >= 0.6  # 8 classes: chance is 0.125


@pytest.mark.slow
def test_run_folder_holds_logs_config_and_checkpoints(trained_run):
    _, tmp, _ = trained_run
    run = tmp / "lightning_logs" / "version_0"
    assert list(run.glob("events.out.tfevents.*"))
    assert (run / "hparams.yaml").is_file() and (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    assert hparams["class_names"] == sorted(hparams["class_names"]) and len(hparams["class_names"]) == 8
    assert hparams["image_size"] == 32 and hparams["backbone"] == "simple_cnn"


@pytest.mark.slow
def test_checkpoint_loads_with_no_arguments_and_weights_only(trained_run):
    _, tmp, _ = trained_run
    path = tmp / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    raw = torch.load(path, weights_only=True)  # primitives and tensors only
    assert raw["hyper_parameters"]["num_classes"] == 8
    model = ImageClassifier.load_from_checkpoint(path, map_location="cpu").eval()
    dm = ImageDataModule(data_dir=raw["datamodule_hyper_parameters"]["data_dir"], image_size=32, num_workers=0)
    dm.setup("test")
    images, labels = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        logits = model(dm.on_after_batch_transfer((images, labels), 0)[0])
    assert (logits.argmax(1) == labels).float().mean() > 0.5
    assert model.class_names == dm.classes


@pytest.mark.slow
def test_config_round_trip(trained_run):
    _, tmp, argv = trained_run
    config = tmp / "lightning_logs" / "version_0" / "config.yaml"
    original = parse_train_flags(argv)
    repeated = parse_train_flags(["--config", str(config)])
    assert typed(repeated) == typed(original) and original["max_epochs"] == 4 and original["rotation"] == 0
    assert parse_train_flags(["--config", str(config), "--lr", "0.1"])["lr"] == 0.1  # the command line wins


def test_saved_config_repeats_every_flag(tiny_shapes, tmp_path):
    """What a run writes to config.yaml (written here without training) parses back to the same flags."""
    argv = ["--data_dir", str(tiny_shapes), "--default_root_dir", str(tmp_path), "--accelerator", "cpu"]
    argv += ["--cache", "--no-hflip", "--pin_memory", "false", "--num_workers", "auto", "--limit_val_batches", "0.5"]
    argv += ["--lr", "0.01", "--precision", "64-true", "--devices", "1", "--max-epochs", "7"]
    argv += ["--freeze_backbone", "--unfreeze_at_epoch", "1"]
    values = parse_train_flags(argv)
    trainer = build_trainer(values, save_config(values, FLAGS))
    trainer.callbacks[0].setup(trainer, None, "fit")
    config = tmp_path / "lightning_logs" / "version_0" / "config.yaml"
    assert typed(parse_train_flags(["--config", str(config)])) == typed(values)


def typed(values: dict) -> dict:
    """The flags with their types: 1 (one batch) and 1.0 (all of them) are equal numbers but other settings."""
    return {key: (type(value), value) for key, value in values.items()}


@pytest.mark.slow
def test_fast_dev_run_runs_every_loop_once_and_writes_no_run_folder(tiny_shapes, tmp_path, capsys):
    argv = ["--data_dir", str(tiny_shapes), "--default_root_dir", str(tmp_path), "--fast_dev_run", "1"]
    argv += ["--accelerator", "cpu", "--image_size", "32", "--num_workers", "0"]
    assert load_script("train").main(argv) == 0
    assert "test/acc" in capsys.readouterr().out
    assert not (tmp_path / "lightning_logs").exists()


def test_load_from_checkpoint_gives_identical_predictions(tmp_path):
    model = ImageClassifier(num_classes=3, class_names=["a", "b", "c"], image_size=32)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)))
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = ImageClassifier.load_from_checkpoint(tmp_path / "m.ckpt")
    x = torch.randn(5, 3, 32, 32)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.class_names == ["a", "b", "c"] and loaded.hparams.image_size == 32


def test_bad_config_and_missing_data_dir_are_one_line_usage_errors(tmp_path, capsys):
    bad = tmp_path / "run.yaml"
    bad.write_text("learning_rate: 0.1\n")
    with pytest.raises(SystemExit) as exit_info:
        parse_train_flags(["--config", str(bad)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "learning_rate" in err
    assert load_script("train").main(["--data_dir", str(tmp_path / "nowhere"), "--accelerator", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--data_dir" in err and "nowhere" in err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        train_parser(ImageDataModule, FLAGS).parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--max_epochs" in out and "default: 3)" in out
    assert "default: auto)" in out  # --accelerator
    assert "--max-epochs" in out  # the description says hyphens work too
