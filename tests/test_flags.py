"""train.py's flags come from the constructors: a new parameter is a new flag, and each flag reaches its
DataLoader, model or Trainer setting (non-default values, for train and val); yes/no flags take every spelling."""

from __future__ import annotations

import sys
import textwrap

import pytest
from lightning.pytorch.profilers import SimpleProfiler
from torch.utils.data import SequentialSampler, WeightedRandomSampler

from project.training import build_datamodule, build_trainer, parse_train_flags
from tests.conftest import load_script, train_exit_code

TRAIN = load_script("train")


@pytest.fixture
def extended_datamodule(tmp_path, monkeypatch):
    """A module in the working directory whose ImageDataModule subclass adds one parameter, nothing else."""
    (tmp_path / "my_data.py").write_text(
        textwrap.dedent(
            '''
            from jsonargparse.typing import PositiveInt

            from project.data import ImageDataModule


            class GrayscaleDataModule(ImageDataModule):
                def __init__(self, gray_levels: PositiveInt = 16, **kwargs):
                    """Images with fewer grey levels.

                    Args:
                        gray_levels: grey levels kept per channel
                    """
                    super().__init__(**kwargs)
            '''
        )
    )
    monkeypatch.chdir(tmp_path)
    yield "my_data.GrayscaleDataModule"
    sys.modules.pop("my_data", None)


def test_a_new_constructor_parameter_is_a_flag_with_help_default_and_checks(extended_datamodule, capsys):
    with pytest.raises(SystemExit):
        TRAIN.main(["--datamodule", extended_datamodule, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--gray_levels GRAY_LEVELS grey levels kept per channel" in help_text
    assert "default: 16" in help_text
    assert "--batch_size" in help_text  # the base class's parameters stay flags

    values = parse_train_flags(["--datamodule", extended_datamodule, "--gray_levels", "4", "--batch_size", "8"])
    datamodule = build_datamodule(values)
    assert type(datamodule).__name__ == "GrayscaleDataModule"
    assert datamodule.hparams.gray_levels == 4 and datamodule.hparams.batch_size == 8

    assert train_exit_code(["--datamodule", extended_datamodule, "--gray_levels", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--gray_levels" in err


def test_an_unimportable_datamodule_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train_exit_code(["--datamodule", "no_such_module.Data"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no_such_module.Data" in err


def test_loader_flags_reach_the_dataloaders(tiny_shapes):
    values = parse_train_flags(
        [
            "--data_dir",
            str(tiny_shapes),
            "--batch_size",
            "7",
            "--num_workers",
            "1",
            "--drop_last",
            "--sampler",
            "balanced",
            "--pin_memory",
            "true",  # yes, no or null (auto): three values, so no bare --pin_memory
            "--no-persistent_workers",
            "--prefetch_factor",
            "3",
            "--loader_timeout",
            "30",
        ]
    )
    datamodule = build_datamodule(values)
    datamodule.setup("fit")
    train, val = datamodule.train_dataloader(), datamodule.val_dataloader()
    assert train.batch_size == val.batch_size == 7 and train.num_workers == val.num_workers == 1
    assert train.drop_last and not val.drop_last  # drop_last is for training only
    assert isinstance(train.sampler, WeightedRandomSampler) and isinstance(val.sampler, SequentialSampler)
    assert train.pin_memory and val.pin_memory
    assert not train.persistent_workers and not val.persistent_workers
    assert train.prefetch_factor == val.prefetch_factor == 3
    assert train.timeout == val.timeout == 30


def test_trainer_flags_reach_the_trainer(tmp_path):
    values = parse_train_flags(
        [
            "--default_root_dir",
            str(tmp_path),
            "--accelerator",
            "cpu",
            "--max-epochs",
            "5",
            "--accumulate_grad_batches",
            "3",
            "--gradient_clip_val",
            "0.5",
            "--limit_val_batches",
            "0.25",
            "--log_every_n_steps",
            "7",
        ]
    )
    trainer = build_trainer(values, [])
    assert trainer.max_epochs == 5 and trainer.accumulate_grad_batches == 3
    assert trainer.gradient_clip_val == 0.5 and trainer.limit_val_batches == 0.25
    assert trainer.log_every_n_steps == 7 and trainer.default_root_dir == str(tmp_path)


@pytest.mark.parametrize(
    ("argv", "cache"),
    [
        ([], False),
        (["--cache"], True),
        (["--cache", "true"], True),
        (["--cache=yes"], True),
        (["--no-cache"], False),
        (["--no_cache"], False),
        (["--cache", "false"], False),
        (["--cache", "--no-cache"], False),  # the last one wins
    ],
)
def test_yes_no_flags_take_every_spelling(argv, cache):
    assert parse_train_flags(argv)["cache"] is cache


@pytest.mark.parametrize(("precision", "expected"), [("bf16-mixed", "bf16-mixed"), ("64-true", "64-true")])
def test_precision_reaches_the_trainer(precision, expected, tmp_path):
    values = parse_train_flags(["--accelerator", "cpu", "--precision", precision, "--default_root_dir", str(tmp_path)])
    trainer = build_trainer(values, [])
    assert trainer.precision == expected, f"--precision {precision} built a Trainer with precision {trainer.precision}"


def test_precision_auto_is_full_precision_on_the_cpu_and_the_profiler_flag_reaches_the_trainer(tmp_path):
    argv = ["--accelerator", "cpu", "--profiler", "simple", "--default_root_dir", str(tmp_path)]
    trainer = build_trainer(parse_train_flags(argv), [])
    assert trainer.precision == "32-true"
    assert isinstance(trainer.profiler, SimpleProfiler)
