"""Usage errors: every flag is checked before any work starts, from the command line and from --config alike;
an error is one line on stderr naming the flag, exit code 2, no traceback."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import train_exit_code


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert lines[0].startswith("train.py: error:")
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--lr", "-1"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--momentum", "1.5"], "--momentum"),
        (["--label_smoothing", "1"], "--label_smoothing"),
        (["--rotation", "400"], "--rotation"),
        (["--weight_decay", "-0.1"], "--weight_decay"),
        (["--max_bad_fraction", "2"], "--max_bad_fraction"),
        (["--loader_timeout", "-1"], "--loader_timeout"),
        (["--limit_train_batches", "1.5"], "--limit_train_batches"),
        (["--limit_val_batches", "-1"], "--limit_val_batches"),
        (["--seed", "-3"], "--seed"),
        (["--devices", "0"], "--devices"),
        (["--devices", "zero"], "--devices"),
        (["--strategy", "dpp"], "--strategy"),
        (["--backbone", "resnet19"], "--backbone"),
        (["--accelerator", "gpus"], "--accelerator"),
        (["--batch_size", "0"], "--batch_size"),
        (["--num_workers", "-2"], "--num_workers"),
        (["--precision", "8"], "--precision"),
        (["--data_dir", "no/such/folder"], "--data_dir"),
        (["--ckpt_path", "no/such.ckpt"], "--ckpt_path"),
        (["--max_epochs", "many"], "--max_epochs"),
        (["--mixup_alpha", "-1"], "--mixup_alpha"),
        (["--cutmix_alpha", "-0.5"], "--cutmix_alpha"),
        (["--ema_decay", "1.5"], "--ema_decay"),
        (["--auto_augment", "bogus"], "--auto_augment"),
        (["--random_erase", "2"], "--random_erase"),
        (["--early_stopping_patience", "-1"], "--early_stopping_patience"),
    ],
)
def test_bad_flag_is_one_line_naming_it_with_exit_code_2(argv, flag, capsys):
    assert train_exit_code(argv) == 2
    assert flag in one_line_error(capsys)


def test_values_from_config_are_checked_like_flags(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 0.01\nlabel_smoothing: 3\n")
    assert train_exit_code(["--config", str(config)]) == 2
    line = one_line_error(capsys)
    assert "--label_smoothing" in line
    config.write_text(f"data_dir: {tmp_path / 'missing'}\n")
    assert train_exit_code(["--config", str(config)]) == 2
    assert "--data_dir" in one_line_error(capsys)
    # the file is checked as it is read: its bad value is named even when the command line sets another
    config.write_text("rotation: 999\n")
    assert train_exit_code(["--config", str(config), "--rotation", "10"]) == 2
    assert "--rotation" in one_line_error(capsys)


def test_default_root_dir_that_is_a_file_is_rejected(tmp_path, capsys):
    afile = tmp_path / "runs"
    afile.write_text("")
    assert train_exit_code(["--default_root_dir", str(afile)]) == 2
    assert "--default_root_dir" in one_line_error(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a CUDA GPU")
def test_gpu_without_cuda_says_what_was_found_and_what_to_use(tmp_path, capsys):
    assert train_exit_code(["--accelerator", "gpu", "--default_root_dir", str(tmp_path)]) == 2
    line = one_line_error(capsys)
    assert "--accelerator gpu" in line and "no CUDA GPU" in line and "--accelerator cpu" in line
    assert not (tmp_path / "lightning_logs").exists()  # nothing started


def test_ckpt_path_last_without_a_checkpoint_is_an_error_not_a_fresh_start(tmp_path, capsys):
    assert train_exit_code(["--ckpt_path", "last", "--default_root_dir", str(tmp_path)]) == 2
    line = one_line_error(capsys)
    assert "--ckpt_path last" in line and "no checkpoint" in line and str(tmp_path) in line
    assert not (tmp_path / "lightning_logs").exists()
