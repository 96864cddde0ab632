"""Run-time safety: the command line and its usage errors, checkpoint writes and `--ckpt_path last`, interruption /
NaN / bad-image handling (`--skip_bad_images`), console."""
