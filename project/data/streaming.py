"""Streaming data (litdata): an image folder written once as chunks of JPEG samples, then streamed by every
training process from a local folder or object storage (s3://, gs://), so the data can outgrow one disk.

Layout that `optimize_datamodule` (scripts/optimize_data.py) writes and `ImageDataModule` reads:
OUT/train, OUT/val, OUT/test, each a litdata optimized dataset of `{"image": JPEG bytes, "label": class
index}`, and OUT/classes.json (class names, stored image size, samples per split), written last, so its
presence means every split is complete.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

# no network at run time: older litdata releases ask PyPI for a newer version on first use (minutes offline)
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
from litdata import StreamingDataLoader, StreamingDataset, optimize  # noqa: E402
from litdata.streaming.fs_provider import GCPFsProvider, S3FsProvider  # noqa: E402

from project.data.folder import BadImageError, bad_image_error, load_image  # noqa: E402

if TYPE_CHECKING:  # imported for the annotation only: the DataModule imports this module
    from project.data.datamodule import ImageDataModule

__all__ = [  # with litdata's loader and dataset: importing them from here applies the setting above
    "DecodeSample",
    "ResumableStreamingDataLoader",
    "StreamingDataLoader",
    "StreamingDataset",
    "encode_image",
    "is_streaming_source",
    "optimize_datamodule",
    "read_metadata",
    "streaming_dataset",
    "write_split",
]

METADATA = "classes.json"
SPLITS = ("train", "val", "test")
URL_SCHEMES = ("s3://", "gs://")
# litdata's advice: few requests per epoch, and only a few chunks per worker on the local disk at a time
CHUNK_BYTES = "64MB"
JPEG_QUALITY = 90  # as the built-in dataset is written: no visible loss, a quarter of PNG's bytes


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


def write_metadata(root: str, metadata: dict[str, Any]) -> None:
    text = json.dumps(metadata, indent=1)
    if not is_url(root):
        partial = join(root, METADATA + ".partial")
        with open(partial, "w") as f:
            f.write(text)
        os.replace(partial, join(root, METADATA))  # renamed into place: never half-written
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, METADATA)
        with open(local, "w") as f:
            f.write(text)
        object_store(root).upload_file(local, join(root, METADATA))


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


# ---------------------------------------------------------------------------------------------- writing
def encode_image(path: str, max_size: int) -> bytes:
    """`path` decoded (RGB, upright), its shorter side brought down to `max_size` (never up), as JPEG bytes.

    Every image is re-encoded, even one already small enough: training then decodes one kind of file
    (baseline RGB JPEG, no EXIF rotation, no alpha, no CMYK).
    """
    image = load_image(path, min_size=max_size)
    scale = max_size / min(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)  # done once: the sharpest filter is affordable
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


class EncodeSample:
    """optimize()'s function, run in its workers: `(path, label)` -> one sample, or none for an unreadable
    file when skipping them (named on stderr; the count is the gap between inputs and samples written)."""

    def __init__(self, image_size: int, skip_bad_images: bool) -> None:
        self.image_size, self.skip_bad_images = image_size, skip_bad_images

    def __call__(self, item: tuple[str, int]) -> Iterator[dict[str, Any]]:
        path, label = item
        try:
            image = encode_image(path, self.image_size)
        except Exception as error:  # decoders raise OSError, SyntaxError, ValueError, ...
            if not self.skip_bad_images:
                raise bad_image_error(path, error) from error
            print(f"skipped unreadable image {path!r} ({type(error).__name__}: {error})", file=sys.stderr)
            return
        yield {"image": image, "label": int(label)}


def count_samples(root: str) -> int:
    return sum(chunk["chunk_size"] for chunk in read_json(root, "index.json")["chunks"])


def write_split(
    samples: Sequence[tuple[str, int]],
    output_dir: str,
    image_size: int,
    num_workers: int,
    seed: int,
    skip_bad_images: bool = False,
    progress: bool = True,
) -> int:
    """One split as a litdata optimized dataset at `output_dir` (a folder or a URL); returns the samples written."""
    # litdata shuffles chunks and items within a chunk, never across: a class-sorted folder written in order
    # would give batches of one class, so the order is shuffled (seeded) once, here
    order = np.random.default_rng(seed).permutation(len(samples))
    inputs = [tuple(samples[i]) for i in order]
    # litdata's verbose mode prints setup chatter on stdout; its progress bar is on stderr and stays
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            optimize(
                fn=EncodeSample(image_size, skip_bad_images),
                inputs=inputs,
                output_dir=output_dir,
                chunk_bytes=CHUNK_BYTES,
                num_workers=max(1, num_workers),
                mode="overwrite",
                reorder_files=False,  # its default orders the inputs by file size, undoing the shuffle
                # workers share one queue of the shuffled inputs (the order written is that one, give or take which
                # worker finishes first); a failing worker then leaves no helper process behind, unlike with
                # keep_data_ordered=True
                keep_data_ordered=False,
                # the current method, which optimize() would otherwise switch to spawn for the whole process
                start_method=multiprocessing.get_start_method(),
                verbose=progress,
            )
        except RuntimeError as error:  # a worker's failure arrives as its traceback, text in a RuntimeError
            if "cannot read image " in str(error):
                raise BadImageError(str(error)) from None
            raise
    return count_samples(output_dir)


def optimize_datamodule(
    datamodule: ImageDataModule, output_dir: str, image_size: int = 256, num_workers: int = 1, progress: bool = True
) -> dict[str, Any]:
    """Write the splits an `ImageDataModule` reads from its image folder (or the built-in data) as a streaming
    source at `output_dir`: the same train/val/test rules (val split off train/ when there is no val/),
    classes, seed and bad-image handling. Returns the metadata written to classes.json.
    """
    if datamodule.streaming:
        raise ValueError(f"{datamodule.hparams.data_dir} is already a streaming dataset; give an image folder")
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("test")
    settings = datamodule.hparams
    if not is_url(output_dir) and os.path.exists(join(output_dir, METADATA)):
        os.remove(join(output_dir, METADATA))  # until every split is rewritten, the folder is not complete
    samples, skipped = {}, {}
    for split in SPLITS:
        dataset = getattr(datamodule, f"{split}_set")
        if dataset is not None:
            if progress:
                print(f"{join(output_dir, split)}: {len(dataset)} images", file=sys.stderr)
            samples[split] = write_split(
                dataset.samples,
                join(output_dir, split),
                image_size,
                num_workers,
                seed=settings.seed,
                skip_bad_images=settings.skip_bad_images,
                progress=progress,
            )
            skipped[split] = len(dataset) - samples[split]
    metadata = {"classes": list(datamodule.classes), "image_size": image_size, "samples": samples, "skipped": skipped}
    write_metadata(output_dir, metadata)
    return metadata
