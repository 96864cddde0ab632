"""The streaming reader: litdata's dataset and loader over optimize_data.py's output (a folder, or an s3:// / gs://
URL), with one-line failures. `StreamingReader` is what the training run gives the DataModule as `open_stream`;
the layout is in `project.data.streaming`, the policy (splits, DDP, resuming) in its `StreamingSource`.
"""

from __future__ import annotations

import functools
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from litdata import StreamingDataLoader, StreamingDataset
from litdata.streaming.fs_provider import GCPFsProvider, S3FsProvider

from project.data.folder import load_image
from project.data.streaming import METADATA, is_url, join
from project.runtime.faults import SourceGoneError
from project.runtime.flags import unfinished_write


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
    if unfinished := unfinished_write(root):
        raise FileNotFoundError(unfinished)
    return read_json(root, METADATA)


class DecodeSample:
    """litdata sample -> `(image, label)`: the JPEG decoded as the folder path decodes its files (`load_image`,
    DCT-scaled to no less than `min_size`), then `transform`, the folder path's train or eval transform: a uint8
    tensor."""

    def __init__(self, transform: Callable, min_size: int | None = None) -> None:
        self.transform, self.min_size = transform, min_size

    def __call__(self, sample: dict[str, Any]) -> tuple[Any, int]:
        return self.transform(load_image(io.BytesIO(sample["image"]), self.min_size)), int(sample["label"])


class SplitDataset(StreamingDataset):
    """litdata's dataset of one split, whose failed reads end as a `SourceGoneError` naming the source.

    What litdata rides out first: a chunk missing from a local folder is waited for 2 s, a remote one 120 s
    (MAX_WAIT_TIME), asked for again after 30 s; S3 requests are retried by botocore (adaptive mode, up to
    1000 attempts; by obstore's own policy when it is installed), GCS ones by google-cloud-storage's default
    retry, on connection errors, 5xx and throttling. An expired or revoked credential (403) is retried by
    none: it ends the run, as a vanished folder does.
    """

    def __init__(self, root: str, split: str, decode: DecodeSample, **kwargs: Any) -> None:
        super().__init__(join(root, split), **kwargs)
        self.root, self.decode = root, decode  # decoded outside the read: a bad image stays a BadImageError

    def __getitem__(self, index: Any) -> Any:
        try:
            sample = super().__getitem__(index)
        except (OSError, RuntimeError) as error:  # ChunkWaitTimeoutError, or a prefetch thread's failed download
            cause = error.__cause__ or error
            reason = " ".join(f"{type(cause).__name__}: {cause}".split(". ")[0].split())
            raise SourceGoneError(
                f"streaming source {self.root} stopped answering ({reason}); check that it is mounted and readable "
                "(for a bucket: that its credentials are valid), then resume with --ckpt_path last"
            ) from error
        return self.decode(sample)


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
        return SplitDataset(
            root,
            split,
            DecodeSample(transform, min_size=image_size),
            cache_dir=cache_dir,
            max_cache_size=max_cache_size,
            seed=seed,
        )
    except Exception as error:  # a URL without index.json, unreachable storage, a bad --max_cache_size
        reason = " ".join(str(error).split())
        raise FileNotFoundError(f"cannot stream {join(root, split)}: {reason}") from None


class StreamingReader:
    """One streaming dataset's I/O: its `metadata` (classes.json), each split as a dataset, and the loaders, whose
    training loader's position checkpoints keep (`state_dict`), so a resumed run carries on mid-epoch."""

    def __init__(
        self, url: str, image_size: int, seed: int, cache_dir: str | None = None, max_cache_size: str | None = None
    ) -> None:
        self.url, self.image_size, self.seed = url, image_size, seed
        self.cache_dir, self.max_cache_size = cache_dir, max_cache_size
        self.train_loader: ResumableStreamingDataLoader | None = None  # whose position checkpoints save
        self.loader_state: dict[str, Any] | None = None  # a checkpoint's loader position, until the loader exists

    @functools.cached_property
    def metadata(self) -> dict[str, Any]:
        """`{"classes": [...], "image_size": N, "samples": {"train": n, "val": n, ...}}`, read once."""
        metadata = read_metadata(self.url)
        if self.image_size > metadata["image_size"]:
            rank_zero_warn(f"--image_size {self.image_size} upscales images stored at {metadata['image_size']} px")
        return metadata

    def dataset(self, split: str, transform: Callable) -> StreamingDataset:
        return streaming_dataset(
            self.url, split, transform, self.image_size, self.seed, self.cache_dir, self.max_cache_size
        )

    def loader(self, dataset: StreamingDataset, train: bool, **settings: Any) -> ResumableStreamingDataLoader:
        loader = ResumableStreamingDataLoader(dataset, **settings)
        if train:
            if self.loader_state is not None:
                loader.load_state_dict(self.loader_state)
                self.loader_state = None
            self.train_loader = loader
        return loader

    def state_dict(self) -> dict[str, Any]:
        return {"train_loader": self.train_loader.state_dict()} if self.train_loader is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader_state = state.get("train_loader")
