"""The one table of flag combinations that cannot work, checked by `ImageDataModule` when built and by train.py
before any work, with facts no flag says: `streaming` (data_dir is a streaming dataset), `url` (an s3:// or gs://
one), `own_datasets` (the DataModule brings its own datasets), `cuda` (a CUDA GPU is in use). A flag that would do
nothing for the chosen data is refused, never ignored; a row whose flags a caller does not have is skipped."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

# (flag, other flag, when they clash, what would work)
CONFLICTS: list[tuple[str, str, Callable[[Mapping[str, Any]], bool], str]] = [
    ("cache", "data_dir", lambda v: v["cache"] and v["streaming"],
     "a streaming dataset caches its chunks itself (--cache_dir, --max_cache_size): drop --cache"),
    ("sampler", "data_dir", lambda v: v["sampler"] == "balanced" and v["streaming"],
     "--sampler balanced draws images by index, a streaming dataset is read in chunks: use --sampler random"),
    ("skip_bad_images", "data_dir", lambda v: v["skip_bad_images"] and v["streaming"],
     "a streaming dataset's images were checked when it was written (optimize_data.py --skip_bad_images)"),
    ("max_cache_size", "data_dir", lambda v: v["max_cache_size"] is not None and not v["url"],
     "--max_cache_size bounds the chunks downloaded from an s3:// or gs:// URL: drop it"),
    ("decode_on", "data_dir", lambda v: v["decode_on"] == "device" and v["streaming"],
     "--decode_on device reads image files: use --decode_on cpu"),
    ("decode_on", "cache", lambda v: v["decode_on"] == "device" and v["cache"],
     "cached images are decoded already: drop one of them"),
    ("decode_on", "datamodule", lambda v: v["decode_on"] == "device" and v["own_datasets"],
     "your datasets decode their own images: use --decode_on cpu"),
    ("decode_on", "skip_bad_images", lambda v: v["decode_on"] == "device" and v["skip_bad_images"],
     "a JPEG that nvJPEG cannot decode stops the batch: find bad files with --decode_on cpu --skip_bad_images"),
    ("auto_augment", "decode_on", lambda v: v["auto_augment"] != "none" and v["decode_on"] == "device",
     "the workers see JPEG bytes only: use --decode_on cpu"),
    ("random_erase", "decode_on", lambda v: v["random_erase"] > 0 and v["decode_on"] == "device",
     "the workers see JPEG bytes only: use --decode_on cpu"),
    ("cache", "skip_bad_images", lambda v: v["cache"] and v["skip_bad_images"],
     "a stand-in would be cached under another image's label: fix or delete the files that --skip_bad_images "
     "reports, then --cache"),
    ("ema_decay", "strategy", lambda v: v["ema_decay"] > 0 and str(v["strategy"]).startswith(("fsdp", "deepspeed")),
     "Lightning's weight averaging needs the whole model in every process: use --strategy ddp"),
    ("unfreeze_at_epoch", "freeze_backbone", lambda v: v["unfreeze_at_epoch"] is not None and not v["freeze_backbone"],
     "nothing is frozen: add --freeze_backbone"),
    # last: a pair above says more about what would work
    ("decode_on", "accelerator", lambda v: v["decode_on"] == "device" and not v["cuda"],
     "JPEGs are decoded with nvJPEG on a CUDA GPU, and none is in use: use --decode_on cpu"),
]  # fmt: skip


def conflict(values: Mapping[str, Any]) -> str | None:
    """The first combination of `values` the table refuses, as one line naming both flags; None if none."""
    for flag, other, clash, advice in CONFLICTS:
        try:
            if clash(values):
                return f"--{flag} and --{other} cannot be combined: {advice}"
        except KeyError:  # a flag this caller does not have (the DataModule knows no --accelerator)
            continue
    return None
