"""Model inspection: parameter tables and totals, state_dict listing, per-child output shapes, gradient checks."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from project.data import ImageDataModule
from project.models import ImageClassifier, SimpleCNN
from project.tools.finetune import freeze_feature_extractor
from project.tools.inspection import (
    STATE_DICT_ABRIDGED,
    format_report,
    gradient_norms,
    inspect_model,
    module_table,
    output_shapes,
    parameter_totals,
    state_dict_entries,
)
from tests.conftest import load_script


def test_module_table_counts_own_and_total_parameters():
    model = SimpleCNN(num_classes=5, width=8)
    rows = {r["name"]: r for r in module_table(model)}
    all_params = sum(p.numel() for p in model.parameters())
    assert rows[""]["total"] == rows[""]["trainable"] == all_params and rows[""]["frozen"] == 0
    # each parameter belongs to exactly one module's own count
    assert sum(r["own"] for r in rows.values()) == all_params
    linear = model.head[2]
    assert rows["head.2"]["own"] == linear.in_features * linear.out_features + linear.out_features
    assert rows["head"]["own"] == 0 and rows["head"]["total"] == rows["head.2"]["own"]
    assert rows["features.0"]["type"] == "Conv2d"


def test_frozen_parameters_are_counted_as_frozen():
    model = SimpleCNN(num_classes=5, width=8)
    freeze_feature_extractor(model)
    head = sum(p.numel() for p in model.head.parameters())
    totals = parameter_totals(model)
    assert totals["trainable"] == head
    assert totals["frozen"] == sum(p.numel() for p in model.features.parameters())
    assert totals["total"] == totals["trainable"] + totals["frozen"]
    rows = {r["name"]: r for r in module_table(model)}
    assert rows["features"]["trainable"] == 0 and rows["features"]["frozen"] == rows["features"]["total"] > 0
    assert rows["head.2"]["frozen"] == 0


def test_size_by_dtype_covers_parameters_and_buffers():
    model = nn.Sequential(nn.Linear(10, 20), nn.BatchNorm1d(20)).to(torch.float64)
    model[0].half()
    size = parameter_totals(model)["size_mb"]
    assert size["float16"] == pytest.approx((10 * 20 + 20) * 2 / 2**20)
    assert size["float64"] == pytest.approx(4 * 20 * 8 / 2**20)  # weight, bias, running mean and var
    assert size["int64"] == pytest.approx(8 / 2**20)  # num_batches_tracked


def test_state_dict_entries_match_the_state_dict():
    model = SimpleCNN(num_classes=3, width=8)
    entries = state_dict_entries(model)
    state = model.state_dict()
    assert [e["key"] for e in entries] == list(state)
    for e in entries:
        assert e["shape"] == tuple(state[e["key"]].shape)
        assert e["dtype"] == str(state[e["key"]].dtype).removeprefix("torch.")


def test_output_shapes_follow_the_forward_pass():
    model = SimpleCNN(num_classes=3, width=8).eval()
    x = torch.randn(1, 3, 48, 48)
    rows = output_shapes(model, x)
    with torch.no_grad():  # the same children by hand, in forward's order
        features = model.features(x)
        pooled = model.pool(features)
        logits = model.head(pooled)
    assert [(r["name"], r["shape"]) for r in rows] == [
        ("features", tuple(features.shape)),
        ("pool", tuple(pooled.shape)),
        ("head", tuple(logits.shape)),
        ("(output)", tuple(logits.shape)),
    ]
    assert not model._forward_hooks and not model.features._forward_hooks  # hooks are removed again


class Odd(nn.Module):
    """A model with an unused layer (no grad) and a layer whose output is multiplied by zero (zero grad)."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.muted = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 3)
        self.frozen = nn.Linear(4, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)[:, :4]
        return self.used(x) + 0.0 * self.muted(x) + self.frozen(x)


def test_gradient_norms_flag_missing_zero_and_frozen_grads():
    rows = {r["name"]: r for r in gradient_norms(Odd(), torch.randn(2, 3, 2, 2), num_classes=3)}
    assert rows["used.weight"]["status"] == "ok" and rows["used.weight"]["grad_norm"] > 0
    assert rows["muted.weight"]["status"] == "zero" and rows["muted.weight"]["grad_norm"] == 0.0
    assert rows["unused.weight"]["status"] == "none" and rows["unused.weight"]["grad_norm"] is None
    assert rows["frozen.weight"]["status"] == "frozen" and not rows["frozen.weight"]["requires_grad"]


def test_gradient_pass_leaves_the_model_untouched():
    model = SimpleCNN(num_classes=3, width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = gradient_norms(model, torch.randn(2, 3, 32, 32), num_classes=3)
    assert all(r["status"] == "ok" for r in rows)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics too
    assert all(p.grad is None for p in model.parameters())


def test_report_abridges_long_state_dicts_unless_full():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(STATE_DICT_ABRIDGED)])  # 2 entries per layer
    report = inspect_model(nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2), model), image_size=4, num_classes=2)
    keys = [e["key"] for e in report["state_dict"]]
    short, full = format_report(report), format_report(report, full=True)
    assert f"{len(keys) - STATE_DICT_ABRIDGED} more" in short
    assert keys[-1] in short and keys[len(keys) // 2] not in short.split("== state_dict")[1].split("==")[1]
    assert all(k in full for k in keys) and "more (--full" not in full


@pytest.fixture(scope="module")
def checkpoint(tiny_shapes, tmp_path_factory) -> Path:
    dm = ImageDataModule(data_dir=tiny_shapes, image_size=32, batch_size=8, num_workers=0)
    model = ImageClassifier(num_classes=len(dm.classes), class_names=dm.classes, **dm.preprocessing)
    trainer = L.Trainer(
        fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(model, datamodule=dm)
    path = tmp_path_factory.mktemp("inspect") / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_script_inspects_a_checkpoint(checkpoint, capsys):
    assert load_script("inspect_model").main(["--checkpoint", str(checkpoint), "--freeze_backbone"]) == 0
    out = capsys.readouterr().out
    model = ImageClassifier.load_from_checkpoint(checkpoint).model
    head = sum(p.numel() for p in model.head.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert f"trainable {head:,}   frozen {total - head:,}   all {total:,}" in out
    assert "circle" in out and "image size 32" in out  # the checkpoint's classes and preprocessing
    assert re.search(rf"\(output\)\s+SimpleCNN\s+\[1, {len(model.head[2].bias)}\]", out)


def test_script_usage_errors(tmp_path, capsys):
    script = load_script("inspect_model")
    assert script.main(["--checkpoint", str(tmp_path / "missing.ckpt")]) == 2
    assert script.main(["--backbone", "no_such_net"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "missing.ckpt" in err[0] and "no_such_net" in err[1]
