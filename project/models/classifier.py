"""`ImageClassifier`, the LightningModule that owns all of learning: backbone, loss, metrics, optimizer and schedule.

Hyperparameters are primitives only (strings, numbers, lists), class names and preprocessing included, so checkpoints
are self-contained: `load_from_checkpoint(path)` needs no other argument; `torch.load(path, weights_only=True)` works.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

import lightning as L
import torch
import torchmetrics
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt, restricted_number_type

from project.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from project.models.backbones import build_backbone

OPTIMIZERS = ("adamw", "sgd")
Fraction = restricted_number_type("Fraction", float, [(">=", 0), ("<", 1)])  # momentum, label smoothing: [0, 1)


def decay_groups(params: Iterable[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """Optimizer param groups: weight decay on weight matrices and kernels only (decaying biases, norm scales hurts)."""
    params = list(params)
    decay, no_decay = [p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR factor: linear warm-up from ~0 to 1, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class ImageClassifier(L.LightningModule):
    """Image classification with any registered backbone.

    Every parameter but num_classes, class_names, image_size, mean and std (which come from the data) is
    also a flag of `scripts/train.py`: same name, its type and default, and the line below as help.

    Args:
        backbone: simple_cnn, or any torchvision classifier (resnet18, mobilenet_v3_small, ...)
        num_classes: outputs of the head
        class_names: the class names, in label order
        image_size: the image side the model was trained at (used by prediction)
        mean: the normalization mean the model was trained with
        std: the normalization standard deviation the model was trained with
        pretrained: start from torchvision's ImageNet weights (downloads them; fails clearly offline)
        optimizer: adamw, or sgd with Nesterov momentum
        lr: peak learning rate
        weight_decay: decoupled weight decay (not on biases and norm weights)
        momentum: SGD momentum
        warmup_epochs: linear warm-up before the cosine decay (fractions allowed)
        label_smoothing: cross-entropy label smoothing
        compile: torch.compile the backbone (pays off on GPUs for long runs; the first steps compile)
        channels_last: NHWC memory format for weights and batches (faster convolutions on tensor-core GPUs)
    """

    def __init__(
        self,
        backbone: str = "simple_cnn",
        num_classes: PositiveInt = 8,
        class_names: Sequence[str] | None = None,
        image_size: PositiveInt = 64,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        pretrained: bool = False,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: PositiveFloat = 5e-3,
        weight_decay: NonNegativeFloat = 0.05,
        momentum: Fraction = 0.9,
        warmup_epochs: NonNegativeFloat = 0.5,
        label_smoothing: Fraction = 0.0,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for num_classes={num_classes}")
        class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        self.save_hyperparameters()
        self.model = build_backbone(backbone, num_classes, pretrained=pretrained)
        self.backbone_compiled = False
        if channels_last:
            self.model.to(memory_format=torch.channels_last)  # 4-D weights only; values and keys unchanged
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        accuracy = {"acc": torchmetrics.classification.MulticlassAccuracy(num_classes, top_k=1, average="micro")}
        if num_classes > 5:
            accuracy["acc_top5"] = torchmetrics.classification.MulticlassAccuracy(num_classes, top_k=5, average="micro")
        metrics = torchmetrics.MetricCollection(accuracy)
        self.train_metrics, self.val_metrics = metrics.clone(prefix="train/"), metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    @property
    def class_names(self) -> list[str]:
        return list(self.hparams.class_names)

    def configure_model(self) -> None:
        # runs again for test and predict; in place, so keys get no `_orig_mod.` prefix: checkpoints load either way
        if self.hparams.get("compile") and not self.backbone_compiled:
            self.model.compile()
            self.backbone_compiled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)  # a no-op when the DataModule already did it
        return self.model(x)  # (B, 3, H, W) normalized float -> (B, num_classes) logits

    def _shared_step(self, batch: tuple[torch.Tensor, ...], stage: str) -> torch.Tensor:
        images, labels, *mixed = batch  # mixed: a MixUp / CutMix training batch's (B, C) soft targets
        logits = self(images)
        loss = self.criterion(logits, mixed[0] if mixed else labels)
        # accumulated on the device, computed per epoch: per-step values cost compute and logging for a noisy curve
        getattr(self, f"{stage}_metrics").update(logits, labels)  # the un-mixed labels: each image's main class
        # one curve per name (no _step/_epoch suffixes); no prog_bar per step: it would cost a GPU sync every step
        epoch = stage != "train"
        self.log(
            f"{stage}/loss",
            loss,
            on_step=not epoch,
            on_epoch=epoch,
            prog_bar=epoch,
            sync_dist=epoch,
            batch_size=len(labels),
        )
        return loss

    def _log_epoch_metrics(self, stage: str) -> None:
        # once per epoch: metric objects in `self.log_dict` every step cost the largest part of Lightning's per-step
        # overhead (docs/performance.md). compute() already gathers all DDP processes; sync_dist only keeps it quiet
        metrics = getattr(self, f"{stage}_metrics")
        self.log_dict(metrics.compute(), prog_bar=stage != "train", sync_dist=stage != "train")
        metrics.reset()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        return torch.softmax(self(batch[0]).float(), dim=1)  # (B, num_classes) probabilities

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]  # frozen layers stay out
        groups = decay_groups(trainable, self.hparams.weight_decay)
        if self.hparams.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=self.hparams.lr, momentum=self.hparams.momentum, nesterov=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, self.trainer.max_epochs or 1)  # -1 or None: no epoch limit
        warmup = max(1, min(total, int(round(self.hparams.warmup_epochs * total / epochs))))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
