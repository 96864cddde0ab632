"""The streaming dataset killed, out of disk or gone: optimize_data.py killed mid-write leaves no process behind,
and the same command run again completes the dataset, keeping the splits it had finished; training on the
half-written folder is refused in one line that gives that command. A disk without room is refused before
anything is written, one that fills up mid-write ends with one line. A streaming source that disappears
mid-run ends the run with one line naming it, and its last checkpoint resumes."""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
from litdata.streaming.writer import BinaryWriter

import project.training as training
from project.data import ImageDataModule
from project.data.streaming import RECORD
from project.tools import streaming_writer
from project.tools.streaming_reader import StreamingReader
from tests.conftest import ROOT, load_script, train_exit_code
from tests.killing import Victim, leftovers

CHUNK = "4KB"  # a few 32 px images a chunk: the first chunk is written after the first few images
SCRIPT = ROOT / "scripts" / "optimize_data.py"

# scripts/optimize_data.py as run from the command line, but each worker is held (60 s at most) once it has
# encoded HOLD_AFTER images of the split HOLD_SPLIT (and has said so in HOLD_SIGNALS), so that the kill lands
# mid-write, where the test wants it; held before the sample function starts, so with HOLD_AFTER=0 all that can
# end a held worker is what it was given when it was started
HELD = """
import os
import runpy
import sys
import time
from pathlib import Path

sys.path.insert(0, {root!r})
import project.tools.streaming_writer as writer

split, after = os.sep + os.environ["HOLD_SPLIT"] + os.sep, int(os.environ["HOLD_AFTER"])
signals = os.environ["HOLD_SIGNALS"]
encode, encoded, deadline = writer.EncodeSample.__call__, [0], time.monotonic() + 60


def held(self, item):
    if split in item[0]:
        encoded[0] += 1
        if encoded[0] > after:
            Path(signals, f"held-{{os.getpid()}}").touch()
        while encoded[0] > after and time.monotonic() < deadline:
            time.sleep(0.01)
    yield from encode(self, item)


writer.EncodeSample.__call__ = held
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


def command(source: Path, out: Path) -> list[str]:
    return ["--data_dir", str(source), "--output_dir", str(out), "--chunk_bytes", CHUNK]


def held_write(argv: list[str], temp: Path, split: str, after: int) -> Victim:
    signals = temp.with_name(f"held-{split}")
    signals.mkdir()
    env = {"HOLD_SPLIT": split, "HOLD_AFTER": str(after), "HOLD_SIGNALS": str(signals), "TMPDIR": str(temp)}
    env["OMP_NUM_THREADS"] = "1"
    code = HELD.format(root=str(ROOT), script=str(SCRIPT))
    return Victim([sys.executable, "-c", code, *argv, "--num_workers", "2"], cwd=ROOT, env=env)


def refused_for_training(data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> str:
    """train.py's one line for `data_dir`, which it refuses with exit code 2 before building a model or Trainer."""

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("built before the data was checked")

    with monkeypatch.context() as patch:
        for name in ("build_datamodule", "build_model", "build_trainer"):
            patch.setattr(training, name, never)
        capsys.readouterr()
        assert train_exit_code(["--data_dir", str(data_dir), "--accelerator", "cpu"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def error_lines(text: str) -> list[str]:
    assert "Traceback" not in text, text
    return [line for line in text.splitlines() if "error" in line.lower()]


def assert_complete(out: Path, source: Path) -> None:
    """`out` is a finished dataset of every image of `source`, read by `ImageDataModule`, with nothing left over."""
    metadata = json.loads((out / "classes.json").read_text())
    counts = {split: len(list((source / split).rglob("*.jpg"))) for split in ("train", "val", "test")}
    assert metadata["samples"] == counts
    dm = ImageDataModule(str(out), image_size=32, batch_size=8, num_workers=0, open_stream=StreamingReader)
    dm.setup("fit")
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (8, 3, 32, 32) and len(labels) == 8
    assert sorted(path.name for path in out.iterdir()) == ["classes.json", RECORD, "test", "train", "val"]
    assert leftovers(out, "*.partial", "*.tmp", "*.lock", "*-index.json", "*.index.json") == []


def test_a_killed_write_leaves_no_process_and_the_command_it_names_completes_it(
    tiny_shapes, tmp_path, monkeypatch, capsys
):
    out, temp = tmp_path / "stream", tmp_path / "tmp"
    temp.mkdir()
    argv = command(tiny_shapes, out)

    with held_write(argv, temp, "train", after=8) as victim:  # killed after the first chunk
        victim.wait_for_file(out / "train", "chunk-*.bin")
        victim.kill()
        assert not victim.strays()
    assert not (out / "train" / "index.json").exists() and not (out / "classes.json").exists()
    assert leftovers(temp, "litdata-*")  # the inputs litdata's killed writer kept, for the next run to remove
    line = refused_for_training(out, monkeypatch, capsys)
    expected = shlex.join(["python", "scripts/optimize_data.py", *argv[:4], "--chunk_bytes", "4000"])
    assert str(out) in line and line.endswith(f"complete it with: {expected}"), line

    with held_write(argv, temp, "val", after=0) as victim:  # killed again, once train is written
        index = victim.wait_for_file(out / "train", "index.json")
        victim.wait_for_file(tmp_path / "held-val", "held-*")  # a worker of val started, and is held
        victim.kill()
        assert not victim.strays()
    assert not (out / "classes.json").exists()
    written = index.stat()

    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    assert load_script("optimize_data").main(shlex.split(expected)[2:]) == 0
    assert "train: kept" in capsys.readouterr().err
    assert (index.stat().st_ino, index.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    assert_complete(out, tiny_shapes)
    assert leftovers(temp, "litdata-*") == []


def test_a_disk_without_room_is_refused_before_anything_is_written(tiny_shapes, tmp_path, monkeypatch, capsys):
    out, free = tmp_path / "stream", 12345
    usage = shutil.disk_usage

    def disk_usage(folder: str | os.PathLike) -> SimpleNamespace:
        assert Path(folder) == tmp_path  # the nearest folder that exists
        return SimpleNamespace(total=10**9, used=10**9 - free, free=free)

    monkeypatch.setattr(streaming_writer.shutil, "disk_usage", disk_usage)
    assert load_script("optimize_data").main(command(tiny_shapes, out)) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert str(out) in line and f"{free:,} free" in line, line
    needed = int(line.split("needs about ")[1].split(" bytes")[0].replace(",", ""))
    assert not out.exists()

    monkeypatch.setattr(streaming_writer.shutil, "disk_usage", usage)
    assert load_script("optimize_data").main(command(tiny_shapes, out)) == 0
    written = sum(path.stat().st_size for path in out.rglob("*.bin"))
    assert written <= needed < 2 * written  # the estimate: a little over what is written


def test_a_disk_that_fills_up_mid_write_ends_with_one_line_and_the_command_completes_it(
    tiny_shapes, tmp_path, monkeypatch, capfd
):
    out = tmp_path / "stream"
    write_split = streaming_writer.write_split

    def no_space(self: BinaryWriter, raw_data: bytes, filename: str, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    def filling_up(samples, output_dir, *args, **kwargs):  # the disk is full from the val split on
        if os.path.basename(output_dir) == "val":
            monkeypatch.setattr(BinaryWriter, "write_chunk_to_file", no_space)  # its workers are forked after this
        return write_split(samples, output_dir, *args, **kwargs)

    monkeypatch.setattr(streaming_writer, "write_split", filling_up)
    assert load_script("optimize_data").main(command(tiny_shapes, out)) == 1
    (line,) = error_lines(capfd.readouterr().err)
    assert line.startswith("optimize_data.py: error: the disk of") and str(out) in line and "filled up" in line
    assert (out / "train" / "index.json").exists()  # the split written before is kept
    assert not (out / "val").exists() and not (out / "classes.json").exists()  # the partial one's space given back

    monkeypatch.undo()
    line = refused_for_training(out, monkeypatch, capfd)
    assert line.endswith(f"complete it with: {json.loads((out / RECORD).read_text())['command']}")
    assert load_script("optimize_data").main(command(tiny_shapes, out)) == 0
    assert_complete(out, tiny_shapes)


class RemoveSource(L.Callback):
    """Removes the streaming folder's chunks when epoch `epoch` starts, as an unmounted disk would."""

    def __init__(self, folder: Path, epoch: int) -> None:
        self.folder, self.epoch = folder, epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            for chunk in self.folder.rglob("chunk-*.bin"):
                chunk.unlink()


def test_a_source_gone_mid_run_ends_it_in_one_line_naming_it_and_the_last_checkpoint_resumes(
    tiny_shapes, tmp_path, monkeypatch, capsys
):
    out, backup, runs = tmp_path / "stream", tmp_path / "backup", tmp_path / "runs"
    assert load_script("optimize_data").main([*command(tiny_shapes, out), "--num_workers", "2"]) == 0
    shutil.copytree(out, backup)
    argv = [
        *["--data_dir", str(out), "--image_size", "32", "--batch_size", "8", "--num_workers", "0"],
        *["--max_epochs", "2", "--limit_train_batches", "1", "--limit_val_batches", "1", "--limit_test_batches", "0"],
        *["--accelerator", "cpu", "--no-feed_monitor", "--default_root_dir", str(runs)],
    ]
    build_callbacks = training.build_callbacks
    monkeypatch.setattr(training, "build_callbacks", lambda values: [*build_callbacks(values), RemoveSource(out, 1)])
    capsys.readouterr()
    assert train_exit_code(argv) == 1
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert line.startswith(f"train.py: error: streaming source {out} stopped answering"), line

    monkeypatch.undo()
    shutil.rmtree(out)
    shutil.copytree(backup, out)  # mounted again
    assert train_exit_code([*argv, "--ckpt_path", "last"]) == 0
    assert "resuming from" in capsys.readouterr().out
