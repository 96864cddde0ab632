"""How ImageClassifier learns: the warm-up + cosine schedule, weight-decay groups, SGD with Nesterov momentum,
label smoothing, and the Trainer's gradient clipping and accumulation as this model meets them."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from project.data import generate_shapes
from project.models import ImageClassifier
from project.models.classifier import decay_groups, warmup_cosine
from tests.conftest import load_script

NUM_CLASSES, SIZE = 4, 32


@pytest.fixture(autouse=True)
def seeded() -> None:
    """The same initial weights on every run of a test."""
    L.seed_everything(0, verbose=False)


def random_loader(batches: int, batch_size: int = 4, seed: int = 0) -> DataLoader:
    """Normalized-looking random images with random labels, in order."""
    generator = torch.Generator().manual_seed(seed)
    n = batches * batch_size
    images = torch.randn(n, 3, SIZE, SIZE, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size)


def make_trainer(callbacks=(), **kw) -> L.Trainer:
    kw.setdefault("max_epochs", 1)
    kw.setdefault("limit_val_batches", 0)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        **kw,
    )


def grad_norm(module: nn.Module) -> float:
    grads = [p.grad.detach().flatten() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.cat(grads)))


# ------------------------------------------------------------------ schedule
def test_warmup_cosine_rises_linearly_then_decays_to_zero():
    warmup, total = 100, 1000
    factors = [warmup_cosine(step, warmup, total) for step in range(total + 1)]
    assert factors[0] == pytest.approx(1 / warmup)  # starts near 0
    rises = [b - a for a, b in zip(factors[:warmup], factors[1:warmup], strict=False)]
    assert rises == pytest.approx([1 / warmup] * (warmup - 1))  # a straight line up...
    assert factors[warmup - 1] == pytest.approx(1.0) and max(factors) == pytest.approx(1.0)  # ...to the peak
    decay = factors[warmup:]
    assert all(b < a for a, b in zip(decay, decay[1:], strict=False))  # then only down
    for step in (100, 325, 550, 775, 1000):  # a half cosine from 1 to 0
        progress = (step - warmup) / (total - warmup)
        assert factors[step] == pytest.approx(0.5 * (1 + math.cos(math.pi * progress)), abs=1e-12)
    assert factors[550] == pytest.approx(0.5) and factors[total] == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(total + 50, warmup, total) == pytest.approx(0.0, abs=1e-12)  # stays at 0 past the end


class RecordLR(L.Callback):
    """The learning rate of every param group at each optimizer step, and after the last one."""

    def __init__(self) -> None:
        self.steps: list[list[float]] = []
        self.final: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append([group["lr"] for group in optimizer.param_groups])

    def on_train_end(self, trainer, pl_module):
        self.final = [group["lr"] for group in trainer.optimizers[0].param_groups]


def test_trainer_steps_the_schedule_per_batch_warmup_then_cosine_to_zero():
    lr, epochs, batches = 0.1, 2, 6  # 12 steps; warmup_epochs=1: 6 of them warm up
    record = RecordLR()
    model = ImageClassifier(num_classes=NUM_CLASSES, image_size=SIZE, lr=lr, warmup_epochs=1)
    make_trainer([record], max_epochs=epochs).fit(model, train_dataloaders=random_loader(batches, batch_size=2))

    assert len(record.steps) == epochs * batches
    assert all(len(set(groups)) == 1 for groups in record.steps)  # every param group follows the schedule
    lrs = [groups[0] for groups in record.steps]
    total, warmup = epochs * batches, batches
    expected = [lr * (i + 1) / warmup for i in range(warmup)]
    expected += [lr * 0.5 * (1 + math.cos(math.pi * (i - warmup) / (total - warmup))) for i in range(warmup, total)]
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert lrs[0] == pytest.approx(lr / warmup)  # near 0 at the first step
    assert max(lrs) == pytest.approx(lr) and lrs[warmup - 1] == pytest.approx(lr)  # peak at the end of warm-up
    assert all(b < a for a, b in zip(lrs[warmup:], lrs[warmup + 1 :], strict=False))
    assert record.final == pytest.approx([0.0] * len(record.final), abs=1e-12)  # 0 after the last step


# -------------------------------------------------------------- param groups
def test_decay_groups_decay_weights_not_biases_or_norms():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.LayerNorm(4 * 6 * 6),
        nn.Linear(4 * 6 * 6, 2),
    )
    groups = decay_groups(model.parameters(), weight_decay=0.05)
    decay_of = {}
    for group in groups:
        for p in group["params"]:
            assert id(p) not in decay_of, "a parameter in two groups"
            decay_of[id(p)] = group["weight_decay"]
    names = dict(model.named_parameters())
    assert set(decay_of) == {id(p) for p in names.values()}  # every parameter in a group
    decayed = {name for name, p in names.items() if decay_of[id(p)] == 0.05}
    undecayed = {name for name, p in names.items() if decay_of[id(p)] == 0.0}
    assert decayed == {"0.weight", "4.weight"}  # conv kernel, linear matrix
    assert undecayed == {"0.bias", "1.weight", "1.bias", "3.weight", "3.bias", "4.bias"}


def fitted_optimizer(model: ImageClassifier) -> torch.optim.Optimizer:
    trainer = make_trainer(max_steps=1)
    trainer.fit(model, train_dataloaders=random_loader(1))
    return trainer.optimizers[0]


def test_sgd_with_nesterov_momentum_and_frozen_parameters_left_out():
    model = ImageClassifier(
        num_classes=NUM_CLASSES, image_size=SIZE, optimizer="sgd", lr=0.2, momentum=0.7, weight_decay=0.01
    )
    model.model.features[0].requires_grad_(False)  # freeze the first convolution
    frozen = {id(p) for p in model.model.features[0].parameters()}
    assert frozen
    optimizer = fitted_optimizer(model)

    assert isinstance(optimizer, torch.optim.SGD)
    for group in optimizer.param_groups:
        assert group["nesterov"] is True and group["momentum"] == 0.7 and group["initial_lr"] == 0.2
    in_groups = [id(p) for group in optimizer.param_groups for p in group["params"]]
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert len(in_groups) == len(set(in_groups)) == len(trainable)  # each trainable parameter exactly once
    assert set(in_groups) == {id(p) for p in trainable.values()} and not frozen & set(in_groups)
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    for name, p in trainable.items():
        module_name, kind = name.rsplit(".", 1)
        is_kernel = kind == "weight" and isinstance(model.get_submodule(module_name), (nn.Conv2d, nn.Linear))
        assert decay_of[id(p)] == (0.01 if is_kernel else 0.0), name


def test_adamw_is_the_default_with_the_decay_groups():
    model = ImageClassifier(num_classes=NUM_CLASSES, image_size=SIZE, lr=0.01, weight_decay=0.3)
    optimizer = fitted_optimizer(model)
    assert type(optimizer) is torch.optim.AdamW
    head = model.model.head[-1]
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert decay_of[id(head.weight)] == 0.3 and decay_of[id(head.bias)] == 0.0
    assert len(decay_of) == sum(1 for _ in model.parameters())


# ----------------------------------------------------------- label smoothing
@pytest.mark.parametrize("smoothing", [0.3, 0.0])
def test_label_smoothing_is_the_loss(smoothing):
    model = ImageClassifier(num_classes=NUM_CLASSES, image_size=SIZE, label_smoothing=smoothing)
    head = model.model.head[-1]
    with torch.no_grad():  # the same confident logits for every image, so smoothing changes the loss a lot
        head.weight.zero_()
        head.bias.copy_(torch.tensor([4.0, 0.0, -1.0, 1.0]))
    images = torch.randn(8, 3, SIZE, SIZE)
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 3, 1])  # mostly the confident class: smoothing costs loss there
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    logged = make_trainer(limit_val_batches=None).validate(model, dataloaders=loader, verbose=False)[0]["val/loss"]

    model.eval()
    with torch.no_grad():
        logits = model(images)
    smoothed = F.cross_entropy(logits, labels, label_smoothing=smoothing)
    unsmoothed = F.cross_entropy(logits, labels)
    assert logged == pytest.approx(float(smoothed), rel=1e-5)
    if smoothing:
        assert abs(float(smoothed) - float(unsmoothed)) > 0.05 * float(unsmoothed)


# ------------------------------------------------ clipping and accumulation
class RecordSteps(L.Callback):
    """Gradient norms as the model computed them and as the optimizer stepped with them, weights after
    every batch, and the optimizer steps taken."""

    def __init__(self) -> None:
        self.raw_norms: list[float] = []  # before clipping: on_before_optimizer_step comes first
        self.stepped_norms: list[float] = []  # after the step, the gradients it used are still there
        self.weights: list[torch.Tensor] = []
        self.global_steps: list[int] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.raw_norms.append(grad_norm(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.stepped_norms.append(grad_norm(pl_module))
        self.weights.append(torch.cat([p.detach().flatten() for p in pl_module.parameters()]).clone())
        self.global_steps.append(trainer.global_step)


@pytest.mark.parametrize("clip", [0.01, None])
def test_gradient_clipping_bounds_the_norm_the_optimizer_uses(clip):
    record = RecordSteps()
    model = ImageClassifier(num_classes=NUM_CLASSES, image_size=SIZE)
    make_trainer([record], gradient_clip_val=clip).fit(model, train_dataloaders=random_loader(3))
    assert len(record.raw_norms) == len(record.stepped_norms) == 3
    assert all(norm > 0.05 for norm in record.raw_norms)  # well above the clip value
    if clip is None:
        assert record.stepped_norms == pytest.approx(record.raw_norms, rel=1e-6)
    else:
        assert all(clip * 0.99 <= norm <= clip * (1 + 1e-4) for norm in record.stepped_norms), record.stepped_norms


def test_accumulation_steps_once_per_k_batches():
    k, batches = 3, 6
    record = RecordSteps()
    model = ImageClassifier(num_classes=NUM_CLASSES, image_size=SIZE)
    initial = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    trainer = make_trainer([record], accumulate_grad_batches=k)
    trainer.fit(model, train_dataloaders=random_loader(batches))
    assert trainer.global_step == batches // k
    assert len(record.raw_norms) == batches // k  # one optimizer step per k batches
    assert record.global_steps == [0, 0, 1, 1, 1, 2]
    before = [initial, *record.weights[:-1]]
    changed = [not torch.equal(a, b) for a, b in zip(before, record.weights, strict=True)]
    assert changed == [False, False, True, False, False, True]  # weights move at the k-th batch only


# ----------------------------------------------------------- the command line
@pytest.mark.slow
def test_train_flags_set_optimizer_clipping_accumulation_and_smoothing(tmp_path, monkeypatch):
    data = generate_shapes(tmp_path / "data", image_size=32, per_class={"train": 2, "val": 1}, progress=False)
    seen: dict = {"optimizer": None, "stepped_norms": [], "global_steps": []}

    def on_before_optimizer_step(self, optimizer):
        seen["optimizer"] = optimizer
        seen["criterion"] = self.criterion

    def on_train_batch_end(self, outputs, batch, batch_idx):
        seen["stepped_norms"].append(grad_norm(self))
        seen["global_steps"].append(self.trainer.global_step)

    monkeypatch.setattr(ImageClassifier, "on_before_optimizer_step", on_before_optimizer_step)
    monkeypatch.setattr(ImageClassifier, "on_train_batch_end", on_train_batch_end)
    argv = [
        "--data_dir",
        str(data),
        "--default_root_dir",
        str(tmp_path / "run"),
        "--image_size",
        "32",
        "--batch_size",
        "4",
        "--max_epochs",
        "1",
        "--limit_train_batches",
        "4",
        "--limit_val_batches",
        "1",
        "--num_workers",
        "0",
        "--accelerator",
        "cpu",
        "--optimizer",
        "sgd",
        "--momentum",
        "0.7",
        "--gradient_clip_val",
        "0.001",
        "--accumulate_grad_batches",
        "2",
        "--label_smoothing",
        "0.2",
        "--no-feed_monitor",
    ]
    assert load_script("train").main(argv) == 0
    optimizer = seen["optimizer"]
    assert isinstance(optimizer, torch.optim.SGD)
    assert all(g["momentum"] == 0.7 and g["nesterov"] for g in optimizer.param_groups)
    assert seen["criterion"].label_smoothing == 0.2
    assert seen["global_steps"] == [0, 1, 1, 2]  # one step per two batches
    stepped = [norm for norm, step in zip(seen["stepped_norms"], [False, True, False, True], strict=True) if step]
    assert all(norm <= 0.001 * (1 + 1e-4) for norm in stepped), seen["stepped_norms"]
