"""Run-time safety: checkpoint writes and `--ckpt_path last`, interruption / NaN / bad-image handling, console."""
