"""The fast input path: DCT-scaled decoding, uint8 batches, normalization and (optionally) augmentation
after the loader, and the model-side options, all without changing what the model sees."""

from __future__ import annotations

import copy
import inspect
import os
from pathlib import Path

import pytest
import torch
from torchvision import datasets
from torchvision import transforms as T

from project.callbacks import StepMetricsBar, build_callbacks
from project.data import ImageDataModule, generate_shapes
from project.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DeviceTransform,
    random_rotate_flip,
    rotate_flip,
    tensor_train_transform,
)
from project.feed.pipelines_benchmark import compare_pipelines
from project.feed.training_step_benchmark import make_batches, raw_step_rate, trainer_step_rate
from project.models import ImageClassifier
from project.training import build_datamodule, build_model, parse_train_flags

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def large_jpegs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """128 px JPEGs (4x the training size, so the draft decode really scales) with a val/ split."""
    root = tmp_path_factory.mktemp("jpegs") / "shapes128"
    return generate_shapes(root, image_size=128, per_class={"train": 3, "val": 1}, progress=False)


def test_fast_path_yields_what_the_plain_path_yields(large_jpegs: Path) -> None:
    dm = ImageDataModule(
        large_jpegs,
        image_size=32,
        batch_size=24,
        num_workers=0,
        shuffle=False,
        rotation=0.0,
        hflip=False,
        augment_on="cpu",
    )
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    # the plain path: full-size decode, resize, float tensor, normalize, all per image
    plain = datasets.ImageFolder(
        str(large_jpegs / "train"),
        transform=T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]),
    )
    plain_images = torch.stack([plain[i][0] for i in range(len(labels))])
    plain_labels = torch.tensor([plain[i][1] for i in range(len(labels))])

    assert dm.classes == plain.classes
    assert torch.equal(labels, plain_labels)
    assert images.dtype == torch.uint8 and images.shape == plain_images.shape  # (B, 3, 32, 32)
    batch = dm.on_after_batch_transfer((images, labels), 0)[0]
    assert batch.dtype == plain_images.dtype == torch.float32 and batch.shape == plain_images.shape
    low, high = ((0 - MEAN) / STD).min(), ((1 - MEAN) / STD).max()
    assert low - 1e-5 <= batch.min() and batch.max() <= high + 1e-5
    # same pictures: DCT-scaled decoding and resizing differ from the full decode by a few grey levels
    assert (batch - plain_images).abs().mean() < 0.1
    assert (batch - plain_images).abs().mean() < 0.2 * (batch - plain_images.roll(1, 0)).abs().mean()


def test_device_transform_normalizes_like_to_tensor_and_normalize() -> None:
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    expected = (images.float() / 255 - MEAN) / STD
    for channels_last in (False, True):
        out = DeviceTransform(channels_last=channels_last)(images, augment=False)
        torch.testing.assert_close(out, expected)
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


def _pattern(size: int = 24) -> torch.Tensor:
    """An asymmetric uint8 test card: a bright block in the upper left, a ramp, a dark border."""
    image = torch.zeros(3, size, size)
    image[:, 2:-2, 2:-2] = torch.linspace(40, 200, size - 4)
    image[0, 3:10, 3:12] = 255
    return image.round().to(torch.uint8)


def _statistics(batch: torch.Tensor, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample figures that reveal the angle and flip distribution of an augmented batch."""
    x = batch.float() / 255  # (N, 3, S, S)
    half = x.shape[-1] // 2
    left, right = x[..., :half].sum(dim=(1, 2, 3)), x[..., half:].sum(dim=(1, 2, 3))
    return {
        "mean_image": x.mean(0),
        "flipped": (right > left).float().mean(),  # the bright block moved right
        "dark_share": (x.sum(1) < 1e-3).float().mean(dim=(1, 2)),  # grows with |angle| (zero fill)
    }


def test_device_augmentation_matches_the_cpu_augmentation_statistically() -> None:
    torch.manual_seed(0)
    image, n, degrees = _pattern(), 600, 30.0
    cpu_tf = tensor_train_transform(degrees, hflip=True)
    cpu = torch.stack([cpu_tf(image) for _ in range(n)])  # per image, in the workers
    device = random_rotate_flip(image.float().expand(n, -1, -1, -1).contiguous(), degrees).round().clamp(0, 255)
    a, b = _statistics(cpu, image), _statistics(device, image)

    assert abs(a["flipped"] - 0.5) < 0.08 and abs(b["flipped"] - 0.5) < 0.08
    assert (a["mean_image"] - b["mean_image"]).abs().mean() < 0.02
    # the angle distribution: zero-filled corner share, its mean and spread
    assert abs(a["dark_share"].mean() - b["dark_share"].mean()) < 0.1 * a["dark_share"].mean() + 0.005
    assert abs(a["dark_share"].std() - b["dark_share"].std()) < 0.2 * a["dark_share"].std() + 0.005
    # and augmentation really happened: not every sample is the same picture
    assert b["dark_share"].std() > 0 and (device[0] != device[1]).any()


def test_device_augmentation_is_random_per_sample_and_seeded() -> None:
    batch = _pattern().float().expand(8, -1, -1, -1).contiguous()
    torch.manual_seed(1)
    first = random_rotate_flip(batch, 20.0)
    torch.manual_seed(1)
    assert torch.equal(first, random_rotate_flip(batch, 20.0))
    assert all(not torch.allclose(first[0], first[i]) for i in range(1, 8))


@pytest.mark.parametrize("angle", [-30.0, 12.5, 90.0])
@pytest.mark.parametrize("flip", [False, True])
def test_batched_rotate_flip_equals_the_cpu_rotate_then_flip(angle: float, flip: bool) -> None:
    image = _pattern(24).float()[None]  # (1, 3, 24, 24)
    cpu = T.functional.rotate(image, angle, interpolation=T.InterpolationMode.BILINEAR)
    if flip:
        cpu = T.functional.hflip(cpu)
    device = rotate_flip(image, torch.tensor([angle]), torch.tensor([flip]))
    torch.testing.assert_close(device, cpu, atol=1e-3, rtol=0)


def test_augment_on_device_moves_augmentation_out_of_the_workers(large_jpegs: Path) -> None:
    dm = ImageDataModule(large_jpegs, image_size=32, batch_size=8, num_workers=0, rotation=15.0, augment_on="device")
    dm.setup("fit")
    names = [type(t).__name__ for t in dm.train_set.transform.transforms]
    assert "RandomRotation" not in names and "RandomHorizontalFlip" not in names
    assert dm.device_transform.rotation == 15.0 and dm.device_transform.hflip
    images, _ = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8


def _twin_models(**kw) -> tuple[ImageClassifier, ImageClassifier]:
    torch.manual_seed(0)
    plain = ImageClassifier(backbone="simple_cnn", num_classes=8).eval()
    other = ImageClassifier(backbone="simple_cnn", num_classes=8, **kw).eval()
    other.load_state_dict(plain.state_dict())
    return plain, other


def test_channels_last_does_not_change_outputs() -> None:
    plain, fast = _twin_models(channels_last=True)
    assert fast.model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), atol=1e-4, rtol=1e-4)
    assert list(fast.state_dict()) == list(plain.state_dict())


@pytest.mark.slow
def test_compile_does_not_change_outputs_or_checkpoint_keys() -> None:
    plain, compiled = _twin_models(compile=True)
    traced = []  # the backbone's forward hooks run inside the compiled call: traced by torch.compile
    compiled.model.register_forward_hook(lambda module, args, out: traced.append(torch.compiler.is_compiling()))
    compiled.configure_model()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), plain(x), atol=1e-4, rtol=1e-4)
    assert traced == [True]  # really compiled, in place
    assert list(compiled.state_dict()) == list(plain.state_dict())
    restored = ImageClassifier(backbone="simple_cnn", num_classes=8).eval()
    restored.load_state_dict(compiled.state_dict())  # plain keys: loads without --compile


def test_flags_reach_the_datamodule_and_the_model(tiny_shapes: Path, tmp_path: Path) -> None:
    values = parse_train_flags(
        [
            "--data_dir",
            str(tiny_shapes),
            "--cache",
            "--cache-dir",
            str(tmp_path),
            "--compile",
            "--channels_last",
            "--augment_on",
            "device",
        ]
    )
    dm = build_datamodule(values)
    assert dm.hparams.cache and dm.source.open_cache.keywords["cache_dir"] == str(tmp_path) and dm.hparams.channels_last
    assert dm.hparams.augment_on == "device"
    model = build_model(values, dm)
    assert model.hparams.compile and model.hparams.channels_last
    defaults = parse_train_flags([])
    assert not defaults["cache"] and not defaults["compile"] and not defaults["channels_last"]


def test_persistent_workers_and_pin_memory_reach_both_loaders(tiny_shapes: Path) -> None:
    def loaders(**kw):
        dm = ImageDataModule(tiny_shapes, image_size=32, batch_size=8, num_workers=1, **kw)
        dm.setup("fit")
        return dm.train_dataloader(), dm.val_dataloader()

    # defaults: workers kept between epochs; nothing to pin for without a CUDA trainer
    for loader in loaders():
        assert loader.persistent_workers is True and loader.pin_memory is False
    # the other values reach the loaders too, so a hard-coded setting fails here
    for loader in loaders(persistent_workers=False, pin_memory=True):
        assert loader.persistent_workers is False and loader.pin_memory is True


@pytest.mark.slow
def test_pipeline_comparison_ranks_the_work_per_image(tmp_path: Path) -> None:
    # 1024 px sources: each step down saves milliseconds per image, far above the timing noise
    root = generate_shapes(tmp_path / "jpegs", image_size=1024, per_class={"train": 4}, progress=False)
    rows = compare_pipelines(
        root,
        tmp_path / "cache",
        image_size=64,
        batch_size=8,
        num_workers=2,
        batches=4,
        warmup=2,
        include=("naive", "fast", "cache"),
    )
    by_name = {row["pipeline"]: row for row in rows}
    assert list(by_name) == ["naive", "fast", "cache"] and by_name["naive"]["vs_naive"] == 1.0
    assert all(row["images_per_s"] > 0 for row in rows)
    # CPU time per image, which other load on the machine does not inflate: less work on each step down
    assert by_name["cache"]["cpu_ms_per_image"] < by_name["fast"]["cpu_ms_per_image"]
    assert by_name["fast"]["cpu_ms_per_image"] < by_name["naive"]["cpu_ms_per_image"]
    assert (tmp_path / "cache" / "train-64px.u8").is_file()


@pytest.mark.slow
def test_overhead_loops_both_train_on_the_same_batches() -> None:
    batches = make_batches(2, 4, 16, num_classes=8)
    module = ImageClassifier(backbone="simple_cnn", num_classes=8, image_size=16)
    raw_model = copy.deepcopy(module.model)
    before = copy.deepcopy(module.model.state_dict())
    trainer_rate = trainer_step_rate(module, batches, steps=3, warmup=1, logged=False)
    raw_rate = raw_step_rate(raw_model, batches, steps=3, warmup=1)
    for rate in (trainer_rate, raw_rate):
        assert rate.samples == 3 * 4 and 0 < rate.seconds < 60 and rate.cpu_seconds > 0
    # both really ran optimizer steps, from the same starting weights
    for model in (module.model, raw_model):
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_default_run_reads_logged_values_back_only_at_refreshes_and_log_steps(monkeypatch) -> None:
    """Reading a tensor back to the host is a GPU sync: none may happen on most steps. On the CPU the same
    reads go through `item()` / `__float__`, which are counted here (the optimizer's own reads of its CPU
    step counters aside)."""
    reads: list[str] = []
    for method in ("item", "__float__"):
        original = getattr(torch.Tensor, method)

        def counted(self, _original=original):
            caller = inspect.currentframe().f_back.f_code.co_filename
            if f"torch{os.sep}optim" not in caller:
                reads.append(caller)
            return _original(self)

        monkeypatch.setattr(torch.Tensor, method, counted)
    steps = 40  # log_every_n_steps and the bar's refresh: every 10
    module = ImageClassifier(backbone="simple_cnn", num_classes=8, image_size=16)
    callbacks = build_callbacks(parse_train_flags([]))
    bar = next(c for c in callbacks if isinstance(c, StepMetricsBar))
    trainer_step_rate(module, make_batches(2, 4, 16, num_classes=8), steps=steps, warmup=1, callbacks=callbacks)
    # per 10 steps: the logger's write, the bar's train/loss and data_wait, the loss guard's check
    assert 0 < len(reads) <= (steps + 1) // 10 * 5 + 5  # one read per step would be 41 or more
    shown = bar.get_metrics(bar.trainer, module)
    assert isinstance(shown["train/loss"], float) and 0 <= shown["data_wait"] <= 1
