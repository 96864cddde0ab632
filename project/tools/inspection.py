"""Look inside a model: its modules, parameters, state_dict, per-layer output shapes and gradients.

Every layer is an `nn.Module`; a model's children, its parameters (`data`, `grad`, `requires_grad`)
and its `state_dict` can all be listed, and `forward()` runs each child's `forward()` in turn. The
functions here return plain data (lists of dicts) that tests can check; `format_report` renders it.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

STATE_DICT_ABRIDGED = 40  # entries shown without --full: first 30 and last 10 (where the head sits)


def weights_shown(checkpoint: Mapping[str, Any]) -> str:
    """Which weights a train.py checkpoint's `state_dict` holds (what `load_from_checkpoint` loads), in one line."""
    if "current_model_state" in checkpoint:  # written by --ema_decay's EMA callback, beside the average
        return "weights: the moving average (--ema_decay), which validation, predict and export use; not the live ones"
    return "weights: as trained (the run kept no moving average)"


def module_table(model: nn.Module) -> list[dict[str, Any]]:
    """One row per named module (the model itself is `""`): its type, the parameters it holds
    itself (`own`), and those of its whole subtree (`total`, split into `trainable` and `frozen`)."""
    rows = []
    for name, module in model.named_modules():
        params = list(module.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        rows.append(
            {
                "name": name,
                "type": type(module).__name__,
                "own": sum(p.numel() for p in module.parameters(recurse=False)),
                "total": total,
                "trainable": trainable,
                "frozen": total - trainable,
            }
        )
    return rows


def parameter_totals(model: nn.Module) -> dict[str, Any]:
    """Parameter counts (trainable, frozen, total) and the state_dict's size in MB per dtype
    (parameters and buffers, e.g. batch-norm running statistics)."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    size: dict[str, float] = defaultdict(float)
    for tensor in model.state_dict().values():
        size[str(tensor.dtype).removeprefix("torch.")] += tensor.numel() * tensor.element_size() / 2**20
    return {"trainable": trainable, "frozen": total - trainable, "total": total, "size_mb": dict(size)}


def state_dict_entries(model: nn.Module) -> list[dict[str, Any]]:
    """Every state_dict entry: key, shape and dtype (parameters and buffers alike)."""
    return [
        {"key": key, "shape": tuple(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for key, t in model.state_dict().items()
    ]


def output_shapes(model: nn.Module, images: torch.Tensor) -> list[dict[str, Any]]:
    """Run `images` through `model` (eval mode, no grad) and record, with forward hooks, the output
    shape of each top-level child in the order they ran."""
    rows: list[dict[str, Any]] = []

    def hook(name: str):
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            rows.append({"name": name, "type": type(module).__name__, "shape": shape})

        return record

    handles = [child.register_forward_hook(hook(name)) for name, child in model.named_children()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = model(images)
        rows.append({"name": "(output)", "type": type(model).__name__, "shape": tuple(out.shape)})
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return rows


def gradient_norms(model: nn.Module, images: torch.Tensor, num_classes: int) -> list[dict[str, Any]]:
    """One forward and backward pass (cross-entropy on random labels) on a copy of `model` in training
    mode; per parameter: its shape, `requires_grad`, the L2 norm of its gradient and a status:
    `ok`, `frozen` (requires_grad False, so no grad is expected), `none` (trainable but no gradient
    reached it: it is not used in forward) or `zero` (a gradient of exactly zero)."""
    model = copy.deepcopy(model).train()  # the pass would otherwise update batch-norm statistics
    model.zero_grad(set_to_none=True)
    labels = torch.randint(num_classes, (images.shape[0],), generator=torch.Generator().manual_seed(0))
    nn.functional.cross_entropy(model(images), labels).backward()
    rows = []
    for name, p in model.named_parameters():
        norm = None if p.grad is None else float(p.grad.detach().float().norm())
        if not p.requires_grad:
            status = "frozen"
        elif norm is None:
            status = "none"
        else:
            status = "zero" if norm == 0.0 else "ok"
        rows.append(
            {
                "name": name,
                "shape": tuple(p.shape),
                "requires_grad": p.requires_grad,
                "grad_norm": norm,
                "status": status,
            }
        )
    return rows


def inspect_model(model: nn.Module, image_size: int, num_classes: int, batch_size: int = 2) -> dict[str, Any]:
    """All of the above for `model` on a random `(batch_size, 3, image_size, image_size)` batch.

    The batch has two images because batch norm cannot train on one.
    """
    images = torch.randn(
        batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)
    )  # (B, 3, S, S), normalized-like
    return {
        "tree": repr(model),
        "modules": module_table(model),
        "totals": parameter_totals(model),
        "state_dict": state_dict_entries(model),
        "outputs": output_shapes(model, images[:1]),
        "input_shape": (1, 3, image_size, image_size),
        "grads": gradient_norms(model, images, num_classes),
    }


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    ]


def _shape(shape: Any) -> str:
    return str(list(shape)) if isinstance(shape, tuple) else str(shape)


def format_report(report: dict[str, Any], full: bool = False) -> str:
    """The report as text; without `full`, a long state_dict listing is abridged to its first and last entries."""
    out = ["== module tree ==", report["tree"], "", "== modules (parameters) =="]
    rows = [["name", "type", "own", "total", "trainable", "frozen"]]
    rows += [
        [
            m["name"] or "(model)",
            m["type"],
            f"{m['own']:,}",
            f"{m['total']:,}",
            f"{m['trainable']:,}",
            f"{m['frozen']:,}",
        ]
        for m in report["modules"]
    ]
    out += _table(rows, right={2, 3, 4, 5})

    t = report["totals"]
    out += [
        "",
        "== totals ==",
        f"trainable {t['trainable']:,}   frozen {t['frozen']:,}   all {t['total']:,}",
        "size: "
        + ", ".join(
            f"{dtype} {mb:.2f} MB" if mb >= 0.01 else f"{dtype} {mb * 2**20:.0f} bytes"
            for dtype, mb in t["size_mb"].items()
        ),
    ]

    entries = report["state_dict"]
    out += ["", f"== state_dict ({len(entries)} entries) =="]
    shown: list[dict[str, Any] | None] = list(entries)
    if not full and len(entries) > STATE_DICT_ABRIDGED:
        tail = STATE_DICT_ABRIDGED // 4
        shown = entries[: STATE_DICT_ABRIDGED - tail] + [None] + entries[-tail:]
    rows = []
    for e in shown:
        if e is None:
            rows.append([f"... {len(entries) - STATE_DICT_ABRIDGED} more (--full lists all)", "", ""])
        else:
            rows.append([e["key"], _shape(e["shape"]), e["dtype"]])
    out += _table(rows, right=set())

    out += ["", f"== output of each top-level child, input {_shape(report['input_shape'])} =="]
    out += _table([[o["name"], o["type"], _shape(o["shape"])] for o in report["outputs"]], right=set())

    grads = report["grads"]
    flagged = [g for g in grads if g["status"] in ("none", "zero")]
    out += ["", "== gradient norms after one forward + backward =="]
    rows = [["parameter", "shape", "grad norm", ""]]
    for g in grads:
        norm = "-" if g["grad_norm"] is None else f"{g['grad_norm']:.3e}"
        flag = {"none": "<- NO GRAD", "zero": "<- ZERO GRAD", "frozen": "(frozen)"}.get(g["status"], "")
        rows.append([g["name"], _shape(g["shape"]), norm, flag])
    out += _table(rows, right={2})
    out.append(
        f"{len(flagged)} trainable parameter(s) without a useful gradient"
        if flagged
        else "every trainable parameter got a non-zero gradient"
    )
    return "\n".join(out)
