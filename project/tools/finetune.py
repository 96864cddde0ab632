"""Fine-tuning: train the classification head on a frozen feature extractor, optionally unfreeze later.

The head is what `head_name` finds (SimpleCNN's `head`, torchvision's final Linear); everything else is
the feature extractor. Frozen parameters get `requires_grad=False`, so `configure_optimizers` leaves
them out and Lightning's model summary counts them as non-trainable; frozen batch-norm layers also
stop updating their running statistics. Built on Lightning's `BaseFinetuning` (its freeze / unfreeze
helpers and its bookkeeping that restores added param groups on resume); Lightning's own
`BackboneFinetuning` wants a `pl_module.backbone` without the head, which our backbones do not split out.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn
from torch.optim import Optimizer

from project.models.backbones import head_name
from project.models.classifier import decay_groups

# newly unfrozen pretrained layers learn at a tenth of the head's rate: large updates on top of a
# head that is still settling would wreck the features they were chosen for
BACKBONE_LR_RATIO = 0.1


def feature_extractor(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that are not (inside) its classification head, as leaf modules plus
    parents holding parameters of their own (e.g. a ViT's class token)."""
    head = model.get_submodule(head_name(model))
    in_head = {id(m) for m in head.modules()}
    return [m for m in BaseFinetuning.flatten_modules(model) if id(m) not in in_head]


def freeze_feature_extractor(model: nn.Module) -> None:
    """`requires_grad=False` on everything but the head; batch norm keeps its running statistics."""
    BaseFinetuning.freeze(feature_extractor(model), train_bn=False)


class FreezeBackbone(BaseFinetuning):
    """Freeze the feature extractor of `pl_module.model` before training; unfreeze it at the start of
    epoch `unfreeze_at_epoch` (None: never), adding it to the optimizer as new param groups that
    follow the same learning-rate schedule at `lr_ratio` times the head's rate.
    """

    def __init__(self, unfreeze_at_epoch: int | None = None, lr_ratio: float = BACKBONE_LR_RATIO) -> None:
        super().__init__()
        if unfreeze_at_epoch is not None and unfreeze_at_epoch < 0:
            raise ValueError(f"unfreeze_at_epoch must be >= 0, got {unfreeze_at_epoch}")
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.lr_ratio = lr_ratio
        self._trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        super().setup(trainer, pl_module, stage)

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        freeze_feature_extractor(pl_module.model)

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        if self.unfreeze_at_epoch is None or epoch < self.unfreeze_at_epoch:
            return
        modules = feature_extractor(pl_module.model)
        self.make_trainable(modules)
        # on resume the restored optimizer already holds these parameters
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        new = [p for p in self.filter_params(modules) if id(p) not in held]
        schedulers = [c.scheduler for c in self._trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer]
        if new:
            hparams = pl_module.hparams
            for group in decay_groups(new, hparams.weight_decay):
                if not group["params"]:
                    continue
                # start where the head's schedule is now, scaled; schedulers then drive it like the rest
                group["lr"] = optimizer.param_groups[0]["lr"] * self.lr_ratio
                group["initial_lr"] = hparams.lr * self.lr_ratio
                optimizer.add_param_group(group)
                for scheduler in schedulers:
                    scheduler.base_lrs.append(group["initial_lr"])
        for scheduler in schedulers:
            # LambdaLR keeps one factor function per group and silently skips groups beyond them
            lambdas = getattr(scheduler, "lr_lambdas", None)
            while lambdas is not None and len(lambdas) < len(optimizer.param_groups):
                lambdas.append(lambdas[0])
