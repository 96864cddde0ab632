"""`EMA`: an exponential moving average of the weights, for `train.py --ema_decay`.

Lightning's `WeightAveraging` keeps a `torch.optim.swa_utils.AveragedModel` beside the model, updates it
after every optimizer step, swaps it in for validation, writes it as a checkpoint's `state_dict` (the live
weights go to `current_model_state`, so a resumed run restores both) and leaves it in the model when fit
ends. So validation, the best checkpoint, test, `predict.py` and `export.py` all see the averaged weights,
and a checkpoint still loads with `load_from_checkpoint(path)` and `torch.load(path, weights_only=True)`.

`EMA` fixes what Lightning 2.6's callback gets wrong after fit, in the same Trainer (train.py tests the
best checkpoint with the Trainer that fitted it): `test(ckpt_path=...)` loaded the checkpoint's live
weights into the model, and `validate()` swapped in the averaged weights left from the end of fit.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim.swa_utils import get_ema_multi_avg_fn


class EMA(WeightAveraging):
    """Average the weights after every optimizer step: `average = decay * average + (1 - decay) * weights`.

    The first update copies the weights, so validation never sees the initial weights once a step has been
    taken. Buffers (batch-norm statistics) are averaged too, as torchvision's reference recipe does.

    Args:
        decay: the average's share at each step, in [0, 1); 0.999 averages over about the last 1,000 steps
    """

    def __init__(self, decay: float) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        # the foreach version: one kernel per dtype for the whole model, where Lightning's
        # EMAWeightAveraging launches a few per tensor
        super().__init__(multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.decay = decay
        self.swapped = False  # the model holds the averaged weights, the live ones are set aside

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        with warnings.catch_warnings():
            # Lightning warns about layers that configure_model would shard; ImageClassifier's only compiles
            # the backbone, once (the Trainer's own call finds it compiled)
            warnings.filterwarnings("ignore", message="You're using the WeightAveraging callback with a model")
            super().setup(trainer, pl_module, stage)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # validate() after fit evaluates the weights it was given
            super().on_validation_epoch_start(trainer, pl_module)
            self.swapped = True

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.swapped:
            super().on_validation_epoch_end(trainer, pl_module)
            self.swapped = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self.swapped:  # saved during validation (Ctrl+C, SIGTERM): the two are the other way round
            checkpoint["state_dict"], checkpoint["current_model_state"] = (
                checkpoint["current_model_state"],
                checkpoint["state_dict"],
            )

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # only a resumed fit restores the live weights; test and validate evaluate the checkpoint's
        # state_dict, the averaged weights, as load_from_checkpoint, predict.py and export.py do
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
