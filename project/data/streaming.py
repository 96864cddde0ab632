"""Streaming data (litdata): an image folder written once as chunks of JPEG samples (scripts/optimize_data.py),
then streamed by every training process from a local folder or object storage (s3://, gs://), so the data can
outgrow one disk.

Layout: OUT/train, OUT/val, OUT/test, each a litdata optimized dataset of `{"image": JPEG bytes, "label": class
index}`, and OUT/classes.json (class names, stored image size, samples per split), written last, so its
presence means every split is complete. The writer is `project.tools.streaming_writer`.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from litdata import StreamingDataLoader, StreamingDataset
from litdata.streaming.fs_provider import GCPFsProvider, S3FsProvider

from project.data.folder import load_image

METADATA = "classes.json"
SPLITS = ("train", "val", "test")
URL_SCHEMES = ("s3://", "gs://")


def is_url(path: str) -> bool:
    return str(path).startswith(URL_SCHEMES)


def join(root: str, *parts: str) -> str:
    """A path below a folder or an object-storage URL."""
    return "/".join([str(root).rstrip("/"), *parts]) if is_url(root) else os.path.join(root, *parts)


def is_streaming_source(data_dir: str) -> bool:
    """Whether `data_dir` is optimize_data.py output: a URL, or a folder with classes.json or train/index.json
    (the latter alone: an unfinished write, which `read_metadata` then reports)."""
    return is_url(data_dir) or any(os.path.isfile(join(data_dir, *p)) for p in ([METADATA], ["train", "index.json"]))


def object_store(url: str) -> S3FsProvider | GCPFsProvider:
    """litdata's client for the URL's storage; credentials come from the usual places (AWS_*, gcloud)."""
    return S3FsProvider() if url.startswith("s3://") else GCPFsProvider()


def read_json(root: str, *parts: str) -> Any:
    """A JSON file below a folder or a URL; any failure is one line naming the file."""
    path = join(root, *parts)
    try:
        if not is_url(root):
            with open(path) as f:
                return json.load(f)
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, parts[-1])
            object_store(root).download_file(path, local)
            with open(local) as f:
                return json.load(f)
    except Exception as error:  # storage clients raise their own types (botocore, google.api_core)
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        raise FileNotFoundError(
            f"cannot read {path} ({reason}); --data_dir takes a folder or s3:// / gs:// URL written by "
            "scripts/optimize_data.py --output_dir (run it again if it was interrupted)"
        ) from None


def read_metadata(root: str) -> dict[str, Any]:
    """OUT/classes.json: `{"classes": [...], "image_size": N, "samples": {"train": n, "val": n, ...}}`."""
    return read_json(root, METADATA)


# ---------------------------------------------------------------------------------------------- reading
class DecodeSample:
    """litdata sample -> `(image, label)`: the JPEG decoded as the folder path decodes its files (`load_image`,
    DCT-scaled to no less than `min_size`), then `transform`, the folder path's train or eval transform: a uint8
    tensor."""

    def __init__(self, transform: Callable, min_size: int | None = None) -> None:
        self.transform, self.min_size = transform, min_size

    def __call__(self, sample: dict[str, Any]) -> tuple[Any, int]:
        return self.transform(load_image(io.BytesIO(sample["image"]), self.min_size)), int(sample["label"])


class ResumableStreamingDataLoader(StreamingDataLoader):
    """litdata's loader, with a loaded position (`load_state_dict`) that applies to the next epoch only.

    litdata drops a loaded position only once an epoch is iterated to its very end; Lightning stops asking
    as soon as it has the epoch's batch count, so every later epoch would replay the resumed one's end:
    no batches at all, and no validation.
    """

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            self.restore = False  # read when the iteration starts, before this first batch: used by now
            yield batch


def streaming_dataset(
    root: str,
    split: str,
    transform: Callable,
    image_size: int,
    seed: int,
    cache_dir: str | None = None,
    max_cache_size: str | None = None,
) -> StreamingDataset:
    """One split of a streaming source; shuffle and drop_last are the loader's to set (`StreamingDataLoader`).

    Build it where the processes are already started (`setup`): it reads the world size then, to give
    each process its share.
    """
    if not is_url(root) and not os.path.isfile(join(root, split, "index.json")):
        raise FileNotFoundError(
            f"no index.json in {join(root, split)}: not a finished optimize_data.py output; write it again"
        )
    try:
        return StreamingDataset(
            join(root, split),
            cache_dir=cache_dir,
            max_cache_size=max_cache_size,
            seed=seed,
            transform=DecodeSample(transform, min_size=image_size),
        )
    except Exception as error:  # a URL without index.json, unreachable storage, a bad --max_cache_size
        reason = " ".join(str(error).split())
        raise FileNotFoundError(f"cannot stream {join(root, split)}: {reason}") from None
