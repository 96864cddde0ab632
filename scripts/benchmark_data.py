"""The data-feeding experiments: `python scripts/benchmark_data.py [--accelerator gpu --backbone resnet18 ...]`.

Loader-only img/s by num_workers, 300 px vs 1024 px sources with and without rotation, the model's
own rate, a short training run with the verdict, the naive pipeline against the fast path and the
cache, Lightning's own per-step cost, and the model-side options. Writes a table to stdout, benchmark.json and
data_feed.png to --out_dir, and TensorBoard scalars under <default_root_dir>/lightning_logs/benchmark/.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from project.cli import ACCELERATORS, PRECISIONS, Parser, UsageError, positive_int  # noqa: E402
from project.feed.benchmark import SECTIONS, BenchmarkConfig, run_benchmark  # noqa: E402
from project.feed.throughput import usable_cpus  # noqa: E402
from project.runtime.console import configure_console  # noqa: E402
from project.training import LOGS, check_accelerator, resolve_precision  # noqa: E402


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected integers >= 0, got {text!r}")
    return values


def section_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    return names


def benchmark_parser() -> Parser:
    cpus = usable_cpus()
    p = Parser(
        prog="benchmark_data.py",
        description="Measure loader, model and end-to-end img/s; say which "
        "side is the bottleneck. Defaults finish in a few minutes on 2 CPU cores.",
    )
    p.add_argument("--accelerator", choices=ACCELERATORS, default="auto", help="cpu, gpu, ... or auto")
    p.add_argument("--backbone", default="simple_cnn", help="simple_cnn, resnet18, mobilenet_v3_small, ...")
    p.add_argument("--batch_size", "--batch-size", type=positive_int, default=32, help="images per batch")
    p.add_argument("--image_size", "--image-size", type=positive_int, default=64, help="training side in pixels")
    p.add_argument(
        "--precision", choices=PRECISIONS, default="auto", help="auto: bf16-mixed on GPUs that support it, else 32-true"
    )
    p.add_argument(
        "--workers",
        type=int_list,
        default=list(range(cpus + 1)),
        help="num_workers values to sweep, comma-separated (default: 0 up to the CPU count)",
    )
    p.add_argument("--batches", type=positive_int, default=20, help="timed batches per loader measurement")
    p.add_argument("--rotation", type=float, default=15.0, help="random rotation range in degrees")
    p.add_argument(
        "--source_size",
        "--source-size",
        type=positive_int,
        default=300,
        help="source JPEG side for the sweep and the training run",
    )
    p.add_argument(
        "--source_sizes",
        "--source-sizes",
        type=int_list,
        default=[300, 1024],
        help="source JPEG sides compared per image",
    )
    p.add_argument(
        "--source_images", "--source-images", type=positive_int, default=16, help="images timed per source size"
    )
    p.add_argument(
        "--model_steps", "--model-steps", type=positive_int, default=10, help="timed forward + backward steps"
    )
    p.add_argument("--e2e_steps", "--e2e-steps", type=positive_int, default=30, help="steps of the training run")
    p.add_argument(
        "--pipeline_source_size",
        "--pipeline-source-size",
        type=positive_int,
        default=1024,
        help="pipelines section: source JPEG side",
    )
    p.add_argument(
        "--pipeline_image_size",
        "--pipeline-image-size",
        type=positive_int,
        default=224,
        help="pipelines section: training side",
    )
    p.add_argument(
        "--pipeline_workers",
        "--pipeline-workers",
        type=int,
        default=2,
        help="pipelines section: num_workers, the same for every pipeline",
    )
    p.add_argument(
        "--pipeline_batches",
        "--pipeline-batches",
        type=positive_int,
        default=10,
        help="pipelines section: timed batches per pipeline",
    )
    p.add_argument(
        "--pipeline_rounds",
        "--pipeline-rounds",
        type=positive_int,
        default=1,
        help="pipelines section: interleaved repeats, best kept (steadier on a busy machine)",
    )
    p.add_argument(
        "--overhead_steps",
        "--overhead-steps",
        type=positive_int,
        default=20,
        help="overhead section: timed training steps per loop",
    )
    p.add_argument(
        "--sections", type=section_list, default=list(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a seconds-long smoke run: tiny images, batches and sweep (figures are not meaningful)",
    )
    p.add_argument(
        "--out_dir",
        "--out-dir",
        type=Path,
        default=Path("benchmark_results"),
        help="benchmark.json, data_feed.png and the generated images go here",
    )
    p.add_argument("--chart", type=Path, default=None, help="PNG path (default: <out_dir>/data_feed.png)")
    p.add_argument(
        "--default_root_dir",
        "--default-root-dir",
        type=Path,
        default=Path("."),
        help="TensorBoard scalars go to <default_root_dir>/lightning_logs/benchmark/version_N",
    )
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = benchmark_parser()
    args = parser.parse_args(argv)
    configure_console()
    try:
        check_accelerator(args.accelerator)
    except UsageError as error:
        print(f"benchmark_data.py: error: {error}", file=sys.stderr)
        return 2
    import torch

    on_gpu = args.accelerator in ("gpu", "cuda") or (args.accelerator == "auto" and torch.cuda.is_available())
    device = "cuda" if on_gpu else "cpu"
    if args.accelerator not in ("auto", "cpu", "gpu", "cuda"):
        device = args.accelerator
    config = BenchmarkConfig(
        accelerator=device,
        backbone=args.backbone,
        batch_size=args.batch_size,
        image_size=args.image_size,
        precision=resolve_precision(args.precision, device),
        workers=args.workers,
        batches=args.batches,
        source_size=args.source_size,
        source_sizes=args.source_sizes,
        source_images=args.source_images,
        rotation=args.rotation,
        model_steps=args.model_steps,
        e2e_steps=args.e2e_steps,
        pipeline_source_size=args.pipeline_source_size,
        pipeline_image_size=args.pipeline_image_size,
        pipeline_workers=args.pipeline_workers,
        pipeline_batches=args.pipeline_batches,
        pipeline_rounds=args.pipeline_rounds,
        overhead_steps=args.overhead_steps,
        data_root=args.out_dir / "data",
        progress=args.progress,
    )
    if args.quick:
        config.batch_size, config.image_size, config.batches = 8, 32, 3
        config.workers = [n for n in config.workers if n <= 1] or [0]
        config.source_size, config.source_sizes, config.source_images = 64, [64, 256], 4
        config.model_steps, config.e2e_steps = 2, 4
        config.pipeline_source_size, config.pipeline_image_size, config.pipeline_workers = 128, 32, 1
        config.pipeline_batches, config.overhead_steps = 2, 2
    run_benchmark(config, args.sections, args.out_dir, args.default_root_dir / LOGS, chart=args.chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
