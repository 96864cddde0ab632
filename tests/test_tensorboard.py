"""TensorBoard output of a real train.py run, read back through a real TensorBoard server and from the event files."""

from __future__ import annotations

import contextlib
import io
import json
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchmetrics.classification import MulticlassConfusionMatrix

from project.callbacks import ModelGraphLogger
from project.data import ImageDataModule, generate_shapes
from project.data.builtin import SHAPES
from project.data.transforms import IMAGENET_MEAN, IMAGENET_STD, DeviceTransform
from project.models import ImageClassifier
from project.views.tensorboard import (
    ConfusionMatrixLogger,
    MispredictionLogger,
    confusion_matrix_figure,
    unnormalize,
)
from tests.conftest import load_script

IMAGE_SIZE, BATCH_SIZE = 32, 8
IMAGE_TAGS = {"train/augmented_batch", "val/confusion_matrix", "val/mispredicted"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One short train.py run on a generated dataset with every class in validation; shared by the tests."""
    root = tmp_path_factory.mktemp("tb")
    data = generate_shapes(
        root / "shapes", image_size=IMAGE_SIZE, per_class={"train": 4, "val": 2, "test": 2}, progress=False
    )
    argv = [
        "--data_dir",
        str(data),
        "--image_size",
        str(IMAGE_SIZE),
        "--batch_size",
        str(BATCH_SIZE),
        "--max_epochs",
        "1",
        "--limit_train_batches",
        "3",
        "--log_every_n_steps",
        "1",
        "--num_workers",
        "0",
        "--default_root_dir",
        str(root),
        "--profiler",
        "simple",
        # rotation on the device: only a grid taken after on_after_batch_transfer shows it
        "--augment_on",
        "device",
        "--rotation",
        "45",
    ]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = load_script("train").main(argv)
    assert code == 0
    logs = root / "lightning_logs"
    (run_dir,) = logs.glob("version_*")
    accumulator = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return {"logs": logs, "run_dir": run_dir, "stdout": out.getvalue(), "events": accumulator}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(base: str, route: str, **params: str) -> bytes:
    url = f"{base}{route}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def test_train_prints_the_tensorboard_command(run: dict) -> None:
    match = re.search(r"tensorboard --logdir (\S+)", run["stdout"])
    assert match, run["stdout"][-500:]
    assert Path(match.group(1)).resolve() == run["logs"].resolve()


def test_tensorboard_server_serves_val_acc_and_images(run: dict) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(run["logs"]),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--reload_interval",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline, tags = time.monotonic() + 60, {}
        while time.monotonic() < deadline:  # up, and done loading the run
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            with contextlib.suppress(OSError):
                tags = json.loads(get(base, "/data/plugin/scalars/tags"))
                if "val/acc" in tags.get("version_0", {}):
                    break
            time.sleep(0.5)
        assert "val/acc" in tags.get("version_0", {}), f"server never listed val/acc: {tags}"

        # val/acc as served equals the best val/acc train.py printed (one epoch: best == last)
        points = json.loads(get(base, "/data/plugin/scalars/scalars", run="version_0", tag="val/acc"))
        printed = float(re.search(r"best val/acc ([\d.]+)", run["stdout"]).group(1))
        assert len(points) == 1 and points[0][2] == pytest.approx(printed, abs=5e-5)

        image_tags = json.loads(get(base, "/data/plugin/images/tags"))["version_0"]
        assert set(image_tags) >= IMAGE_TAGS
        # the batch grid: one image per sample of the first batch, 8 per row, 2 px padding
        (entry,) = json.loads(get(base, "/data/plugin/images/images", run="version_0", tag="train/augmented_batch"))
        png = get(base, f"/data/plugin/images/individualImage?{entry['query']}")
        grid = Image.open(io.BytesIO(png))
        rows = -(-BATCH_SIZE // 8)
        assert grid.size == (min(8, BATCH_SIZE) * (IMAGE_SIZE + 2) + 2, rows * (IMAGE_SIZE + 2) + 2)
        # rotated tiles have black corners (zero fill outside the source); the workers' images never do
        pixels = np.asarray(grid.convert("RGB"), dtype=np.int32)
        step = IMAGE_SIZE + 2
        corners = [pixels[2 + r * step, 2 + c * step].sum() for r in range(rows) for c in range(min(8, BATCH_SIZE))]
        assert sum(value < 30 for value in corners) >= len(corners) // 2, corners
        (entry,) = json.loads(get(base, "/data/plugin/images/images", run="version_0", tag="val/confusion_matrix"))
        assert Image.open(io.BytesIO(get(base, f"/data/plugin/images/individualImage?{entry['query']}"))).width > 200

        # HPARAMS tab: the run's flags, with the final metrics as columns
        experiment = json.loads(get(base, "/data/plugin/hparams/experiment", request="{}"))
        hparams = {h["name"] for h in experiment["hparamInfos"]}
        metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
        assert {"lr", "batch_size", "backbone", "max_epochs"} <= hparams
        assert {"hp/best_val_acc", "hp/test_acc"} <= metrics
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        server.stderr.close()


def test_profiler_report_lands_in_the_run_folder(run: dict) -> None:
    report = run["run_dir"] / "fit-profile.txt"
    assert report.is_file() and "run_training_epoch" in report.read_text()


def test_event_files_hold_the_documented_scalars_and_images(run: dict) -> None:
    events = run["events"]
    scalars = set(events.Tags()["scalars"])
    # step-and-epoch metrics are logged by Lightning as <name>_step / <name>_epoch
    for name in ("train/loss", "train/acc", "val/loss", "val/acc", "test/acc"):
        assert any(t == name or re.fullmatch(rf"{re.escape(name)}_(step|epoch)", t) for t in scalars), name
    assert any(t.startswith("lr") for t in scalars), scalars
    assert set(events.Tags()["images"]) >= IMAGE_TAGS
    assert events.Tags()["graph"], "model graph missing"

    # per-class accuracy: one scalar per class; validation is balanced, so their mean is val/acc
    per_class = [events.Scalars(f"val_class_acc/{name}")[-1].value for name in SHAPES]
    val_acc = events.Scalars("val/acc")[-1].value
    assert sum(per_class) / len(per_class) == pytest.approx(val_acc, abs=1e-6)

    # the HPARAMS columns repeat the run's real results
    assert events.Scalars("hp/test_acc")[-1].value == pytest.approx(events.Scalars("test/acc")[-1].value)
    assert events.Scalars("hp/best_val_acc")[-1].value == pytest.approx(val_acc)


def test_unnormalize_inverts_the_device_normalization() -> None:
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    normalized = DeviceTransform(IMAGENET_MEAN, IMAGENET_STD)(images, augment=False)
    assert torch.allclose(unnormalize(normalized, IMAGENET_MEAN, IMAGENET_STD), images.float() / 255, atol=1e-5)


class Untraceable(L.LightningModule):
    """A model whose forward takes two inputs: tracing with one example input fails."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.layer(x + y)


def graph_trainer(tmp_path: Path) -> L.Trainer:
    return L.Trainer(
        logger=L.pytorch.loggers.TensorBoardLogger(tmp_path, name="logs"),
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )


def test_model_graph_is_logged_in_eval_mode_without_touching_batch_norm(tmp_path: Path) -> None:
    trainer = graph_trainer(tmp_path)
    model = ImageClassifier(num_classes=3, image_size=IMAGE_SIZE)
    model.trainer = trainer
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ModelGraphLogger().on_fit_start(trainer, model)
    trainer.loggers[0].experiment.flush()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "tracing changed batch-norm statistics"
    assert model.training
    events = EventAccumulator(trainer.loggers[0].log_dir)
    events.Reload()
    assert events.Tags()["graph"]


def test_model_graph_failure_does_not_stop_the_run(tmp_path: Path) -> None:
    trainer = graph_trainer(tmp_path)
    model = Untraceable()
    model.trainer = trainer
    ModelGraphLogger().on_fit_start(trainer, model)  # must not raise
    trainer.loggers[0].experiment.flush()
    events = EventAccumulator(trainer.loggers[0].log_dir)
    events.Reload()
    assert not events.Tags()["graph"]


# ------------------------------------------------- what the validation views show
PREDICTED = 2  # the class a model with a rigged head always predicts


def cell_texts(ax) -> dict[tuple[int, int], str]:
    """Confusion-matrix cell labels by (row: true class, column: predicted class)."""
    return {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}


def test_confusion_matrix_figure_shows_the_counts_and_class_names() -> None:
    matrix = torch.tensor([[5, 1, 0], [2, 7, 3], [0, 0, 4]])
    names = ["cat", "dog", "eel"]
    figure = confusion_matrix_figure(MulticlassConfusionMatrix(num_classes=3), matrix, names)
    (ax,) = [ax for ax in figure.axes if ax.images]
    assert np.array_equal(np.asarray(ax.images[0].get_array()), matrix.numpy())
    assert cell_texts(ax) == {(i, j): str(int(matrix[i, j])) for i in range(3) for j in range(3)}
    assert [t.get_text() for t in ax.get_xticklabels()] == names == [t.get_text() for t in ax.get_yticklabels()]
    assert ax.get_ylabel() == "True class" and ax.get_xlabel() == "Predicted class"


@pytest.fixture(scope="module")
def one_class_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """trainer.validate of a model that predicts class PREDICTED for every image, with the validation views on.

    16 validation images, 2 per class, in 4 batches. Figures are kept as they are logged.
    """
    root = tmp_path_factory.mktemp("views")
    data = generate_shapes(root / "shapes", image_size=IMAGE_SIZE, per_class={"train": 1, "val": 2}, progress=False)
    # a normalization of its own, not ImageNet's: the views must undo the one the batches went through
    stats = {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.3, 0.4)}
    dm = ImageDataModule(data, image_size=IMAGE_SIZE, batch_size=4, num_workers=0, **stats)
    names = sorted(p.name for p in (data / "train").iterdir())
    model = ImageClassifier(num_classes=len(names), class_names=names, image_size=IMAGE_SIZE, **stats)
    head = model.model.head[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[PREDICTED] = 10.0  # softmax: 99.97% on PREDICTED
    logger = L.pytorch.loggers.TensorBoardLogger(root, name="logs")
    figures: dict = {}
    add_figure = logger.experiment.add_figure

    def keep_figure(tag, figure, *args, **kwargs):
        figures[tag] = figure
        return add_figure(tag, figure, *args, **kwargs)

    logger.experiment.add_figure = keep_figure
    trainer = L.Trainer(
        accelerator="cpu",
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            ConfusionMatrixLogger(),
            MispredictionLogger(max_samples=16),
            MispredictionLogger(max_samples=5, tag="val/mispredicted_first5"),
        ],
    )
    trainer.validate(model, datamodule=dm, verbose=False)
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    # the validation images as the model saw them, back in [0, 1], with their labels, in loader order
    images, labels = zip(*((dm.device_transform(x, augment=False), y) for x, y in dm.val_dataloader()), strict=True)
    shown = unnormalize(torch.cat(images), stats["mean"], stats["std"])
    return {"figures": figures, "events": events, "names": names, "images": shown, "labels": torch.cat(labels)}


def test_confusion_matrix_of_a_one_class_model_fills_one_column(one_class_run: dict) -> None:
    names, labels = one_class_run["names"], one_class_run["labels"]
    n = len(names)
    assert labels.bincount(minlength=n).tolist() == [2] * n
    expected = np.zeros((n, n), dtype=np.int64)
    expected[:, PREDICTED] = 2  # every true class, predicted as PREDICTED
    (ax,) = [ax for ax in one_class_run["figures"]["val/confusion_matrix"].axes if ax.images]
    assert np.array_equal(np.asarray(ax.images[0].get_array()), expected)
    assert cell_texts(ax) == {(i, j): str(expected[i, j]) for i in range(n) for j in range(n)}
    assert [t.get_text() for t in ax.get_xticklabels()] == names

    events = one_class_run["events"]
    (image,) = events.Images("val/confusion_matrix")  # the figure reached the event file as an image
    assert image.width > 200 and image.height > 200
    for k, name in enumerate(names):  # per-class accuracy: all of PREDICTED's images right, every other class wrong
        assert events.Scalars(f"val_class_acc/{name}")[-1].value == (1.0 if k == PREDICTED else 0.0), name


def misprediction_panels(figure) -> tuple[list[str], list[np.ndarray]]:
    axes = [ax for ax in figure.axes if ax.images]
    return [ax.get_title() for ax in axes], [np.asarray(ax.images[0].get_array()) for ax in axes]


@pytest.mark.parametrize(("tag", "limit"), [("val/mispredicted", 16), ("val/mispredicted_first5", 5)])
def test_misprediction_grid_shows_exactly_the_mispredicted_images(one_class_run: dict, tag: str, limit: int) -> None:
    names, labels, images = one_class_run["names"], one_class_run["labels"], one_class_run["images"]
    wrong = (labels != PREDICTED).nonzero().flatten()[:limit]
    assert len(wrong) == min(limit, 14)
    titles, pixels = misprediction_panels(one_class_run["figures"][tag])
    assert titles == [f"true: {names[labels[i]]}\npred: {names[PREDICTED]} (100%)" for i in wrong.tolist()]
    assert len(pixels) == len(wrong)
    for panel, i in zip(pixels, wrong.tolist(), strict=True):
        assert np.allclose(panel, images[i].permute(1, 2, 0).numpy(), atol=1e-6)
    assert len(one_class_run["events"].Images(tag)) == 1
