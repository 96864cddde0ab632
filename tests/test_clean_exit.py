"""Nothing outlives a run: the end of a run waits for (or ends) the processes it started, and the kill helper finds
a process that outlives its parent. The DDP run itself is checked in test_ddp.py."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from project.runtime.faults import end_run
from tests.killing import Victim, marked_processes

# starts a child that outlives it (it does not watch its parent), then waits to be killed
LEAVES_A_CHILD = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print("child", child.pid, flush=True)
sys.stdin.read()
"""


def test_the_kill_helper_finds_a_process_that_outlived_the_killed_one_and_ends_it():
    with Victim([sys.executable, "-c", LEAVES_A_CHILD]) as victim:
        child = int(victim.wait_for_line("child").split()[1])
        victim.kill()
        strays = victim.strays(timeout=0.5)
        assert [int(stray.split(":")[0]) for stray in strays] == [child]
    assert not marked_processes(victim.marker)  # leaving the block ended it


def run_with(*processes: subprocess.Popen) -> SimpleNamespace:
    """Stands in for a DDP run's trainer on rank 0: what its launcher started."""
    return SimpleNamespace(strategy=SimpleNamespace(launcher=SimpleNamespace(procs=list(processes))))


def python(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)


def test_the_end_of_a_run_waits_for_its_processes_and_reports_one_that_failed(capsys):
    finishing, failing = python("import time; time.sleep(0.5)"), python("raise SystemExit(3)")
    with pytest.raises(SystemExit) as stop:
        end_run(run_with(finishing, failing))
    assert stop.value.code == 1
    assert finishing.returncode == 0  # waited for, not killed
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pid {failing.pid}" in err[0] and "exit code 3" in err[0], err


def test_the_end_of_a_failed_run_kills_a_process_that_does_not_end(capsys):
    stuck = python("import sys; sys.stdin.read()")  # as a DDP process waiting in a collective forever
    end_run(run_with(stuck), failed=True, grace_s=0.5)
    assert stuck.returncode == -9
    assert capsys.readouterr().err == ""  # the failure itself was already reported
    stuck.stdin.close()
