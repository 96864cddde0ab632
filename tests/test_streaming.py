"""Streaming data (litdata): optimize_data.py writes an image folder once; train.py trains and validates from it
every epoch, shares it out under DDP, resumes mid-epoch where it stopped, and says in one line what is wrong
with a bad URL, a missing index or a flag that does not apply."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from litdata import StreamingDataset
from PIL import Image

import project.training as training
from project.data import ImageDataModule
from project.data.streaming import is_streaming_source
from project.tools.streaming_reader import StreamingReader
from project.tools.streaming_writer import encode_image
from tests.conftest import ROOT, load_script, write_image

TINY_RUN = ["--image_size", "32", "--accelerator", "cpu", "--no-feed_monitor"]


@pytest.fixture(scope="module")
def streamed(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_shapes (320 train, 80 val, 80 test images of 8 classes) written by optimize_data.py."""
    out = tmp_path_factory.mktemp("streamed") / "shapes-stream"
    argv = ["--data_dir", str(tiny_shapes), "--output_dir", str(out), "--num_workers", "2"]
    assert load_script("optimize_data").main(argv) == 0
    return out


BUILD_CALLBACKS = training.build_callbacks


def with_callback(monkeypatch: pytest.MonkeyPatch, callback: L.Callback) -> None:
    """Add `callback` (instead of one added before) to the runs train.py's main starts from now on."""
    monkeypatch.setattr(training, "build_callbacks", lambda values: [*BUILD_CALLBACKS(values), callback])


def test_optimize_writes_every_split_its_classes_and_a_shuffled_order(streamed, tiny_shapes):
    metadata = json.loads((streamed / "classes.json").read_text())
    assert metadata["samples"] == {"train": 320, "val": 80, "test": 80}
    assert metadata["image_size"] == 256
    assert is_streaming_source(str(streamed)) and not is_streaming_source(str(tiny_shapes))
    dm = ImageDataModule(str(streamed), open_stream=StreamingReader)
    assert dm.source.name == "streaming" and dm.has_test
    assert dm.classes == metadata["classes"] == ImageDataModule(str(tiny_shapes)).classes

    stored = StreamingDataset(str(streamed / "train"))  # in stored order
    sample = stored[0]
    with Image.open(io.BytesIO(sample["image"])) as image:
        assert image.format == "JPEG" and image.size == (32, 32)  # never upscaled to 256
    first = [stored[i]["label"] for i in range(16)]
    assert len(set(first)) >= 4, first  # classes mixed: written in a seeded random order, not folder order


def test_encode_image_brings_the_shorter_side_down_never_up(tmp_path):
    path = write_image(tmp_path / "wide.png", size=(60, 40), mode="RGBA")
    with Image.open(io.BytesIO(encode_image(str(path), 20))) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (30, 20))
    with Image.open(io.BytesIO(encode_image(str(path), 100))) as image:
        assert image.size == (60, 40)


def test_streaming_batches_take_the_shape_and_device_work_of_folder_batches(streamed, tiny_shapes):
    def first_batch(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
        dm = ImageDataModule(
            str(data_dir), image_size=32, batch_size=8, num_workers=0, shuffle=False, open_stream=StreamingReader
        )
        dm.setup("fit")
        return next(iter(dm.val_dataloader()))

    images, labels = first_batch(streamed)
    reference, _ = first_batch(tiny_shapes)
    assert images.dtype == reference.dtype == torch.uint8 and images.shape == reference.shape == (8, 3, 32, 32)
    assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() < 8
    normalized, _ = ImageDataModule(str(streamed), open_stream=StreamingReader).on_after_batch_transfer(
        (images, labels), 0
    )  # the device work
    assert normalized.dtype == torch.float32 and -3 < normalized.mean() < 3


def test_each_epoch_is_shuffled_anew_even_when_cut_short(streamed):
    dm = ImageDataModule(
        str(streamed), image_size=32, batch_size=16, num_workers=2, persistent_workers=True, open_stream=StreamingReader
    )
    dm.setup("fit")
    loader = dm.train_dataloader()

    def first_labels() -> list[int]:  # the first 3 batches, as with --limit_train_batches 3
        batches = [labels for (_, labels), _ in zip(loader, range(3), strict=False)]
        return torch.cat(batches).tolist()

    assert first_labels() != first_labels()


@pytest.mark.slow
def test_train_py_trains_and_validates_every_epoch_from_a_streaming_folder(streamed, tmp_path, monkeypatch):
    class Count(L.Callback):
        def __init__(self) -> None:
            self.validated: list[int] = []
            self.batches: dict[int, int] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batches[trainer.current_epoch] = self.batches.get(trainer.current_epoch, 0) + 1

        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self.validated.append(trainer.current_epoch)

    count = Count()
    with_callback(monkeypatch, count)
    # 320 images in batches of 24 over 2 workers: uneven, the case where a loader's length can be overestimated
    # and Lightning then skips validation without a word (litData #772, Lightning #19624)
    argv = ["--data_dir", str(streamed), "--batch_size", "24", "--num_workers", "2", "--max_epochs", "2"]
    assert load_script("train").main([*argv, *TINY_RUN, "--default_root_dir", str(tmp_path)]) == 0
    assert count.validated == [0, 1]
    assert count.batches == {0: 14, 1: 14}  # ceil(320 / 24)
    checkpoint = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, weights_only=True)  # the loader position it holds is plain data
    assert state["ImageDataModule"]["train_loader"]["current_epoch"] == 2


def image_key(image: torch.Tensor, mean: list[float], std: list[float]) -> bytes:
    """A normalized image back to its uint8 pixels (augmentation is off): the same bytes each time it is seen."""
    mean_, std_ = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    return (image.float().cpu() * std_ + mean_).mul(255).round().to(torch.uint8).numpy().tobytes()


class Record(L.Callback):
    """The images of every training batch, by epoch; sends this process SIGTERM at global step `stop_at`."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at = stop_at
        self.seen: dict[int, list[bytes]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        keys = [image_key(image, pl_module.hparams.mean, pl_module.hparams.std) for image in batch[0]]
        self.seen.setdefault(trainer.current_epoch, []).extend(keys)
        if trainer.global_step == self.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would: a checkpoint after this step


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_run_stopped_mid_epoch_resumes_from_the_saved_loader_position(streamed, tmp_path, monkeypatch, num_workers):
    argv = [
        *["--data_dir", str(streamed), "--batch_size", "16", "--num_workers", str(num_workers), "--max_epochs", "2"],
        *["--rotation", "0", "--no-hflip", "--augment_on", "cpu", "--limit_val_batches", "1"],
        *[*TINY_RUN, "--default_root_dir", str(tmp_path)],
    ]
    script = load_script("train")
    stopped = Record(stop_at=6)  # 20 steps an epoch: stop after the 7th
    with_callback(monkeypatch, stopped)
    with pytest.raises(SystemExit) as exited:
        script.main(argv)
    assert exited.value.code == 128 + signal.SIGTERM

    resumed = Record()
    with_callback(monkeypatch, resumed)
    assert script.main([*argv, "--ckpt_path", "last"]) == 0
    before, after = stopped.seen[0], resumed.seen[0]
    assert (len(before), len(after)) == (7 * 16, 13 * 16)
    # the resumed epoch went on with the samples it had not reached: none twice, none left out
    assert not set(before) & set(after)
    assert set(before) | set(after) == set(resumed.seen[1])
    assert len(set(resumed.seen[1])) == 320  # and the next epoch is a whole one again


# scripts/train.py, with each process noting the index of every sample its datasets hand over, per split and rank;
# "ddp" starts the second process by running this same file again
RECORDING_TRAIN = """
import importlib.util
import os
import sys

import torch

sys.path.insert(0, {root!r})
from litdata import StreamingDataset

read = StreamingDataset.__getitem__


def recording(self, index):
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else -1
    split = os.path.basename(self.input_dir.path)
    with open(os.path.join(os.environ["SEEN_DIR"], f"{{split}}-rank{{rank}}.txt"), "a") as f:
        f.write(f"{{index.index}}\\n")
    return read(self, index)


StreamingDataset.__getitem__ = recording
spec = importlib.util.spec_from_file_location("train_script", {script!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.exit(module.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ddp_ranks_see_disjoint_samples_and_drop_only_the_uneven_remainder(streamed, tmp_path):
    driver = tmp_path / "recording_train.py"
    driver.write_text(RECORDING_TRAIN.format(root=str(ROOT), script=str(ROOT / "scripts" / "train.py")))
    seen = tmp_path / "seen"
    seen.mkdir()
    command = [
        *[sys.executable, str(driver), "--devices", "2", "--strategy", "ddp", "--data_dir", str(streamed)],
        *["--batch_size", "24", "--max_epochs", "1", "--num_workers", "0", *TINY_RUN, "--default_root_dir", "."],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEEN_DIR": str(seen)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    def indexes(split: str, rank: int) -> list[int]:
        return [int(line) for line in (seen / f"{split}-rank{rank}.txt").read_text().split()]

    train0, train1 = indexes("train", 0), indexes("train", 1)
    # 320 samples, 2 ranks, batches of 24: 6 full batches each (288 samples); 320 mod 48 = 32 sit the epoch out
    assert len(train0) == len(set(train0)) == len(train1) == len(set(train1)) == 6 * 24
    assert not set(train0) & set(train1)
    assert set(train0) | set(train1) <= set(range(320))
    val0, val1 = set(indexes("val", 0)), set(indexes("val", 1))  # the sanity check reads a rank's first ones again
    assert not val0 & val1 and val0 | val1 == set(range(80))  # validation sees every sample once
    checkpoint = torch.load(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6


def one_error_line(capture: pytest.CaptureFixture) -> str:
    err = capture.readouterr().err.strip().splitlines()
    lines = [line for line in err if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in "\n".join(err), err
    return lines[0]


def test_a_missing_index_or_classes_file_is_a_one_line_usage_error(streamed, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(streamed, broken)
    (broken / "val" / "index.json").unlink()
    argv = ["--data_dir", str(broken), *TINY_RUN, "--default_root_dir", str(tmp_path)]
    assert load_script("train").main(argv) == 2
    line = one_error_line(capsys)
    assert str(broken / "val") in line and "index.json" in line

    (broken / "classes.json").unlink()  # an interrupted optimize_data.py: chunks, no classes.json yet
    assert load_script("train").main(argv) == 2
    line = one_error_line(capsys)
    assert "classes.json" in line and "optimize_data.py" in line


def test_a_bad_url_is_a_one_line_usage_error(tmp_path, capsys, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no credentials anywhere: fails before the network
    url = "s3://no-such-bucket-for-tests/shapes"
    assert load_script("train").main(["--data_dir", url, *TINY_RUN, "--default_root_dir", str(tmp_path)]) == 2
    assert url in one_error_line(capsys)
    with pytest.raises(FileNotFoundError, match=f"cannot read {url}/classes.json"):
        ImageDataModule(url, open_stream=StreamingReader).setup("fit")


@pytest.mark.parametrize(
    ("flags", "named"), [(["--cache"], "--cache"), (["--sampler", "balanced"], "--sampler balanced")]
)
def test_folder_only_flags_are_refused_for_a_streaming_source(streamed, tmp_path, capsys, flags, named):
    argv = ["--data_dir", str(streamed), *flags, *TINY_RUN, "--default_root_dir", str(tmp_path)]
    assert load_script("train").main(argv) == 2
    assert named in one_error_line(capsys)


def test_optimize_names_a_bad_image_or_skips_and_counts_it(tmp_path, capfd):
    # capfd: the skipped files are named by optimize()'s worker processes, on their stderr
    for split, n in (("train", 4), ("val", 2)):
        for label in ("a", "b"):
            for i in range(n):
                write_image(tmp_path / "images" / split / label / f"{i}.jpg", seed=i)
    bad = tmp_path / "images" / "train" / "a" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    argv = ["--data_dir", str(tmp_path / "images"), "--output_dir", str(tmp_path / "out"), "--num_workers", "1"]
    script = load_script("optimize_data")
    assert script.main(argv) == 1
    line = one_error_line(capfd)
    assert str(bad) in line and "--skip_bad_images" in line
    assert not (tmp_path / "out" / "classes.json").exists()  # not marked complete

    assert script.main([*argv, "--skip_bad_images"]) == 0
    out, err = capfd.readouterr()
    assert str(bad) in err and "skipped 1 unreadable image" in out
    assert json.loads((tmp_path / "out" / "classes.json").read_text())["samples"] == {"train": 8, "val": 4}


def test_optimize_refuses_a_missing_folder_in_one_line(tmp_path, capsys):
    argv = ["--data_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "out")]
    assert load_script("optimize_data").main(argv) == 2
    assert "--data_dir" in one_error_line(capsys)
