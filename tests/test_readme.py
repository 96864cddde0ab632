"""The README and docs/*.md cannot rot: every command of their fenced bash blocks is run, with tiny settings.

Each document runs on its own: its blocks in order, from the root of one scratch copy of the repository,
so a later command may use what an earlier one of the same document wrote (a checkpoint, a run folder).
With tiny settings: `python scripts/<name>.py ...` gets flags that make it take seconds (one epoch of one
batch, a tiny generated dataset, the CPU when there is no GPU) and must exit 0; `pip install` and
`pytest` lines are recorded, not run (CI runs them for real); `tensorboard --logdir DIR` checks that DIR
exists by then. Plain command lines run in this process (no interpreter start-up per command); a block
with any other shell (`mv`, pipes, `python -c`) runs in bash, in its own copy, with stand-ins for the
commands above.

What is not exercised as written, and why:
- `pip install ...` and `python -m pytest ...`: recorded only (installing and the suite itself are CI's job);
- `tensorboard --logdir DIR`: not started (a server); only DIR's existence is checked;
- GPU flags on a machine without CUDA: `--accelerator`, `--devices`, `--strategy` and `--precision` are
  rewritten to one CPU process (`ON_CPU`), so the DDP examples run as a single process here
  (tests/test_ddp.py covers DDP on the CPU); `torchrun` runs its script as that single process;
- long runs: `TINY` caps training at one epoch of one batch and runs the benchmark with `--quick`, so the
  commands are checked, the figures in docs/performance.md are not reproduced;
- `text` blocks (sample output, the SLURM script) and `python` blocks (code to paste) are not run.
"""

from __future__ import annotations

import os
import re
import runpy
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
COPIED = ("project", "scripts", "tests", "examples", "pyproject.toml", "README.md")
FENCE = re.compile(r"^```(?:bash|sh|shell)[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
LOG_ENV = "README_TEST_LOG"

# Appended last, so they win over the README's own values: each script's budget.
TINY = {
    "train.py": shlex.split(
        "--max_epochs 1 --limit_train_batches 1 --limit_val_batches 1 --limit_test_batches 1 "
        "--batch_size 4 --image_size 32"
    ),
    "benchmark_data.py": ["--quick", "--no-progress"],
}
# Added only when the command does not set them itself.
DEFAULTS = {
    "train.py": {"--num_workers": "0", "--data_dir": "data/shapes"},  # the tiny dataset make_workspace writes
    "predict.py": {"--num_workers": "0"},
}
# GPU examples run on the CPU when there is no GPU.
ON_CPU = {"--accelerator": "cpu", "--devices": "1", "--strategy": "auto", "--precision": "32-true"}


def flag_name(flag: str) -> str:
    """`--max-epochs=3` -> `--max_epochs`."""
    return "--" + flag[2:].split("=")[0].replace("-", "_")


def tiny_argv(script: str, flags: list[str], cuda: bool) -> list[str]:
    """The flags of a `python scripts/<script> ...` command, with the tiny settings applied."""
    flags = list(flags)
    given = {flag_name(f) for f in flags if f.startswith("--")}
    flags += [x for flag, value in DEFAULTS.get(script, {}).items() if flag not in given for x in (flag, value)]
    if not cuda:
        for i, flag in enumerate(flags):
            name = flag_name(flag) if flag.startswith("--") else None
            if name in ON_CPU:
                if "=" in flag:
                    flags[i] = f"{name}={ON_CPU[name]}"
                elif i + 1 < len(flags):
                    flags[i + 1] = ON_CPU[name]
    return flags + TINY.get(script, [])


def shell_blocks(text: str) -> list[str]:
    """The bodies of the fenced bash/sh/shell blocks, in order."""
    return [m.group(1) for m in FENCE.finditer(text)]


def command_lines(block: str) -> list[str]:
    """A block's command lines, with continuation lines joined and comments dropped."""
    lines = (line.strip() for line in block.replace("\\\n", " ").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def kind(argv: list[str]) -> str | None:
    """What a command is, for this test: pip, pytest, script, tensorboard; None for anything else."""
    if argv[:2] == ["pip", "install"] or argv[:4] == ["python", "-m", "pip", "install"]:
        return "pip"
    if argv[:1] == ["pytest"] or argv[:3] == ["python", "-m", "pytest"]:
        return "pytest"
    if len(argv) >= 2 and argv[0] in ("python", "python3") and re.fullmatch(r"scripts/\w+\.py", argv[1]):
        return "script"
    if argv[:1] == ["tensorboard"] and "--logdir" in argv[:-1]:
        return "tensorboard"
    return None


def parse(line: str) -> list[tuple[dict[str, str], list[str]]] | None:
    """A line's commands split at `&&` and `;`, each as (environment assignments, argv).

    None when the line needs a real shell (pipes, redirections, variables, globs) or runs anything
    `kind` does not know.
    """
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in [*lexer, "&&"]:
        if token in ("&&", ";"):
            env = {}
            while current and re.fullmatch(r"[A-Za-z_]\w*=\S*", current[0]):
                key, _, value = current.pop(0).partition("=")
                env[key] = value
            if not current or kind(current) is None:
                return None
            commands.append((env, current))
            current = []
        elif set(token) <= set("();<>|&") or any(c in token for c in "$`*?~"):
            return None
        else:
            current.append(token)
    return commands


def record(line: str) -> None:
    with open(os.environ[LOG_ENV], "a") as f:
        f.write(line + "\n")


def python_shim() -> None:
    """Stand-in for `python` inside bash blocks: records pip/pytest, shrinks script runs, runs the rest."""
    args = sys.argv[1:]
    if args[:2] in (["-m", "pytest"], ["-m", "pip"]):
        record(shlex.join(["python", *args]))
        return
    if args and re.fullmatch(r"scripts/\w+\.py", args[0]):
        args = [args[0], *tiny_argv(Path(args[0]).name, args[1:], os.environ.get("README_TEST_CUDA") == "1")]
        record(shlex.join(["python", *args]))
    os.execv(sys.executable, [sys.executable, *args])


def write_shims(folder: Path) -> None:
    """Executables that shadow python, pip, pytest, tensorboard and torchrun inside bash blocks."""
    folder.mkdir()
    python = f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\n"
    scripts = {
        "python": python + "from test_readme import python_shim\npython_shim()\n",
        "pip": f'#!/bin/sh\necho "pip $*" >> "${LOG_ENV}"\n',
        "pytest": f'#!/bin/sh\necho "pytest $*" >> "${LOG_ENV}"\n',
        # torchrun's own options come before the script; the script runs as a single process
        "torchrun": '#!/bin/sh\nwhile [ $# -gt 0 ] && [ "${1%.py}" = "$1" ]; do shift; done\nexec python "$@"\n',
        "tensorboard": python + "from test_readme import check_logdir\ncheck_logdir(sys.argv[1:])\n",
    }
    scripts["python3"] = scripts["python"]
    for name, text in scripts.items():
        path = folder / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def check_logdir(args: list[str], cwd: Path | None = None) -> None:
    record(shlex.join(["tensorboard", *args]))
    logdir = Path(cwd or ".") / args[args.index("--logdir") + 1]
    if not logdir.is_dir():
        raise SystemExit(f"tensorboard --logdir {logdir}: no such folder at this point of the README")


def make_workspace(root: Path) -> Path:
    """A copy of the repository's sources with a tiny built-in dataset in data/shapes."""
    from project.data import generate_shapes

    workspace = root / "repo"
    workspace.mkdir(parents=True)
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, workspace / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif source.is_file():
            shutil.copy2(source, workspace / name)
    generate_shapes(workspace / "data" / "shapes", per_class={"train": 4, "val": 2, "test": 2}, progress=False)
    return workspace


def run_script(workspace: Path, env: dict[str, str], argv: list[str], cuda: bool) -> int:
    """`python scripts/<name>.py ...` run in this process from `workspace`, as its `__main__`; the exit code."""
    script = workspace / argv[1]
    args = tiny_argv(script.name, argv[2:], cuda)
    record(shlex.join(["python", argv[1], *args]))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workspace)
        mp.setattr(sys, "argv", [str(script), *args])
        mp.setattr(sys, "path", list(sys.path))  # scripts put their repository first; undo it afterwards
        for key, value in env.items():
            mp.setenv(key, value)
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as exit_:
            return exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    return 0


def run_readme(text: str, root: Path, capsys: pytest.CaptureFixture | None = None) -> list[str]:
    """Run every command of `text`'s bash blocks in a fresh workspace under `root`; return what was run."""
    import torch

    cuda = torch.cuda.is_available()
    workspace = make_workspace(root)
    log = root / "calls.log"
    log.touch()
    shims = root / "shims"
    write_shims(shims)
    env = {
        **os.environ,
        LOG_ENV: str(log),
        "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}",
        "README_TEST_CUDA": str(int(cuda)),
        "MPLBACKEND": "Agg",
    }
    blocks = shell_blocks(text)
    assert blocks, "README has no fenced bash blocks"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(LOG_ENV, str(log))
        for number, block in enumerate(blocks):
            lines = command_lines(block)
            parsed = [parse(line) for line in lines]
            if all(p is not None for p in parsed):
                for line, commands in zip(lines, parsed, strict=True):
                    for extra_env, argv in commands:
                        if kind(argv) == "script":
                            code = run_script(workspace, extra_env, argv, cuda)
                            output = capsys.readouterr() if capsys is not None else None
                            tail = (output.out + output.err)[-3000:] if output else ""
                            assert code == 0, f"README command failed (exit {code}): {line}\n{tail}"
                        elif kind(argv) == "tensorboard":
                            check_logdir(argv[1:], cwd=workspace)
                        else:
                            record(shlex.join(argv))
            else:  # real shell: its own copy, so renames and edits cannot disturb the blocks after it
                sandbox = root / f"block{number}"
                shutil.copytree(workspace, sandbox, symlinks=True)
                done = subprocess.run(
                    ["bash", "-e", "-o", "pipefail", "-c", block],
                    cwd=sandbox,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                assert done.returncode == 0, (
                    f"README block failed (exit {done.returncode}):\n{block}\n--- output ---\n"
                    f"{(done.stdout + done.stderr)[-3000:]}"
                )
    return log.read_text().splitlines()


def test_readme_shows_install_test_and_train_commands() -> None:
    lines = [line for block in shell_blocks(README.read_text()) for line in command_lines(block)]
    assert any(re.search(r"\bpip install\b", line) for line in lines), "README shows no pip install command"
    assert any(re.search(r"\bpython -m pytest\b|^pytest\b", line) for line in lines), "README shows no test command"
    assert any(re.search(r"\bpython scripts/train\.py\b", line) for line in lines), "README shows no training command"


def test_commands_are_parsed_and_shrunk() -> None:
    command = "CUDA_VISIBLE_DEVICES=0 python scripts/train.py \\\n  --accelerator gpu --max-epochs 20"
    text = f"```bash\n# comment\n{command}\n```\n"
    ((env, argv),) = parse(command_lines(shell_blocks(text)[0])[0])
    assert env == {"CUDA_VISIBLE_DEVICES": "0"} and argv[:2] == ["python", "scripts/train.py"]
    flags = tiny_argv("train.py", argv[2:], cuda=False)
    assert flags[:2] == ["--accelerator", "cpu"]
    assert flags[flags.index("--data_dir") + 1] == "data/shapes"
    assert flags[-len(TINY["train.py"]) :] == TINY["train.py"]  # last, so they win over --max-epochs 20
    assert parse("pip install -e . && python -m pytest") == [
        ({}, ["pip", "install", "-e", "."]),
        ({}, ["python", "-m", "pytest"]),
    ]
    assert parse("mv project my_classifier") is None
    assert parse("grep -rl x . | xargs sed -i s/a/b/") is None


def script_calls_missing(text: str, calls: list[str]) -> list[str]:
    """The `scripts/<name>.py` a document shows that were never run (the tiny flags only ever come after its own)."""
    shown = [line for block in shell_blocks(text) for line in command_lines(block)]
    return [
        script
        for line in shown
        for script in re.findall(r"\bscripts/\w+\.py\b", line)
        if not any(script in c for c in calls)
    ]


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = README.read_text()
    calls = run_readme(text, tmp_path, capsys)
    assert not script_calls_missing(text, calls), calls
    assert any(c.startswith(("pip install", "python -m pip install")) for c in calls), calls
    assert any(c.startswith(("python -m pytest", "pytest")) for c in calls), calls


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS, ids=[doc.name for doc in DOCS])
def test_every_docs_command_runs(doc: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = doc.read_text()
    if not shell_blocks(text):
        pytest.skip(f"{doc.name} has no bash blocks")
    calls = run_readme(text, tmp_path, capsys)
    assert not script_calls_missing(text, calls), calls


def test_docs_links_resolve() -> None:
    """Every relative link and image of the README and docs/*.md points at a file that exists, and every
    page in docs/ is reachable from the README."""
    link = re.compile(r"\]\(([^)\s]+)\)")
    linked = set()
    for page in [README, *DOCS]:
        for target in link.findall(page.read_text()):
            if re.match(r"[a-z]+://|#|mailto:", target):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{page.name} links to {target}, which does not exist"
            linked.add(path)
    unlinked = [doc.name for doc in DOCS if doc.resolve() not in linked]
    assert not unlinked, f"docs/ pages no other page links to: {unlinked}"
