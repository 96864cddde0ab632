"""Streaming data (litdata): an image folder written once as chunks of JPEG samples (scripts/optimize_data.py),
streamed by every training process from a folder or object storage (s3://, gs://): data past one disk.

Layout: OUT/train, OUT/val, OUT/test, each a litdata dataset of `{"image": JPEG bytes, "label": class index}`;
OUT/classes.json (class names, stored image size, samples per split), written last, so its presence means every
split is complete; OUT/optimize_data.json, written first, holds the command that writes it, so a half-written OUT
is refused with the command that completes it. Written by `project.tools.streaming_writer`, read by
`project.tools.streaming_reader`.
"""

from __future__ import annotations

import os

METADATA = "classes.json"
RECORD = "optimize_data.json"
SPLITS = ("train", "val", "test")
URL_SCHEMES = ("s3://", "gs://")


def is_url(path: str) -> bool:
    return str(path).startswith(URL_SCHEMES)


def join(root: str, *parts: str) -> str:
    """A path below a folder or an object-storage URL."""
    return "/".join([str(root).rstrip("/"), *parts]) if is_url(root) else os.path.join(root, *parts)


def is_streaming_source(data_dir: str) -> bool:
    """Whether `data_dir` is optimize_data.py output: a URL, or a folder with classes.json, optimize_data.json or
    train/index.json (without classes.json: an unfinished write, refused by `runtime.flags.unfinished_write`)."""
    found = ([METADATA], [RECORD], ["train", "index.json"])
    return is_url(data_dir) or any(os.path.isfile(join(data_dir, *p)) for p in found)
