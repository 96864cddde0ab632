"""Fine-tuning: the head lookup, freezing the feature extractor, and unfreezing it at a given epoch."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count
from torch import nn

from project.data import ImageDataModule
from project.models import ImageClassifier, build_backbone
from project.models.backbones import head_name
from project.runtime.flags import UsageError
from project.tools.finetune import BACKBONE_LR_RATIO, FreezeBackbone, feature_extractor, freeze_feature_extractor
from project.training import build_callbacks, parse_train_flags

BACKBONES = ["simple_cnn", "resnet18", "mobilenet_v3_small"]


@pytest.mark.parametrize("name", BACKBONES)
def test_head_is_the_layer_that_outputs_the_classes(name):
    model = build_backbone(name, num_classes=7)
    head = model.get_submodule(head_name(model))
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert linears and linears[-1].out_features == 7
    # the head is small next to the feature extractor it sits on
    assert sum(p.numel() for p in head.parameters()) < 0.2 * sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", BACKBONES)
def test_freeze_leaves_only_the_head_trainable(name):
    model = build_backbone(name, num_classes=7)
    prefix = head_name(model) + "."
    freeze_feature_extractor(model)
    for param_name, param in model.named_parameters():
        assert param.requires_grad == param_name.startswith(prefix), param_name
    batch_norms = [m for m in feature_extractor(model) if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert batch_norms and not any(m.track_running_stats for m in batch_norms)


def test_head_lookup_fails_clearly_without_a_linear():
    with pytest.raises(ValueError, match="no nn.Linear head"):
        head_name(nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()))


class Snapshots(Callback):
    """State of the model's feature extractor and head at the end of every training epoch, plus the optimizer."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, torch.Tensor]] = []
        self.optimizer_params: list[set[int]] = []
        self.group_lrs: list[list[float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})
        optimizer = trainer.optimizers[0]
        self.optimizer_params.append({id(p) for g in optimizer.param_groups for p in g["params"]})
        self.group_lrs.append([g["lr"] for g in optimizer.param_groups])


def fit(
    tiny_shapes,
    callback: Callback,
    epochs: int,
    summary: bool = False,
    extra: tuple[Callback, ...] = (),
    ckpt_path: str | None = None,
    save: str | None = None,
) -> tuple[ImageClassifier, Snapshots]:
    L.seed_everything(0, verbose=False)
    dm = ImageDataModule(data_dir=tiny_shapes, image_size=32, batch_size=16, num_workers=0)
    model = ImageClassifier(num_classes=len(dm.classes), class_names=dm.classes, lr=0.01, **dm.preprocessing)
    snapshots = Snapshots()
    callbacks = [callback, snapshots, *extra] + ([ModelSummary(max_depth=1)] if summary else [])
    trainer = L.Trainer(
        max_epochs=epochs,
        limit_train_batches=3,
        limit_val_batches=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=summary,
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    if save:
        trainer.save_checkpoint(save)
    return model, snapshots


def split(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    head = {k: v for k, v in state.items() if k.startswith("head.")}
    return {k: v for k, v in state.items() if k not in head}, head


def test_frozen_feature_extractor_does_not_change(tiny_shapes, caplog):
    initial = {}

    class Initial(Callback):
        def on_train_start(self, trainer, pl_module):
            initial.update({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})

    summary_log = logging.getLogger("lightning.pytorch.callbacks.model_summary")
    summary_log.addHandler(caplog.handler)  # Lightning's logger does not propagate to pytest's root handler
    try:
        with caplog.at_level(logging.INFO, logger=summary_log.name):
            model, snap = fit(tiny_shapes, FreezeBackbone(), epochs=1, summary=True, extra=(Initial(),))
    finally:
        summary_log.removeHandler(caplog.handler)
    frozen_before, head_before = split(initial)
    assert frozen_before and head_before
    frozen_after, head_after = split(snap.epochs[-1])
    # weights and batch-norm running statistics alike
    assert all(torch.equal(frozen_before[k], frozen_after[k]) for k in frozen_before)
    assert any(not torch.equal(head_before[k], head_after[k]) for k in head_before)
    # the optimizer holds exactly the head's parameters
    assert snap.optimizer_params[-1] == {id(p) for p in model.model.head.parameters()}
    # Lightning's printed summary counts the frozen parameters as non-trainable
    frozen = sum(p.numel() for p in model.model.features.parameters())
    printed = "\n".join(r.getMessage() for r in caplog.records)
    line = next(s for s in printed.splitlines() if "Non-trainable params" in s)
    assert line.startswith(get_human_readable_count(frozen).strip() + " ")


@pytest.mark.slow
def test_unfreeze_at_epoch_trains_the_feature_extractor_from_then_on_also_after_resuming(tiny_shapes, tmp_path):
    path = str(tmp_path / "epoch2.ckpt")
    model, snap = fit(tiny_shapes, FreezeBackbone(unfreeze_at_epoch=1), epochs=2, save=path)
    frozen0, _ = split(snap.epochs[0])
    frozen1, _ = split(snap.epochs[1])
    weights = [k for k in frozen0 if k.endswith("weight")]
    assert any(not torch.equal(frozen0[k], frozen1[k]) for k in weights)
    assert all(p.requires_grad for p in model.parameters())
    head = {id(p) for p in model.model.head.parameters()}
    assert snap.optimizer_params[0] == head and snap.optimizer_params[1] == {id(p) for p in model.parameters()}
    # the new groups follow the head's schedule at a fixed ratio (same decay / no-decay split)
    lrs = snap.group_lrs[1]
    assert len(lrs) == 4
    assert lrs[2] == pytest.approx(lrs[0] * BACKBONE_LR_RATIO) and lrs[3] == pytest.approx(lrs[1] * BACKBONE_LR_RATIO)

    # resumed in epoch 2, the feature extractor is unfrozen again and still in the optimizer
    model, snap = fit(tiny_shapes, FreezeBackbone(unfreeze_at_epoch=1), epochs=3, ckpt_path=path)
    assert len(snap.epochs) == 1  # only epoch 2 ran
    frozen2, _ = split(snap.epochs[0])
    assert any(not torch.equal(frozen1[k], frozen2[k]) for k in weights)
    assert snap.optimizer_params[0] == {id(p) for p in model.parameters()}
    lrs = snap.group_lrs[0]
    assert len(lrs) == 4 and lrs[2] == pytest.approx(lrs[0] * BACKBONE_LR_RATIO)


def test_cli_flags_add_the_callback():
    args = parse_train_flags(["--freeze_backbone", "--unfreeze_at_epoch", "2"])
    found = [c for c in build_callbacks(args) if isinstance(c, FreezeBackbone)]
    assert len(found) == 1 and found[0].unfreeze_at_epoch == 2
    args = parse_train_flags(["--freeze-backbone"])
    assert [c.unfreeze_at_epoch for c in build_callbacks(args) if isinstance(c, FreezeBackbone)] == [None]
    assert not any(isinstance(c, FreezeBackbone) for c in build_callbacks(parse_train_flags([])))


def test_unfreeze_without_freeze_is_a_usage_error():
    with pytest.raises(UsageError, match="--freeze_backbone"):
        parse_train_flags(["--unfreeze_at_epoch", "1"])
