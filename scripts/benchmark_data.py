"""The data-feeding experiments: `python scripts/benchmark_data.py [--accelerator gpu --backbone resnet18 ...]`.

Loader-only img/s by num_workers, 300 px vs 1024 px sources with and without rotation, the model's
own rate, a short training run with the verdict, the naive pipeline against the fast path and the
cache, Lightning's own per-step cost, the model-side options, and what the training-recipe flags cost.
Writes a table to stdout, benchmark.json and data_feed.png to --out_dir, and TensorBoard scalars under
<default_root_dir>/lightning_logs/benchmark/.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from project.callbacks import build_callbacks  # noqa: E402
from project.feed.benchmark import SECTIONS, BenchmarkConfig, run_benchmark  # noqa: E402
from project.runtime.checkpoints import LOGS  # noqa: E402
from project.runtime.console import configure_console  # noqa: E402
from project.runtime.flags import (  # noqa: E402
    ACCELERATORS,
    PRECISIONS,
    Parser,
    UsageError,
    check_accelerator,
    positive_int,
    resolve_precision,
)
from project.training import parse_train_flags  # noqa: E402


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
    d = BenchmarkConfig()  # the defaults live there, once
    p = Parser(
        prog="benchmark_data.py",
        description="Measure loader, model and end-to-end img/s; say which "
        "side is the bottleneck. Defaults finish in a few minutes on 2 CPU cores.",
    )
    p.add_argument("--accelerator", choices=ACCELERATORS, default="auto", help="cpu, gpu, ... or auto")
    p.add_argument("--backbone", default=d.backbone, help="simple_cnn, resnet18, mobilenet_v3_small, ...")
    p.add_argument("--batch_size", "--batch-size", type=positive_int, default=d.batch_size, help="images per batch")
    p.add_argument(
        "--image_size", "--image-size", type=positive_int, default=d.image_size, help="training side in pixels"
    )
    p.add_argument(
        "--precision", choices=PRECISIONS, default="auto", help="auto: bf16-mixed on GPUs that support it, else 32-true"
    )
    p.add_argument(
        "--workers",
        type=int_list,
        default=d.workers,
        help="num_workers values to sweep, comma-separated: 0 up to the CPU count unless given",
    )
    p.add_argument("--batches", type=positive_int, default=d.batches, help="timed batches per loader measurement")
    p.add_argument("--rotation", type=float, default=d.rotation, help="random rotation range in degrees")
    p.add_argument(
        "--source_size",
        "--source-size",
        type=positive_int,
        default=d.source_size,
        help="source JPEG side for the sweep, the training run and the recipe section",
    )
    p.add_argument(
        "--source_sizes",
        "--source-sizes",
        type=int_list,
        default=d.source_sizes,
        help="source JPEG sides compared per image",
    )
    p.add_argument(
        "--source_images",
        "--source-images",
        type=positive_int,
        default=d.source_images,
        help="images timed per source size",
    )
    p.add_argument(
        "--model_steps",
        "--model-steps",
        type=positive_int,
        default=d.model_steps,
        help="timed forward + backward steps",
    )
    p.add_argument(
        "--e2e_steps", "--e2e-steps", type=positive_int, default=d.e2e_steps, help="steps of the training run"
    )
    p.add_argument(
        "--pipeline_source_size",
        "--pipeline-source-size",
        type=positive_int,
        default=d.pipeline_source_size,
        help="pipelines section: source JPEG side",
    )
    p.add_argument(
        "--pipeline_image_size",
        "--pipeline-image-size",
        type=positive_int,
        default=d.pipeline_image_size,
        help="pipelines and recipe sections: training side",
    )
    p.add_argument(
        "--pipeline_workers",
        "--pipeline-workers",
        type=int,
        default=d.pipeline_workers,
        help="pipelines and recipe sections: num_workers, the same for every pipeline",
    )
    p.add_argument(
        "--pipeline_rotation",
        "--pipeline-rotation",
        type=float,
        default=d.pipeline_rotation,
        help="pipelines and stages sections: rotation range in degrees",
    )
    p.add_argument(
        "--pipeline_batches",
        "--pipeline-batches",
        type=positive_int,
        default=d.pipeline_batches,
        help="pipelines and recipe sections: timed batches per pipeline",
    )
    p.add_argument(
        "--pipeline_rounds",
        "--pipeline-rounds",
        type=positive_int,
        default=d.pipeline_rounds,
        help="pipelines and recipe sections: interleaved repeats, best kept (steadier on a busy machine)",
    )
    p.add_argument(
        "--overhead_steps",
        "--overhead-steps",
        type=positive_int,
        default=d.overhead_steps,
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
        default=d.out_dir,
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
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d.progress, help="tqdm progress bars")
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
    # every other flag is named after a config field
    flags = {
        f.name: getattr(args, f.name) for f in fields(BenchmarkConfig) if f.name not in ("accelerator", "precision")
    }
    config = BenchmarkConfig(accelerator=device, precision=resolve_precision(args.precision, device), **flags)
    if args.quick:
        config = config.quick()
    run_benchmark(
        config,
        args.sections,
        args.default_root_dir / LOGS,
        chart=args.chart,
        # the overhead section's last loop: the callbacks of a default train.py run, its progress bar included
        run_callbacks=lambda: build_callbacks(parse_train_flags([])),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
