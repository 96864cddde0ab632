"""Predict with a trained checkpoint.

`python scripts/predict.py --checkpoint PATH --input DIR_OR_FILES --output preds.csv`

Writes one CSV row per image (path, label, confidence and the top-k classes); folders are walked
recursively; unreadable files are reported by name and skipped.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from project.runtime.flags import ACCELERATORS, Parser, UsageError, non_negative_int, positive_int  # noqa: E402
from project.tools.predict import predict  # noqa: E402


def parser() -> Parser:
    p = Parser(prog="predict.py", description="Label image files with a trained checkpoint; write a CSV.")
    p.add_argument("--checkpoint", type=Path, required=True, help="a .ckpt written by train.py")
    p.add_argument(
        "--input", nargs="+", type=Path, required=True, help="image files and/or folders (walked recursively)"
    )
    p.add_argument("--output", type=Path, default=Path("predictions.csv"), help="the CSV to write")
    p.add_argument("--accelerator", choices=ACCELERATORS, default="auto", help="cpu, gpu, ... or auto")
    p.add_argument("--batch_size", "--batch-size", type=positive_int, default=64, help="images per batch")
    p.add_argument(
        "--num_workers", "--num-workers", type=non_negative_int, default=2, help="DataLoader worker processes"
    )
    p.add_argument(
        "--top_k",
        "--top-k",
        type=positive_int,
        default=5,
        help="best classes listed per image (at most the number of classes)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        result = predict(
            args.checkpoint,
            args.input,
            args.output,
            accelerator=args.accelerator,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            top_k=args.top_k,
        )
    except (UsageError, FileNotFoundError) as error:
        print(f"predict.py: error: {error}", file=sys.stderr)
        return 2
    skipped = len(result["unreadable"])
    print(
        f"wrote {result['rows']} predictions to {result['output']}"
        + (f"; skipped {skipped} unreadable file(s), listed above" if skipped else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
