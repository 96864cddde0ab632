"""Kill a real subprocess at a chosen moment, then see what it left: partial files and stray processes.

    with Victim([sys.executable, "scripts/optimize_data.py", ...]) as victim:
        victim.wait_for_file(out, "*.partial*")   # or victim.wait_for_line("chunk 3")
        victim.kill()                             # SIGKILL, as the OOM killer sends it
        assert not victim.strays()                # no process it started is still running
        assert not leftovers(out, "*.partial*", ".*.tmp")

The victim runs in its own session, with a unique marker in its environment that every process it
starts inherits, so its processes are found after the kill even once they have a new parent (init).
Leaving the `with` block kills whatever is left, so a failing test leaks nothing either. Linux only
(it reads /proc); waits are for a file or a line with a deadline, never for a fixed time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

MARKER = "KILL_TEST_MARKER"  # the environment variable that marks a victim's processes
POLL_S = 0.01  # how often a wait looks again


def marked_processes(marker: str) -> list[int]:
    """PIDs of the running processes (zombies aside) whose environment holds `MARKER=marker`."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path("/proc", entry, "environ").read_bytes()
            state = Path("/proc", entry, "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # ended meanwhile, or another user's
            continue
        if needle in environ.split(b"\0") and state != "Z":
            found.append(int(entry))
    return found


def leftovers(folder: str | os.PathLike, *patterns: str) -> list[Path]:
    """The files under `folder` (recursively) whose name matches one of the glob `patterns`; none while `folder` is
    being replaced (a writer that rewrites an unfinished split removes it first: the walk can lose it midway)."""
    try:
        return sorted({path for pattern in patterns for path in Path(folder).rglob(pattern)})
    except FileNotFoundError:
        return []


class Victim:
    """A command started to be killed: in its own session, marked, its output read line by line."""

    def __init__(
        self, argv: Sequence[str], cwd: str | os.PathLike | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.marker = uuid.uuid4().hex
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env={**os.environ, **(env or {}), MARKER: self.marker},
            stdin=subprocess.PIPE,  # a victim may block reading it: it reads end-of-file once the test is gone
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def _fail(self, what: str) -> None:
        state = "still running" if self.process.poll() is None else f"exited with {self.process.returncode}"
        raise AssertionError(f"{what}; the victim {state}, its output:\n{self.output[-3000:]}")

    def wait_for_line(self, text: str, timeout: float = 30) -> str:
        """The first output line containing `text`, once it is printed."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                line = next((line for line in self.lines if text in line), None)
                if line is not None:
                    return line
                if not self._reader.is_alive() or time.monotonic() > deadline:
                    self._fail(f"no line with {text!r}")
                self._changed.wait(deadline - time.monotonic())

    def wait_for_file(self, folder: str | os.PathLike, pattern: str, timeout: float = 30) -> Path:
        """The first file under `folder` matching the glob `pattern`, once it exists."""
        deadline = time.monotonic() + timeout
        while True:
            found = leftovers(folder, pattern)
            if found:
                return found[0]
            if self.process.poll() is not None or time.monotonic() > deadline:
                self._fail(f"no file {pattern!r} under {str(folder)!r}")
            time.sleep(POLL_S)

    def kill(self) -> None:
        """SIGKILL the victim alone, as the OOM killer does (not its children: they must notice), and reap it."""
        self.process.kill()
        self.process.wait()

    def strays(self, timeout: float = 10) -> list[str]:
        """The victim's processes still running `timeout` seconds after it ended (pid and command line).

        A child that watches its parent notices the death a moment later: this waits for them to go.
        """
        deadline = time.monotonic() + timeout
        while True:
            pids = marked_processes(self.marker)
            if not pids or time.monotonic() > deadline:
                break
            time.sleep(POLL_S * 10)
        described = []
        for pid in pids:
            try:
                command = Path("/proc", str(pid), "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:  # ended meanwhile
                continue
            described.append(f"{pid}: {command.strip()}")
        return described

    def wait(self, timeout: float = 120) -> int:
        """Let the victim run to its end; its exit code."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._fail(f"not done after {timeout} s")

    def __enter__(self) -> Victim:
        return self

    def __exit__(self, *exc: object) -> None:
        # whatever is left, even by a failed test: the session's process group, then marked stragglers
        with suppress(ProcessLookupError):  # the group lives on while any member does, the leader's PID with it
            os.killpg(self.process.pid, signal.SIGKILL)
        for pid in marked_processes(self.marker):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()
        self.process.stdin.close()
        self._reader.join(timeout=5)
        self.process.stdout.close()
