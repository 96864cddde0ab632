"""examples/recipe.yaml: every line is a real flag that reaches the run, and a run with it finishes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from project.training import parse_train_flags
from tests.conftest import train_exit_code

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "recipe.yaml"
# the pieces of torchvision's reference recipe the file must set (issue: one recipe file)
REFERENCE = {"auto_augment", "random_erase", "mixup_alpha", "cutmix_alpha", "label_smoothing", "ema_decay"}


def test_every_line_is_a_flag_and_flags_after_it_win():
    lines = yaml.safe_load(RECIPE.read_text())
    assert REFERENCE | {"max_epochs", "warmup_epochs"} <= set(lines)
    assert lines["auto_augment"] == "ta_wide" and lines["mixup_alpha"] == 0.2 and lines["cutmix_alpha"] == 1.0
    # the parser refuses an unknown key; this also checks that every value arrives as written
    values = parse_train_flags(["--config", str(RECIPE), "--max_epochs", "1", "--num_workers", "0"])
    assert {key: values[key] for key in lines if key != "max_epochs"} == {
        key: value for key, value in lines.items() if key != "max_epochs"
    }
    assert values["max_epochs"] == 1 and values["num_workers"] == 0
    assert values["data_dir"] is None  # the built-in data unless --data_dir is given


@pytest.mark.slow
def test_a_tiny_run_with_the_recipe_exits_0(tiny_shapes, tmp_path):
    argv = ["--config", str(RECIPE), "--data_dir", str(tiny_shapes), "--default_root_dir", str(tmp_path)]
    argv += ["--image_size", "32", "--batch_size", "8", "--max_epochs", "1", "--limit_train_batches", "2"]
    argv += ["--limit_val_batches", "1", "--limit_test_batches", "1", "--num_workers", "0", "--accelerator", "cpu"]
    assert train_exit_code(argv) == 0
    saved = yaml.safe_load(next(tmp_path.glob("lightning_logs/version_*/config.yaml")).read_text())
    assert saved["auto_augment"] == "ta_wide" and saved["ema_decay"] == yaml.safe_load(RECIPE.read_text())["ema_decay"]
