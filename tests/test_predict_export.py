"""Using a trained model: checkpoints load on their own, prediction to CSV, and export for plain PyTorch."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from project.data import ImageDataModule
from project.data.folder import load_image
from project.data.transforms import DeviceTransform, eval_transform
from project.models import ImageClassifier
from project.tools.export import export, export_paths
from project.tools.predict import csv_header, predict
from tests.conftest import load_script

# preprocessing that differs from the data's and from the defaults, so using the wrong one shows
IMAGE_SIZE, MEAN, STD = 24, (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)


@pytest.fixture(scope="module")
def checkpoint(tiny_shapes, tmp_path_factory) -> Path:
    """A checkpoint after a few training steps, saved by the Trainer."""
    L.seed_everything(0, verbose=False)
    dm = ImageDataModule(data_dir=tiny_shapes, image_size=IMAGE_SIZE, batch_size=16, num_workers=0, mean=MEAN, std=STD)
    model = ImageClassifier(num_classes=len(dm.classes), class_names=dm.classes, lr=0.01, **dm.preprocessing)
    trainer = L.Trainer(
        max_steps=4,
        limit_val_batches=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


def reference_probabilities(checkpoint: Path, paths: list[str]) -> torch.Tensor:
    """The checkpoint's class probabilities for `paths`, computed directly: decode, resize and crop,
    normalize, forward, softmax."""
    model = ImageClassifier.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    hp = model.hparams
    transform = eval_transform(hp.image_size)
    images = torch.stack([transform(load_image(p)) for p in paths])  # (N, 3, S, S) uint8
    with torch.no_grad():
        return torch.softmax(model(DeviceTransform(hp.mean, hp.std)(images, augment=False)), dim=1)


def test_checkpoint_loads_without_arguments(checkpoint):
    model = ImageClassifier.load_from_checkpoint(checkpoint)
    assert model.hparams.image_size == IMAGE_SIZE and list(model.hparams.mean) == pytest.approx(MEAN)
    assert model.class_names == sorted(model.class_names) and "circle" in model.class_names
    raw = torch.load(checkpoint, weights_only=True)  # primitives only: no pickled classes
    assert raw["hyper_parameters"]["class_names"] == model.class_names
    state = model.state_dict()
    assert set(raw["state_dict"]) == set(state)
    assert all(torch.equal(raw["state_dict"][k], state[k]) for k in state)


@pytest.fixture
def images(tiny_shapes, tmp_path) -> tuple[Path, list[str], Path]:
    """A folder of test images, some in a nested folder, plus an unreadable file and a non-image."""
    root = tmp_path / "inputs"
    sources = sorted((tiny_shapes / "test").rglob("*.jpg"))[::9][:7]
    paths = []
    for i, source in enumerate(sources):
        target = root / ("nested/deeper" if i % 2 else "") / f"{i}_{source.parent.name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(source).save(target)
        paths.append(str(target))
    bad = root / "nested" / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    (root / "notes.txt").write_text("not an image")
    return root, paths, bad


def test_predict_writes_the_checkpoints_predictions(checkpoint, images, tmp_path, capsys):
    root, paths, bad = images
    output = tmp_path / "out" / "preds.csv"
    result = predict(checkpoint, [root], output, accelerator="cpu", batch_size=3, num_workers=0, top_k=3)

    assert result["unreadable"] == [str(bad)]
    err = capsys.readouterr().err
    assert str(bad) in err and "unreadable" in err  # reported by name; the run went on

    with output.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == csv_header(3)
    assert sorted(r["path"] for r in rows) == sorted(paths) and result["rows"] == len(paths)

    names = ImageClassifier.load_from_checkpoint(checkpoint).class_names
    probabilities = reference_probabilities(checkpoint, [r["path"] for r in rows])
    for row, probs in zip(rows, probabilities, strict=True):
        top = probs.topk(3)
        assert row["label"] == row["top1_label"] == names[int(top.indices[0])], row["path"]
        assert float(row["confidence"]) == pytest.approx(float(top.values[0]), abs=1e-5)
        for k in range(3):
            assert row[f"top{k + 1}_label"] == names[int(top.indices[k])]
            assert float(row[f"top{k + 1}_confidence"]) == pytest.approx(float(top.values[k]), abs=1e-5)


def test_predict_script(checkpoint, images, tmp_path, capsys):
    root, paths, bad = images
    script = load_script("predict")
    output = tmp_path / "preds.csv"
    code = script.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--input",
            paths[0],
            str(Path(paths[1]).parent),
            "--output",
            str(output),
            "--accelerator",
            "cpu",
            "--num_workers",
            "0",
            "--top_k",
            "50",
        ]
    )
    assert code == 0
    with output.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["path"] for r in rows} == {paths[0]} | {p for p in paths if Path(p).parent == Path(paths[1]).parent}
    names = ImageClassifier.load_from_checkpoint(checkpoint).class_names
    assert f"top{len(names)}_label" in rows[0] and f"top{len(names) + 1}_label" not in rows[0]  # k capped
    capsys.readouterr()
    assert script.main(["--checkpoint", str(tmp_path / "nope.ckpt"), "--input", str(root)]) == 2
    assert script.main(["--checkpoint", str(checkpoint), "--input", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "nope.ckpt" in err[0] and "missing" in err[1]


@pytest.mark.slow  # a fresh interpreter has to import torch
def test_export_matches_the_checkpoint_without_the_project(checkpoint, images, tmp_path):
    _, paths, _ = images
    result = export(checkpoint, tmp_path / "exported" / "model")
    files = export_paths(tmp_path / "exported" / "model")
    assert result["paths"] == {k: str(v) for k, v in files.items()} and all(p.is_file() for p in files.values())
    metadata = json.loads(files["metadata"].read_text())
    model = ImageClassifier.load_from_checkpoint(checkpoint)
    assert metadata["class_names"] == model.class_names and metadata["image_size"] == IMAGE_SIZE

    # the plain state_dict is the backbone's, with its own keys
    state = torch.load(files["state_dict"], weights_only=True)
    assert set(state) == set(model.model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.model.state_dict().items())

    # three images: a batch size other than the export example's
    transform = eval_transform(IMAGE_SIZE)
    batch = torch.stack([transform(load_image(p)) for p in paths[:3]])  # (3, 3, S, S) uint8
    torch.save(batch, tmp_path / "batch.pt")
    code = textwrap.dedent(f"""
        import sys, torch
        program = torch.export.load({str(files["program"])!r}).module()
        probs = program(torch.load({str(tmp_path / "batch.pt")!r}))
        torch.save(probs, {str(tmp_path / "probs.pt")!r})
        assert not any(m == "project" or m.startswith("project.") for m in sys.modules), "imported project"
    """)
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    exported = torch.load(tmp_path / "probs.pt", weights_only=True)
    expected = reference_probabilities(checkpoint, paths[:3])
    assert exported.shape == expected.shape == (3, len(model.class_names))
    torch.testing.assert_close(exported, expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(exported.argmax(1), expected.argmax(1))


def test_export_script(checkpoint, tmp_path, capsys):
    script = load_script("export")
    assert script.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "m.pt2")]) == 0
    assert (tmp_path / "m.pt2").is_file() and (tmp_path / "m.state_dict.pt").is_file()
    assert script.main(["--checkpoint", str(tmp_path / "nope.ckpt")]) == 2
    assert "nope.ckpt" in capsys.readouterr().err
