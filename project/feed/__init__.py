"""The data-feeding toolkit: the feed monitor, `num_workers auto`, loader and model timing, the decoded cache, the
device-decoding batch step, the benchmarks.

Used as it is; the template core never imports it (the training run wires it in).
"""
