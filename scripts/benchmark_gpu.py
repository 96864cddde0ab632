"""Is the GPU fed? Three input pipelines on two kinds of JPEG, each run through train.py on the GPU.

    python scripts/benchmark_gpu.py                      # on a CUDA machine; prints a Markdown table

Model: resnet18 at 224 px, bf16-mixed, channels_last, batch 256 (the defaults below). Data: 1024 px JPEGs
and ImageNet-like 500x375 JPEGs, generated offline from the built-in shapes. Pipelines: decoding in the
workers, `--cache` (decoded once), `--decode_on device` (nvJPEG); each with `--num_workers auto`. For each
run the table gives the share of training time spent waiting for data and the images per second, read
from train.py's own `data feed:` line, and the worker count `auto` chose. Each run is a fresh process.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from project.data import generate_shapes  # noqa: E402
from project.runtime.flags import ACCELERATORS, Parser, positive_int  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = {"workers": [], "cache": ["--cache"], "decode_on device": ["--decode_on", "device"]}


def imagenet_like(source: Path, target: Path) -> Path:
    """The 512 px shapes cut to 500x375 (ImageNet's typical landscape size), re-encoded at quality 90."""
    if (target / "done").is_file():
        return target
    for path in sorted(source.rglob("*.jpg")):
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            image.crop((6, 68, 506, 443)).save(out, quality=90)
    (target / "done").write_text("")
    return target


def datasets(root: Path, images: int) -> dict[str, Path]:
    per_class = {"train": max(1, images // 8), "val": max(1, images // 80)}
    big = generate_shapes(root / "jpeg1024", image_size=1024, per_class=per_class, progress=False)
    mid = generate_shapes(root / "jpeg512", image_size=512, per_class=per_class, progress=False)
    return {"1024 px JPEG": big, "500x375 JPEG": imagenet_like(mid, root / "jpeg500x375")}


def read_figures(output: str) -> dict[str, str]:
    """The data-wait share, img/s and chosen worker count from train.py's output ('?' where absent)."""
    wait = re.search(r"waited for data (\d+)% of the time", output)
    rate = re.search(r"per batch, ([\d,]+) img/s", output)
    workers = re.search(r"chose num_workers=(\d+)", output)
    return {
        "data wait": f"{wait.group(1)}%" if wait else "?",
        "img/s": rate.group(1) if rate else "?",
        "num_workers": workers.group(1) if workers else "?",
    }


def run(data_dir: Path, extra: list[str], args: argparse.Namespace, run_dir: Path) -> tuple[dict[str, str], str]:
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), "--data_dir", str(data_dir)]
    command += ["--default_root_dir", str(run_dir), "--accelerator", args.accelerator, "--num_workers", "auto"]
    command += ["--backbone", args.backbone, "--image_size", str(args.image_size), "--batch_size", str(args.batch_size)]
    command += ["--precision", args.precision, "--channels_last", "--max_epochs", str(args.max_epochs)]
    command += ["--limit_val_batches", "2", "--feed_monitor", *extra]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        last = [line for line in output.splitlines() if line.strip()][-1:] or ["no output"]
        return {"data wait": "-", "img/s": "-", "num_workers": "-"}, f"exit {done.returncode}: {last[0][:120]}"
    return read_figures(output), ""


def parser() -> Parser:
    p = Parser(prog="benchmark_gpu.py", description=__doc__.splitlines()[0])
    p.add_argument("--accelerator", choices=ACCELERATORS, default="gpu", help="where train.py runs")
    p.add_argument("--backbone", default="resnet18", help="train.py --backbone")
    p.add_argument("--image_size", type=positive_int, default=224, help="train.py --image_size")
    p.add_argument("--batch_size", type=positive_int, default=256, help="train.py --batch_size")
    p.add_argument("--precision", default="bf16-mixed", help="train.py --precision")
    p.add_argument("--max_epochs", type=positive_int, default=2, help="epochs per run (the first warms up)")
    p.add_argument("--images", type=positive_int, default=4096, help="training images per dataset")
    p.add_argument("--data_root", type=Path, default=Path("data/benchmark_gpu"), help="where the JPEGs go")
    p.add_argument("--pipelines", nargs="+", choices=list(PIPELINES), default=list(PIPELINES), help="which to run")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    rows = ["| data | pipeline | data wait | img/s | num_workers (auto) | note |", "|---|---|---|---|---|---|"]
    for data_name, data_dir in datasets(args.data_root, args.images).items():
        for pipeline in args.pipelines:
            run_dir = args.data_root / "runs" / f"{data_name}-{pipeline}".replace(" ", "_")
            figures, note = run(data_dir, PIPELINES[pipeline], args, run_dir)
            rows.append(
                f"| {data_name} | {pipeline} | {figures['data wait']} | {figures['img/s']} "
                f"| {figures['num_workers']} | {note} |"
            )
            print(rows[-1], flush=True)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
