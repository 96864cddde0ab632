"""Write an image folder as a streaming dataset (litdata), once, for training past one disk.

`python scripts/optimize_data.py --data_dir DIR --output_dir OUT [--image_size 256] [--num_workers N]`

Reads DIR as training does (train/, val/ or a val split off train/, test/; the built-in shapes dataset
when --data_dir is omitted) and writes OUT/train, OUT/val, OUT/test and OUT/classes.json. OUT is a folder
or an object-storage URL (s3://bucket/prefix with AWS credentials as boto3 finds them, gs://bucket/prefix
with Google's); then `python scripts/train.py --data_dir OUT` streams from it.

Killed, or stopped by a full disk, the same command run again completes OUT: the splits already written are
kept. A local OUT's size is estimated first, and a disk without room for it refused before anything is written.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from project.data import ImageDataModule  # noqa: E402
from project.data.folder import BadImageError  # noqa: E402
from project.runtime.bad_images import skip_bad_images  # noqa: E402
from project.runtime.checkpoints import DISK_FULL  # noqa: E402
from project.runtime.faults import named_line  # noqa: E402
from project.runtime.flags import Parser, UsageError, positive_int  # noqa: E402
from project.tools.streaming_writer import CHUNK_BYTES, IMAGE_SIZE, optimize_datamodule  # noqa: E402

UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3}  # as litdata counts them: 1 KB = 1000 bytes


def byte_count(text: str) -> int:
    """`64MB`, `512KB` or a plain number of bytes."""
    found = re.fullmatch(r"(\d+)\s*([kmg]?)b?", text.strip().lower())
    if found is None or int(found[1]) < 1:
        raise ValueError(text)
    return int(found[1]) * UNITS[found[2]]


def parser() -> Parser:
    p = Parser(prog="optimize_data.py", description="Write an image folder as a streaming (litdata) dataset.")
    p.add_argument("--data_dir", "--data-dir", help="image folder as train.py reads it; omitted: the built-in data")
    p.add_argument(
        "--output_dir", "--output-dir", required=True, help="folder, s3://bucket/prefix or gs://bucket/prefix"
    )
    p.add_argument(
        "--image_size",
        "--image-size",
        type=positive_int,
        default=IMAGE_SIZE,
        help="images are stored with their shorter side at most this many pixels (never upscaled)",
    )
    p.add_argument(
        "--num_workers",
        "--num-workers",
        type=positive_int,
        default=max(1, (os.cpu_count() or 1) - 1),
        help="processes that decode, resize and encode",
    )
    p.add_argument(
        "--chunk_bytes",
        "--chunk-bytes",
        type=byte_count,
        default=CHUNK_BYTES,
        help="bytes per chunk file (e.g. 64MB, 512KB): the unit a training process downloads and caches",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the validation split and the stored order")
    p.add_argument(
        "--skip_bad_images",
        "--skip-bad-images",
        action="store_true",
        help="leave out unreadable images (named and counted) instead of stopping with an error naming the file",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        print(f"optimize_data.py: error: argument --data_dir: no such folder {args.data_dir!r}", file=sys.stderr)
        return 2
    datamodule = ImageDataModule(
        args.data_dir, seed=args.seed, skip_bad_images=args.skip_bad_images, bad_image_skipper=skip_bad_images
    )
    try:
        written = optimize_datamodule(
            datamodule, args.output_dir, args.image_size, args.num_workers, chunk_bytes=args.chunk_bytes
        )
    except (UsageError, FileNotFoundError, ValueError) as error:
        print(f"optimize_data.py: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in DISK_FULL:
            raise
        where = f" ({error.filename})" if error.filename else ""  # litdata's own writes name their file
        print(f"optimize_data.py: error: {error.strerror}{where}", file=sys.stderr)
        return 1
    except BadImageError as error:
        print(f"optimize_data.py: error: {named_line(error)}", file=sys.stderr)
        return 1
    sizes = ", ".join(f"{split} {n}" for split, n in written["samples"].items())
    skipped = sum(written["skipped"].values())
    print(
        f"wrote {sizes} images in {len(written['classes'])} classes to {args.output_dir}"
        + (f"; skipped {skipped} unreadable image(s), named above" if skipped else "")
    )
    print(f"train from it with: python scripts/train.py --data_dir {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
