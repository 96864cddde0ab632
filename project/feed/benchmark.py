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
  and with `--cache`, same workers, side by side;
- overhead: a training step under Lightning's Trainer against a raw PyTorch loop;
- model_variants: the model-only rate with channels_last, bf16 autocast and torch.compile.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, RandomSampler
from torchvision.transforms import v2
from tqdm import tqdm

from project.data.datamodule import ImageDataModule
from project.data.folder import ImageFolderDataset, load_image
from project.data.transforms import train_transform
from project.feed.lightning_overhead import lightning_overhead, model_variants
from project.feed.monitor import DataFeedMonitor
from project.feed.pipeline_comparison import compare_pipelines, make_benchmark_images, naive_dataset
from project.feed.throughput import choose_workers, measure_loader, measure_model, usable_cpus
from project.models import ImageClassifier, build_backbone

Rows = list[dict[str, Any]]


@dataclass
class BenchmarkConfig:
    """Everything the sections need; the script's flags map one-to-one onto these fields."""

    accelerator: str = "cpu"  # "cpu" or "cuda" (resolved from the flags)
    backbone: str = "simple_cnn"
    batch_size: int = 64
    image_size: int = 64
    precision: str = "32-true"
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
    pipeline_batches: int = 10
    pipeline_rounds: int = 1  # > 1: interleaved repeats, best kept (steadier on a busy machine)
    overhead_steps: int = 20
    data_root: Path = Path("benchmark_results/data")
    progress: bool = True


# ---------------------------------------------------------------------------------------------- data
def source_images(config: BenchmarkConfig, size: int, count: int) -> Path:
    """At least `count` built-in shapes images at `size` px (a class-balanced train/ folder), generated once."""
    per_class = max(2, math.ceil(count / 8))
    return make_benchmark_images(config.data_root / f"shapes{size}_{per_class}", image_size=size, per_class=per_class)


def feed_images(config: BenchmarkConfig) -> int:
    """Images for the sweep and the end-to-end run: enough for its steps (val takes 1%, one per class)."""
    return (config.e2e_steps + 2) * config.batch_size + 8


def sweep_loader(config: BenchmarkConfig, data_dir: Path, num_workers: int) -> DataLoader:
    """The template's training pipeline on `data_dir`, sampled with replacement for as many batches
    as one measurement takes, so no epoch boundary (and no worker restart) falls inside the timing."""
    dm = ImageDataModule(
        data_dir,
        image_size=config.image_size,
        batch_size=config.batch_size,
        rotation=config.rotation,
        augment_on="cpu",
        val_fraction=0.01,
    )
    dm.setup("fit")
    batches = config.batches + 1 + 2 * num_workers  # timed + warm-up (see measure_loader)
    sampler = RandomSampler(
        dm.train_set,
        replacement=True,
        num_samples=batches * config.batch_size,
        generator=torch.Generator().manual_seed(0),
    )
    return DataLoader(dm.train_set, batch_size=config.batch_size, sampler=sampler, num_workers=num_workers)


# ------------------------------------------------------------------------------------------ sections
def workers_section(config: BenchmarkConfig, results: dict[str, Rows]) -> Rows:
    """Loader-only img/s for each num_workers, nothing consuming the batches."""
    data_dir = source_images(config, config.source_size, feed_images(config))
    rows = []
    for n in sorted(config.workers):
        loader = sweep_loader(config, data_dir, n)
        rate = measure_loader(
            loader, batches=config.batches, progress=f"loader, num_workers={n}" if config.progress else False
        )
        del loader
        rows.append(
            {
                "num_workers": n,
                "loader_img_per_s": round(rate.per_s, 1),
                "batch_ms": round(1000 * config.batch_size / rate.per_s, 1),
            }
        )
    return rows


def sources_section(config: BenchmarkConfig, results: dict[str, Rows]) -> Rows:
    """Per-image cost (one process) of each source size, without rotation and with it at both sizes."""
    rows = []
    rotate = v2.RandomRotation(config.rotation, interpolation=v2.InterpolationMode.BILINEAR)
    for size in config.source_sizes:
        data_dir = source_images(config, size, config.source_images)
        folder = data_dir / "train"
        template = ImageFolderDataset(folder, decode_min_size=config.image_size)
        paths = [template.samples[i][0] for i in range(min(config.source_images, len(template)))]
        decoded = [load_image(p) for p in paths]
        pipelines: list[tuple[str, float, Callable[[int], Any]]] = [
            ("no rotation", 0.0, template.__getitem__),
            (
                "rotate at source size",
                config.rotation,
                naive_dataset(data_dir, config.image_size, config.rotation).__getitem__,
            ),
            ("rotate at training size", config.rotation, template.__getitem__),
        ]
        for name, degrees, get in pipelines:
            template.transform = train_transform(config.image_size, degrees, hflip=False)
            ms = _ms_per_item(get, len(paths))
            rows.append(
                {
                    "source_px": size,
                    "pipeline": name,
                    "rotation": degrees,
                    "ms_per_img": round(ms, 3),
                    "img_per_s": round(1000 / ms, 1),
                }
            )
        rotate_ms = _ms_per_item(lambda i, images=decoded: rotate(images[i]), len(decoded))
        rows.append(
            {
                "source_px": size,
                "pipeline": f"rotation alone at {size} px",
                "rotation": config.rotation,
                "ms_per_img": round(rotate_ms, 3),
                "img_per_s": round(1000 / rotate_ms, 1),
            }
        )
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
    ratio = loader_rates[chosen] / model_rate
    if summary.verdict == "data-bound":
        reading = f"loader-bound: the loader delivers {ratio:.2f}x what the model could take"
    elif summary.verdict == "model-bound":
        reading = f"model-bound: the loader could deliver {ratio:.2f}x what the model takes"
    else:
        reading = f"balanced: the loader delivers {ratio:.2f}x the model's rate"
    return [
        {
            "num_workers": chosen,
            "end_to_end_img_per_s": round(summary.samples_per_s, 1),
            "loader_img_per_s": loader_rates[chosen],
            "model_img_per_s": model_rate,
            "data_wait_fraction": round(summary.wait_fraction, 3),
            "verdict": reading,
            "recommended_num_workers": chosen,
            "advice": summary.advice,
        }
    ]


def pipelines_section(config: BenchmarkConfig, results: dict[str, Rows]) -> Rows:
    """Naive pipeline vs this template's fast path, on-device augmentation and --cache, same workers."""
    images = (config.pipeline_batches + 4) * config.batch_size
    data_dir = source_images(config, config.pipeline_source_size, images)
    cache_dir = config.data_root / f"cache{config.pipeline_source_size}"
    rows = compare_pipelines(
        data_dir,
        cache_dir,
        image_size=config.pipeline_image_size,
        batch_size=config.batch_size,
        num_workers=config.pipeline_workers,
        rotation=config.rotation,
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


def overhead_section(config: BenchmarkConfig, results: dict[str, Rows]) -> Rows:
    """Step time of ImageClassifier under the Trainer against a raw PyTorch loop on the same batches."""
    return lightning_overhead(
        config.backbone,
        config.image_size,
        config.batch_size,
        device=config.accelerator,
        precision=config.precision,
        steps=config.overhead_steps,
        rounds=2,
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


SECTIONS: dict[str, Callable[[BenchmarkConfig, dict[str, Rows]], Rows]] = {
    "workers": workers_section,
    "sources": sources_section,
    "model": model_section,
    "end_to_end": end_to_end_section,
    "pipelines": pipelines_section,
    "overhead": overhead_section,
    "model_variants": model_variants_section,
}


def _ms_per_item(fn: Callable[[int], Any], count: int) -> float:
    fn(0)  # the first call pays for lazy imports and allocations
    start = time.perf_counter()
    for i in range(count):
        fn(i)
    return 1000 * (time.perf_counter() - start) / count


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
    "overhead": "Lightning's own cost: step time under the Trainer vs a raw PyTorch loop",
    "model_variants": "model side: model-only img/s by option",
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
    out_dir: Path,
    logs_dir: Path,
    chart: Path | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Rows]:
    """Run `sections` in order, print a table per section, write JSON, TensorBoard scalars and the chart."""
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    results: dict[str, Rows] = {}
    for name in tqdm(sections, desc="benchmark", unit="section", disable=not config.progress):
        start = time.perf_counter()
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
