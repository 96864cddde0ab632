"""Export a trained checkpoint for use without this project: `torch.export` program plus a plain state_dict.

The exported program is the backbone wrapped with its preprocessing: it takes a `(B, 3, S, S)` uint8
RGB batch (S: the checkpoint's image size, already resized and centre-cropped) and returns
`(B, num_classes)` probabilities. Plain PyTorch loads it with `torch.export.load(path).module()`.
The class names and preprocessing ride along in a JSON file beside it and inside the program's
extra files. The state_dict holds the backbone's weights with the backbone's own keys, so
`torchvision.models.get_model(name, num_classes=N).load_state_dict(...)` works for torchvision backbones.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from project.runtime.checkpoints import load_classifier

METADATA_FILE = "metadata.json"  # name inside the .pt2 archive's extra files


class Preprocessed(nn.Module):
    """A backbone with its input preprocessing and softmax: uint8 images in, probabilities out."""

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255  # (B, 3, S, S) uint8 -> float in [0, 1]
        x = (x - self.mean) / self.std
        return torch.softmax(self.backbone(x), dim=1)  # (B, num_classes)


def export_paths(output: str | os.PathLike) -> dict[str, Path]:
    """The files `export` writes for the prefix `output`: `.pt2`, `.state_dict.pt` and `.json`."""
    output = Path(output)
    stem = output.with_suffix("") if output.suffix == ".pt2" else output
    return {
        "program": stem.with_name(stem.name + ".pt2"),
        "state_dict": stem.with_name(stem.name + ".state_dict.pt"),
        "metadata": stem.with_name(stem.name + ".json"),
    }


def export(checkpoint: str | os.PathLike, output: str | os.PathLike) -> dict[str, Any]:
    """Write the exported program, the backbone's state_dict and the metadata for `checkpoint`.

    Returns the written paths and the metadata (backbone, class names, image size, mean, std). A
    checkpoint that cannot be loaded safely raises `UsageError` (see `load_checkpoint_safely`).
    """
    model = load_classifier(checkpoint).eval()
    hp = model.hparams
    metadata = {
        "backbone": hp.backbone,
        "class_names": list(hp.class_names),
        "image_size": hp.image_size,
        "mean": list(hp.mean),
        "std": list(hp.std),
        "input": f"(B, 3, {hp.image_size}, {hp.image_size}) uint8 RGB, resized (shorter side) and centre-cropped",
        "output": f"(B, {hp.num_classes}) probabilities in class_names order",
    }
    wrapped = Preprocessed(model.model, hp.mean, hp.std).eval()
    # two images: a size-1 dimension would be specialized to 1 and fix the batch size
    example = torch.zeros(2, 3, hp.image_size, hp.image_size, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(wrapped, (example,), dynamic_shapes={"images": {0: batch}})

    paths = export_paths(output)
    paths["program"].parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(metadata, indent=2)
    torch.export.save(program, paths["program"], extra_files={METADATA_FILE: text})
    torch.save(model.model.state_dict(), paths["state_dict"])
    paths["metadata"].write_text(text + "\n")
    return {"paths": {k: str(v) for k, v in paths.items()}, "metadata": metadata}
