"""Export a trained checkpoint: `python scripts/export.py --checkpoint PATH --output exported/model`.

Writes `model.pt2` (torch.export program: uint8 images -> probabilities, preprocessing included),
`model.state_dict.pt` (the backbone's weights) and `model.json` (class names, image size, mean, std).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from project.runtime.flags import Parser, UsageError  # noqa: E402
from project.tools.export import export  # noqa: E402


def parser() -> Parser:
    p = Parser(prog="export.py", description="Export a checkpoint for plain PyTorch (torch.export + state_dict).")
    p.add_argument("--checkpoint", type=Path, required=True, help="a .ckpt written by train.py")
    p.add_argument(
        "--output",
        type=Path,
        default=Path("exported/model"),
        help="path prefix: writes <output>.pt2, <output>.state_dict.pt and <output>.json",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        result = export(args.checkpoint, args.output)
    except UsageError as error:
        print(f"export.py: error: {error}", file=sys.stderr)
        return 2
    for kind, path in result["paths"].items():
        print(f"{kind:<10} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
