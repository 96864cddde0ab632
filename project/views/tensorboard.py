"""TensorBoard views of a run beyond its scalars: what the model sees, where it errs, its graph, its hyperparameters.

Every callback here writes through the run's `TensorBoardLogger` and does nothing under other loggers
(CSV, W&B, none), so swapping the logger loses these views, never the run. Images are un-normalized
back to [0, 1] with the DataModule's mean and std before they are shown.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from matplotlib.figure import Figure
from torchmetrics.classification import MulticlassConfusionMatrix
from torchvision.utils import make_grid

# what the HPARAMS tab lists for each run: logged metric -> column (the best val/acc is tracked separately)
FINAL_METRICS = {
    "val/acc": "hp/val_acc",
    "val/loss": "hp/val_loss",
    "train/acc": "hp/train_acc",
    "test/acc": "hp/test_acc",
}


def tensorboard_logger(trainer: L.Trainer) -> TensorBoardLogger | None:
    """The run's TensorBoardLogger, or None when it logs elsewhere (or nowhere, as under fast_dev_run)."""
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def normalization(trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Sequence[float], Sequence[float]]:
    """Mean and std the batches were normalized with: the DataModule's, else the model's saved preprocessing."""
    for source in (getattr(trainer.datamodule, "preprocessing", None), pl_module.hparams):
        if source and source.get("mean") is not None and source.get("std") is not None:
            return source["mean"], source["std"]
    return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def unnormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, C, H, W) normalized float -> (B, C, H, W) float32 in [0, 1], on the CPU."""
    images = images.detach().float().cpu()
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images * std_t + mean_t).clamp_(0, 1)


def class_names(pl_module: L.LightningModule, num_classes: int) -> list[str]:
    """The model's class names when it saved `num_classes` of them, else "0", "1", ..."""
    names = getattr(pl_module.hparams, "class_names", None)
    if names is not None and len(names) == num_classes:
        return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]


class AugmentedBatchGrid(Callback):
    """A grid of the first training batch exactly as the model receives it, once per run.

    The batch is taken after worker transforms, device transfer and `on_after_batch_transfer`, so
    rotation and flips show whether they run on the CPU or on the device.
    """

    def __init__(self, max_images: int = 64, nrow: int = 8, tag: str = "train/augmented_batch") -> None:
        self.max_images, self.nrow, self.tag = max_images, nrow, tag
        self._logged = False

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._logged:
            return
        self._logged = True
        logger = tensorboard_logger(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        images = unnormalize(batch[0][: self.max_images], *normalization(trainer, pl_module))
        grid = make_grid(images, nrow=self.nrow, padding=2, pad_value=1.0)  # (B, 3, H, W) -> (3, H', W')
        logger.experiment.add_image(self.tag, grid, trainer.global_step)


class _ValidationLogits(Callback):
    """Base for callbacks that look at each validation batch with the logits the model computed for it.

    A forward hook on the LightningModule catches the logits of `validation_step`'s own forward pass,
    so nothing runs twice. Sanity-check batches are skipped: they come from an untrained model.
    """

    def __init__(self) -> None:
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._logits: torch.Tensor | None = None

    def _capture(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.ndim == 2:
            self._logits = output.detach()  # (B, num_classes)

    def _release(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._logits = None, None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._release()
        if not trainer.sanity_checking and tensorboard_logger(trainer) is not None:
            self._handle = pl_module.register_forward_hook(self._capture)
            self.start(trainer, pl_module)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._handle is None or self._logits is None:
            return
        logits, self._logits = self._logits, None
        self.collect(trainer, pl_module, batch[0], batch[1], logits)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._handle is None:
            return
        self._release()
        self.report(trainer, pl_module, tensorboard_logger(trainer))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._release()

    def start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Reset what `collect` gathers (called at the start of each validation epoch)."""

    def collect(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        images: torch.Tensor,
        labels: torch.Tensor,
        logits: torch.Tensor,
    ) -> None:
        raise NotImplementedError

    def report(self, trainer: L.Trainer, pl_module: L.LightningModule, logger: TensorBoardLogger) -> None:
        raise NotImplementedError


def confusion_matrix_figure(metric: MulticlassConfusionMatrix, matrix: torch.Tensor, names: list[str]) -> Figure:
    """The confusion matrix (rows: true class, columns: predicted) as a matplotlib figure, counts in the cells."""
    n = matrix.shape[0]
    side = min(16.0, 2.0 + 0.6 * n)  # inches: readable labels for a few classes, bounded for hundreds
    figure = Figure(figsize=(side, side), dpi=100, layout="constrained")
    # cell counts only while they fit; tick labels only while they do not overlap
    with warnings.catch_warnings():
        # torchmetrics hands matplotlib a tensor, whose __array__ predates numpy 2's copy keyword: harmless
        warnings.filterwarnings("ignore", message=r"__array__ implementation", category=DeprecationWarning)
        metric.plot(val=matrix.cpu(), ax=figure.add_subplot(), add_text=n <= 20, labels=names if n <= 50 else None)
    return figure


class ConfusionMatrixLogger(_ValidationLogits):
    """At the end of each validation: the confusion matrix as an image (`val/confusion_matrix`) and each
    class's accuracy (recall) as a scalar `val_class_acc/<class>`."""

    def __init__(self, tag: str = "val/confusion_matrix", scalar_prefix: str = "val_class_acc/") -> None:
        super().__init__()
        self.tag, self.scalar_prefix = tag, scalar_prefix
        self.metric: MulticlassConfusionMatrix | None = None

    def start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.metric is not None:
            self.metric.reset()

    def collect(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        images: torch.Tensor,
        labels: torch.Tensor,
        logits: torch.Tensor,
    ) -> None:
        if self.metric is None:
            self.metric = MulticlassConfusionMatrix(num_classes=logits.shape[1])
        self.metric.to(logits.device).update(logits, labels)

    def report(self, trainer: L.Trainer, pl_module: L.LightningModule, logger: TensorBoardLogger) -> None:
        if self.metric is None or not self.metric.update_called:
            return
        matrix = self.metric.compute()  # (C, C) counts, summed over DDP ranks; every rank must call it
        if not trainer.is_global_zero:
            return
        names = class_names(pl_module, matrix.shape[0])
        per_class = matrix.diag().float() / matrix.sum(dim=1).clamp(min=1)
        seen = matrix.sum(dim=1) > 0  # a class absent from validation has no accuracy, not zero
        logger.log_metrics(
            {
                f"{self.scalar_prefix}{name}": float(acc)
                for name, acc, s in zip(names, per_class, seen, strict=True)
                if s
            },
            step=trainer.global_step,
        )
        logger.experiment.add_figure(self.tag, confusion_matrix_figure(self.metric, matrix, names), trainer.global_step)


class MispredictionLogger(_ValidationLogits):
    """A few validation images the model got wrong (`val/mispredicted`), titled with true and predicted class."""

    def __init__(self, max_samples: int = 12, tag: str = "val/mispredicted") -> None:
        super().__init__()
        self.max_samples, self.tag = max_samples, tag
        self._samples: list[tuple[torch.Tensor, int, int, float]] = []
        self._num_classes = 0

    def start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._samples = []

    def collect(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        images: torch.Tensor,
        labels: torch.Tensor,
        logits: torch.Tensor,
    ) -> None:
        room = self.max_samples - len(self._samples)
        if room <= 0 or not trainer.is_global_zero:
            return
        self._num_classes = logits.shape[1]
        probs = logits.float().softmax(dim=1)  # (B, C)
        confidence, preds = probs.max(dim=1)
        wrong = (preds != labels).nonzero().flatten()[:room]
        if len(wrong) == 0:
            return
        shown = unnormalize(images[wrong], *normalization(trainer, pl_module))  # (K, 3, H, W) in [0, 1]
        for image, i in zip(shown, wrong.tolist(), strict=True):
            self._samples.append((image, int(labels[i]), int(preds[i]), float(confidence[i])))

    def report(self, trainer: L.Trainer, pl_module: L.LightningModule, logger: TensorBoardLogger) -> None:
        if not self._samples or not trainer.is_global_zero:
            return
        names = class_names(pl_module, self._num_classes)
        cols = min(4, len(self._samples))
        rows = math.ceil(len(self._samples) / cols)
        figure = Figure(figsize=(2.0 * cols, 2.3 * rows), dpi=100, layout="constrained")
        for k, (image, true, pred, confidence) in enumerate(self._samples):
            ax = figure.add_subplot(rows, cols, k + 1)
            ax.imshow(image.permute(1, 2, 0).numpy())  # (3, H, W) -> (H, W, 3)
            ax.set_title(f"true: {names[true]}\npred: {names[pred]} ({confidence:.0%})", fontsize=9)
            ax.axis("off")
        logger.experiment.add_figure(self.tag, figure, trainer.global_step)
        self._samples = []


class ModelGraphLogger(Callback):
    """The model's graph in TensorBoard's GRAPHS tab, traced once at the start of fitting.

    The example input is the model's `example_input_array`, else a `(1, 3, image_size, image_size)`
    batch from its hyperparameters. Models that cannot be traced cost an info line, never the run.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = tensorboard_logger(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        example = pl_module.example_input_array
        if example is None:
            size = int(pl_module.hparams.get("image_size", 64))
            example = torch.zeros(1, 3, size, size)
        if isinstance(example, torch.Tensor):
            example = example.to(pl_module.device)
        was_training = pl_module.training
        # trace in eval mode: a training-mode trace would pull batch-norm running stats toward the dummy input
        pl_module.eval()
        try:
            # tracer warnings about Python control flow, and torch's own print on failure, are ours to report
            with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                logger.experiment.add_graph(pl_module, example)
        except Exception as error:  # tracing fails in many model-specific ways; the graph is a nice-to-have
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            rank_zero_info(
                f"TensorBoard graph skipped: the model could not be traced ({type(error).__name__}: {reason})"
            )
        finally:
            pl_module.train(was_training)


class HparamsSummary(Callback):
    """Fills TensorBoard's HPARAMS tab: the run's hyperparameters next to its final metrics.

    Lightning's TensorBoardLogger writes the HPARAMS entry only together with metrics (with
    `default_hp_metric=False` it writes none; with True, a placeholder `hp_metric` of -1). This callback
    writes it once, when the results are known: after the test when the DataModule has a test split
    (`has_test`), else at the end of fitting. Columns: `hp/best_val_acc`, `hp/val_acc`, `hp/val_loss`,
    `hp/train_acc`, `hp/test_acc`.

    Args:
        params: the hyperparameters to show (e.g. the run's flags); default: those Lightning saved
            from the model and the DataModule. Lists and mappings are left out: they are not columns.
    """

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        self.params = dict(params) if params is not None else None
        self._metrics: dict[str, float] = {}
        self._best_val_acc: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._metrics, self._best_val_acc = {}, None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # not on_validation_epoch_end: callbacks run that hook before the module logs its epoch's val/acc
        value = trainer.callback_metrics.get("val/acc")
        if value is not None and not trainer.sanity_checking:
            self._best_val_acc = max(float(value), self._best_val_acc or float("-inf"))

    def _gather(self, trainer: L.Trainer) -> None:
        for key, column in FINAL_METRICS.items():
            if key in trainer.callback_metrics:
                self._metrics[column] = float(trainer.callback_metrics[key])
        if self._best_val_acc is not None:
            self._metrics["hp/best_val_acc"] = self._best_val_acc

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._gather(trainer)
        if not getattr(trainer.datamodule, "has_test", False):
            self._write(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._gather(trainer)
        self._write(trainer, pl_module)

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = tensorboard_logger(trainer)
        if logger is None or not self._metrics:
            return
        params = self.params if self.params is not None else dict(logger.hparams)
        columns = {
            k: str(v) if isinstance(v, Path) else v
            for k, v in params.items()
            if not isinstance(v, (Sequence, Mapping)) or isinstance(v, str)
        }
        logger.log_hyperparams(columns, metrics=dict(self._metrics), step=trainer.global_step)
