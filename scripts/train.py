"""Train an image classifier: `python scripts/train.py --accelerator gpu [--data_dir DIR] [--help]`."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from project.cli import UsageError, parse_args, train_parser  # noqa: E402
from project.training import train  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(train_parser(), argv)
    try:
        train(args)
    except UsageError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
