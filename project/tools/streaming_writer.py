"""The streaming writer: an image folder (or the built-in data) written once as a litdata dataset that
`ImageDataModule` streams (`project.data.streaming` reads it; scripts/optimize_data.py runs this).
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from litdata import optimize
from PIL import Image

from project.data import ImageDataModule
from project.data.folder import BadImageError, load_image
from project.data.streaming import METADATA, SPLITS, is_url, join, object_store, read_json

# litdata's advice: few requests per epoch, and only a few chunks per worker on the local disk at a time
CHUNK_BYTES = "64MB"
JPEG_QUALITY = 90  # as the built-in dataset is written: no visible loss, a quarter of PNG's bytes


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
        except BadImageError as error:
            if not self.skip_bad_images:
                raise
            print(f"skipped {error.summary}", file=sys.stderr)
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
    if datamodule.source.stores_decoded:
        raise ValueError(
            f"--data_dir {datamodule.hparams.data_dir}: give an image folder, not a {datamodule.source.name}"
        )
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
