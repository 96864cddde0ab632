"""The data-feeding benchmark: is the loader or the model the bottleneck, and by how much?

Each experiment is a section: a function `(config, results) -> rows` that returns a list of flat
dicts of figures (`results` holds the rows of the sections run before it). `SECTIONS` lists them in
the order they run; adding an experiment is a function and one line there. `run_benchmark` runs the
chosen sections and writes every figure as JSON, TensorBoard scalars (num_workers as the step) and a
PNG chart of throughput against num_workers with the model's rate as a line.

Sections:
- workers: loader-only img/s for each num_workers (the template's pipeline, 300 px JPEGs);
- sources: per-image cost of 300 px vs 1024 px sources, without rotation, rotated at the source
  size, and rotated at the training size (as this template does);
- model: forward + backward img/s of the backbone on a ready batch on the device;
- end_to_end: a short real training run at the recommended num_workers, read by `DataFeedMonitor`;
- pipelines: 1024 px JPEGs to the normalized 224 px float batch `training_step` receives, the classic
  naive pipeline (the yardstick row) against this template's fast path, with on-device augmentation,
  and with `--cache`, same workers, side by side (`pipelines_benchmark`);
- stages: the per-image CPU cost of each stage (read, decode, rotate, resize, to-tensor, collate, copy),
  naive vs fast: where the time goes and what limits each pipeline;
- overhead: a training step under Lightning's Trainer against a raw PyTorch loop (`training_step_benchmark`);
- model_variants: the model-only rate with channels_last, bf16 autocast and torch.compile (the same);
- recipe: what the training-recipe flags cost: img/s of the DataModule's training loader at the training
  side (224 px) with each per-image augmentation (`--auto_augment`, `--random_erase`), and ms per batch of
  MixUp / CutMix on the device (`--mixup_alpha`, `--cutmix_alpha`).

Every measurement uses `project.feed.throughput` (one loader timer with one warm-up rule, one model
timer, one per-call timer, one endless loader, one worker sweep, one best-of-rounds) and every verdict
the monitor's words (`project.feed.monitor`). `BenchmarkConfig` holds the only copy of the defaults:
the script's flags read theirs from it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from project.data.datamodule import ImageDataModule
from project.data.folder import ImageFolderDataset, load_image
from project.data.transforms import train_transform
from project.feed.monitor import DataFeedMonitor, rate_reading
from project.feed.pipelines_benchmark import compare_pipelines, make_benchmark_images, naive_dataset, stage_costs
from project.feed.throughput import (
    Rate,
    best_of,
    choose_workers,
    measure_loader,
    measure_model,
    steady_loader,
    sweep_workers,
    synchronize,
    time_calls,
    torch_threads,
    usable_cpus,
)
from project.feed.training_step_benchmark import lightning_overhead, model_variants
from project.models import ImageClassifier, build_backbone

Rows = list[dict[str, Any]]
# per-image timings run at least this long: a call of a tenth of a millisecond timed a few times would
# span less than one scheduler time slice, so a single preemption could double it
MIN_TIMED_SECONDS = 0.1


@dataclass
class BenchmarkConfig:
    """Everything the sections need, with the benchmark's defaults; the script's flags map one-to-one
    onto these fields and read their defaults from here."""

    accelerator: str = "cpu"  # the resolved device type: the script resolves --accelerator auto to it
    backbone: str = "simple_cnn"
    batch_size: int = 32  # the training run's default, so the figures describe `scripts/train.py`
    image_size: int = 64
    precision: str = "32-true"  # resolved, as the accelerator: --precision auto is bf16-mixed on capable GPUs
    workers: list[int] = field(default_factory=lambda: list(range(usable_cpus() + 1)))
    batches: int = 20  # timed batches per loader measurement
    source_size: int = 300  # source JPEG side for the workers sweep and the end-to-end run
    source_sizes: list[int] = field(default_factory=lambda: [300, 1024])
    source_images: int = 16  # images timed per source size
    rotation: float = 15.0
    model_steps: int = 10
    e2e_steps: int = 30
    pipeline_source_size: int = 1024  # the pipelines section: source JPEG side ...
    pipeline_image_size: int = 224  # ... and training side
    pipeline_workers: int = 2
    pipeline_rotation: float = 30.0  # degrees, as the yardstick's RandomRotation(30)
    pipeline_batches: int = 10
    pipeline_rounds: int = 1  # > 1: interleaved repeats, best kept (steadier on a busy machine)
    overhead_steps: int = 20
    out_dir: Path = Path("benchmark_results")  # benchmark.json, the chart and (under data/) the generated images
    progress: bool = True

    @property
    def data_root(self) -> Path:
        return self.out_dir / "data"

    def quick(self) -> BenchmarkConfig:
        """A seconds-long smoke run: tiny images, batches and sweep (figures are not meaningful)."""
        return replace(
            self,
            batch_size=8,
            image_size=32,
            batches=3,
            workers=[n for n in self.workers if n <= 1] or [0],
            source_size=64,
            source_sizes=[64, 256],
            source_images=4,
            model_steps=2,
            e2e_steps=4,
            pipeline_source_size=128,
            pipeline_image_size=32,
            pipeline_workers=1,
            pipeline_batches=2,
            overhead_steps=2,
        )


# ---------------------------------------------------------------------------------------------- data
def source_images(config: BenchmarkConfig, size: int, count: int) -> Path:
    """At least `count` built-in shapes images at `size` px (a class-balanced train/ folder), generated once."""
    per_class = max(2, math.ceil(count / 8))
    return make_benchmark_images(config.data_root / f"shapes{size}_{per_class}", image_size=size, per_class=per_class)


def feed_images(config: BenchmarkConfig) -> int:
    """Images for the sweep and the end-to-end run: enough for its steps (val takes 1%, one per class)."""
    return (config.e2e_steps + 2) * config.batch_size + 8


def training_set(config: BenchmarkConfig, data_dir: Path) -> Dataset:
    """The template's training dataset on `data_dir`, augmentation in the workers (as on a CPU-only machine)."""
    dm = ImageDataModule(
        data_dir,
        image_size=config.image_size,
        batch_size=config.batch_size,
        rotation=config.rotation,
        augment_on="cpu",
        val_fraction=0.01,
    )
    dm.setup("fit")
    return dm.train_set


# ------------------------------------------------------------------------------------------ sections
def workers_section(config: BenchmarkConfig, results: dict[str, Rows]) -> Rows:
    """Loader-only img/s for each num_workers, nothing consuming the batches (every count, no early stop)."""
    dataset = training_set(config, source_images(config, config.source_size, feed_images(config)))
    rates = sweep_workers(
        lambda n: steady_loader(dataset, config.batch_size, n),
        config.workers,
        batches=config.batches,
        max_seconds=None,
        progress="loader, " if config.progress else False,
    )
    return [
        {
            "num_workers": n,
            "loader_img_per_s": round(rate, 1),
            "batch_ms": round(1000 * config.batch_size / rate, 1),
        }
        for n, rate in rates.items()
    ]


def sources_section(config: BenchmarkConfig, results: dict[str, Rows]) -> Rows:
    """Per-image cost (one process) of each source size, without rotation and with it at both sizes."""
    rows = []
    rotate = v2.RandomRotation(config.rotation, interpolation=v2.InterpolationMode.BILINEAR)

    def row(size: int, name: str, degrees: float, rate: Rate) -> dict[str, Any]:
        return {
            "source_px": size,
            "pipeline": name,
            "rotation": degrees,
            "ms_per_img": round(rate.ms_per_sample, 3),
            "img_per_s": round(rate.per_s, 1),
            "cpu_ms_per_img": round(rate.cpu_ms_per_sample, 3),  # steadier than wall time on a busy machine
        }

    for size in config.source_sizes:
        data_dir = source_images(config, size, config.source_images)
        template = ImageFolderDataset(data_dir / "train", decode_min_size=config.image_size)
        count = min(config.source_images, len(template))
        decoded = [load_image(template.samples[i][0]) for i in range(count)]
        pipelines: list[tuple[str, float, Callable[[int], Any]]] = [
            ("no rotation", 0.0, template.__getitem__),
            (
                "rotate at source size",
                config.rotation,
                # bilinear as the template's own rotation: the row isolates where the rotation happens
                naive_dataset(data_dir, config.image_size, config.rotation, bilinear=True).__getitem__,
            ),
            ("rotate at training size", config.rotation, template.__getitem__),
        ]
        for name, degrees, get in pipelines:
            template.transform = train_transform(config.image_size, degrees, hflip=False)
            rows.append(row(size, name, degrees, time_calls(get, count, MIN_TIMED_SECONDS)))
        rate = time_calls(lambda i, images=decoded: rotate(images[i]), count, MIN_TIMED_SECONDS)
        rows.append(row(size, f"rotation alone at {size} px", config.rotation, rate))
    return rows


def model_section(config: BenchmarkConfig, results: dict[str, Rows]) -> Rows:
    """Forward + backward img/s of the backbone on a ready batch already on the device."""
    model = build_backbone(config.backbone, num_classes=8)
    rate = measure_model(
        model,
        config.batch_size,
        config.image_size,
        config.accelerator,
        config.precision,
        steps=config.model_steps,
        num_classes=8,
    )
    return [
        {
            "backbone": config.backbone,
            "device": config.accelerator,
            "precision": config.precision,
            "batch_size": config.batch_size,
            "image_size": config.image_size,
            "torch_threads": torch.get_num_threads(),
            "model_img_per_s": round(rate.per_s, 1),
        }
    ]


def end_to_end_section(config: BenchmarkConfig, results: dict[str, Rows]) -> Rows:
    """A short real training run at the recommended num_workers; the verdict and by how much."""
    workers = results.get("workers") or workers_section(config, results)
    model_rows = results.get("model") or model_section(config, results)
    loader_rates = {row["num_workers"]: row["loader_img_per_s"] for row in workers}
    model_rate = model_rows[0]["model_img_per_s"]
    chosen = choose_workers(loader_rates, model_rate)

    data_dir = source_images(config, config.source_size, feed_images(config))
    dm = ImageDataModule(
        data_dir,
        image_size=config.image_size,
        batch_size=config.batch_size,
        num_workers=chosen,
        rotation=config.rotation,
        augment_on="cpu",
        val_fraction=0.01,
        drop_last=True,
    )
    monitor = DataFeedMonitor(verbose=False)
    trainer = L.Trainer(
        accelerator=config.accelerator,
        devices=1,
        precision=config.precision,
        max_epochs=1,
        limit_train_batches=config.e2e_steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=config.progress,
        callbacks=[monitor],
    )
    trainer.fit(ImageClassifier(config.backbone, num_classes=8, image_size=config.image_size), datamodule=dm)
    summary = monitor.summary
    return [
        {
            "num_workers": chosen,
            "end_to_end_img_per_s": round(summary.samples_per_s, 1),
            "loader_img_per_s": loader_rates[chosen],
            "model_img_per_s": model_rate,
            "data_wait_fraction": round(summary.wait_fraction, 3),
            "verdict": rate_reading(summary.verdict, loader_rates[chosen], model_rate),
            "recommended_num_workers": chosen,
            "advice": summary.advice,
        }
    ]


def pipeline_images(config: BenchmarkConfig) -> Path:
    """The pipelines' and stages' JPEGs: enough for the warm-up and the timed batches of every pipeline."""
    return source_images(config, config.pipeline_source_size, (config.pipeline_batches + 4) * config.batch_size)


def pipelines_section(config: BenchmarkConfig, results: dict[str, Rows]) -> Rows:
    """Naive pipeline vs this template's fast path, on-device augmentation and --cache, same workers."""
    data_dir = pipeline_images(config)
    cache_dir = config.data_root / f"cache{config.pipeline_source_size}"
    rows = compare_pipelines(
        data_dir,
        cache_dir,
        image_size=config.pipeline_image_size,
        batch_size=config.batch_size,
        num_workers=config.pipeline_workers,
        rotation=config.pipeline_rotation,
        batches=config.pipeline_batches,
        rounds=config.pipeline_rounds,
    )
    return [
        {
            "source_px": config.pipeline_source_size,
            "image_size": config.pipeline_image_size,
            "num_workers": config.pipeline_workers,
            **row,
        }
        for row in rows
    ]


def stages_section(config: BenchmarkConfig, results: dict[str, Rows]) -> Rows:
    """Where the pipelines' time goes: per-image CPU ms of each stage, naive vs fast, one process."""
    data_dir = pipeline_images(config)
    images = max(4, min(16, config.source_images))
    return stage_costs(data_dir, config.pipeline_image_size, config.pipeline_rotation, images, config.batch_size)


def overhead_section(
    config: BenchmarkConfig, results: dict[str, Rows], run_callbacks: Callable[[], list[L.Callback]] | None = None
) -> Rows:
    """Step time of ImageClassifier under the Trainer against a raw PyTorch loop on the same batches, and
    with a training run's callbacks when `run_callbacks` makes them."""
    return lightning_overhead(
        config.backbone,
        config.image_size,
        config.batch_size,
        device=config.accelerator,
        precision=config.precision,
        steps=config.overhead_steps,
        rounds=2,
        run_callbacks=run_callbacks,
    )


def model_variants_section(config: BenchmarkConfig, results: dict[str, Rows]) -> Rows:
    """Model-only img/s with each model-side option: --channels_last, bf16 autocast, --compile."""
    include = ["eager", "channels_last", "bf16"]
    if config.accelerator != "cpu":  # compiling on a CPU takes longer than the rest of the benchmark
        include.append("compile")
    return model_variants(
        config.backbone,
        config.image_size,
        config.batch_size,
        device=config.accelerator,
        steps=config.model_steps,
        include=include,
    )


# the recipe section's settings: torchvision's reference alphas; a quarter of the images erased, so the row
# shows the cost of a typical probability (it grows with it: an image left alone costs nothing)
PER_IMAGE_RECIPES = {
    "none": {},
    "ta_wide": {"auto_augment": "ta_wide"},
    "ra": {"auto_augment": "ra"},
    "augmix": {"auto_augment": "augmix"},
    "random_erase 0.25": {"random_erase": 0.25},
}
BATCH_RECIPES = {"mixup 0.2": {"mixup_alpha": 0.2}, "cutmix 1.0": {"cutmix_alpha": 1.0}}


def recipe_section(config: BenchmarkConfig, results: dict[str, Rows]) -> Rows:
    """What each training-recipe flag costs, with the DataModule's own transforms.

    Per image (`--auto_augment`, `--random_erase`): img/s of the training dataset through the steady loader,
    `pipeline_workers` workers, 300 px (`source_size`) JPEGs to `pipeline_image_size` with the default rotation
    and flip, nothing consuming the batches; `pipeline_rounds` interleaved rounds, the best kept. Per batch
    (`--mixup_alpha`, `--cutmix_alpha`): ms of the DataModule's mixer on a normalized float batch already on
    the device, as `on_after_batch_transfer` calls it.
    """
    size, workers = config.pipeline_image_size, config.pipeline_workers
    data_dir = source_images(config, config.source_size, 2 * config.batch_size)

    def datamodule(**recipe: Any) -> ImageDataModule:
        dm = ImageDataModule(
            data_dir,
            image_size=size,
            batch_size=config.batch_size,
            rotation=config.rotation,
            augment_on="cpu",  # where these flags' work runs whatever the accelerator: the workers
            val_fraction=0.01,
            **recipe,
        )
        dm.setup("fit")
        return dm

    def measure(recipe: dict[str, Any]) -> Callable[[], Rate]:
        loader = steady_loader(datamodule(**recipe).train_set, config.batch_size, workers)
        return lambda: measure_loader(loader, batches=config.pipeline_batches)

    # the main process only receives batches here: the cores the workers leave, at least one thread
    with torch_threads(usable_cpus() - workers):
        best = best_of(config.pipeline_rounds, {name: measure(r) for name, r in PER_IMAGE_RECIPES.items()})
    base = best["none"].per_s
    rows = [
        {
            "augmentation": name,
            "runs_on": "loader workers",
            "num_workers": workers,
            "image_size": size,
            "img_per_s": round(rate.per_s, 1),
            "vs_none": round(rate.per_s / base, 2),
            "ms_per_batch": round(1000 * config.batch_size / rate.per_s, 1),
            "cpu_ms_per_img": round(rate.cpu_ms_per_sample, 2),  # steadier than wall time on a busy machine
        }
        for name, rate in best.items()
    ]

    device = torch.device(config.accelerator)
    images = torch.randn(config.batch_size, 3, size, size, device=device)  # (B, 3, S, S): normalized floats

    def time_mix(recipe: dict[str, Any]) -> Callable[[], Rate]:
        dm = datamodule(**recipe)
        labels = torch.randint(0, len(dm.classes), (config.batch_size,), device=device)

        def call(_: int) -> None:
            dm.mix(images, labels)
            synchronize(device)  # the batch is mixed when the call returns, not merely queued

        return lambda: time_calls(call, 4, MIN_TIMED_SECONDS)

    best = best_of(config.pipeline_rounds, {name: time_mix(r) for name, r in BATCH_RECIPES.items()})
    rows += [
        {
            "augmentation": name,
            "runs_on": f"device ({config.accelerator})",
            "image_size": size,
            "img_per_s": round(config.batch_size * rate.per_s, 1),
            "ms_per_batch": round(rate.ms_per_sample, 2),  # a call is one batch
        }
        for name, rate in best.items()
    ]
    return rows


SECTIONS: dict[str, Callable[[BenchmarkConfig, dict[str, Rows]], Rows]] = {
    "workers": workers_section,
    "sources": sources_section,
    "model": model_section,
    "end_to_end": end_to_end_section,
    "pipelines": pipelines_section,
    "stages": stages_section,
    "overhead": overhead_section,
    "model_variants": model_variants_section,
    "recipe": recipe_section,
}


# ------------------------------------------------------------------------------------------- outputs
def format_table(rows: Rows) -> str:
    """Rows of dicts as a plain, aligned text table."""
    if not rows:
        return "(no rows)"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


TITLES = {
    "workers": "loader only: img/s by num_workers",
    "sources": "source size x rotation: ms and img/s per image, one process",
    "model": "model only: forward + backward img/s on a ready batch",
    "end_to_end": "end to end: training img/s at the recommended num_workers",
    "pipelines": "pipelines: files on disk to the normalized float batch, img/s (naive = the yardstick)",
    "stages": "where the pipelines' time goes: CPU ms per image and stage, one process",
    "overhead": "Lightning's own cost: step time under the Trainer vs a raw PyTorch loop",
    "model_variants": "model side: model-only img/s by option",
    "recipe": "training recipe: loader img/s with each per-image augmentation, ms per batch of MixUp / CutMix",
}


def write_tensorboard(results: dict[str, Rows], logs_dir: Path) -> Path:
    """Scalars with num_workers as the step, under `logs_dir/benchmark/version_N`."""
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(save_dir=str(logs_dir), name="benchmark", default_hp_metric=False)
    model = results.get("model", [{}])[0].get("model_img_per_s")
    for row in results.get("workers", []):
        metrics = {"feed/loader_img_per_s": row["loader_img_per_s"]}
        if model is not None:
            metrics["feed/model_img_per_s"] = model
        logger.log_metrics(metrics, step=row["num_workers"])
    for row in results.get("end_to_end", []):
        logger.log_metrics(
            {
                "feed/end_to_end_img_per_s": row["end_to_end_img_per_s"],
                "feed/data_wait_fraction": row["data_wait_fraction"],
            },
            step=row["num_workers"],
        )
    for row in results.get("sources", []):
        name = row["pipeline"].replace(" ", "_")
        logger.log_metrics({f"feed/source_ms_per_img/{name}": row["ms_per_img"]}, step=row["source_px"])
    logger.finalize("success")
    return Path(logger.log_dir)


def write_chart(results: dict[str, Rows], path: Path, title: str = "") -> Path:
    """PNG: loader img/s against num_workers, the model's rate as a line, the end-to-end rate as a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workers = results.get("workers", [])
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=90)
    ax.plot([r["num_workers"] for r in workers], [r["loader_img_per_s"] for r in workers], "o-", label="loader only")
    if results.get("model"):
        ax.axhline(results["model"][0]["model_img_per_s"], color="tab:red", linestyle="--", label="model only")
    for row in results.get("end_to_end", []):
        ax.plot(
            [row["num_workers"]],
            [row["end_to_end_img_per_s"]],
            "s",
            color="tab:green",
            markersize=8,
            label="end to end (training)",
        )
    ax.set_xlabel("num_workers")
    ax.set_ylabel("img/s")
    ax.set_ylim(bottom=0)
    if workers:
        ax.set_xticks([r["num_workers"] for r in workers])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def run_benchmark(
    config: BenchmarkConfig,
    sections: list[str],
    logs_dir: Path,
    chart: Path | None = None,
    echo: Callable[[str], None] = print,
    run_callbacks: Callable[[], list[L.Callback]] | None = None,
) -> dict[str, Rows]:
    """Run `sections` in order, print a table per section, write JSON (to `config.out_dir`), TensorBoard
    scalars (under `logs_dir`) and the chart (default: `config.out_dir/data_feed.png`). `run_callbacks`
    makes a training run's callbacks, for the overhead section's last loop."""
    out_dir = config.out_dir
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    results: dict[str, Rows] = {}
    for name in tqdm(sections, desc="benchmark", unit="section", disable=not config.progress):
        start = time.perf_counter()
        if name == "overhead":
            results[name] = overhead_section(config, results, run_callbacks)
        else:
            results[name] = SECTIONS[name](config, results)
        echo(f"\n{TITLES.get(name, name)}  ({time.perf_counter() - start:.1f} s)\n{format_table(results[name])}")
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "benchmark.json"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    json_path.write_text(json.dumps({"config": settings, "cpus": usable_cpus(), "results": results}, indent=1))
    tb_dir = write_tensorboard(results, logs_dir)
    chart = chart or out_dir / "data_feed.png"
    title = (
        f"{config.backbone}, {config.image_size} px, batch {config.batch_size}, {config.accelerator}, "
        f"{usable_cpus()} CPUs"
    )
    if results.get("workers"):
        write_chart(results, chart, title)
        echo(f"\nchart: {chart}")
    echo(f"figures: {json_path}\nTensorBoard: {tb_dir}")
    return results
