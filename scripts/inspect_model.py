"""Look inside a model: `python scripts/inspect_model.py --backbone resnet18 --num_classes 10 [--checkpoint PATH]`.

Prints the module tree, parameter counts per module (trainable / frozen), totals and size by dtype,
the state_dict's keys, each top-level child's output shape, and gradient norms after one backward pass;
for a checkpoint, first which weights it holds (the moving average of --ema_decay, or the trained ones).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

import argparse  # noqa: E402

from project.models import build_backbone  # noqa: E402
from project.runtime.checkpoints import load_checkpoint_safely, load_classifier  # noqa: E402
from project.runtime.flags import Parser, UsageError, positive_int  # noqa: E402
from project.tools.finetune import freeze_feature_extractor  # noqa: E402
from project.tools.inspection import format_report, inspect_model, weights_shown  # noqa: E402


def parser() -> Parser:
    p = Parser(prog="inspect_model.py", description="Print what is inside a backbone or a trained checkpoint.")
    p.add_argument(
        "--backbone", default="simple_cnn", help="simple_cnn, resnet18, mobilenet_v3_small, timm/<name>, ..."
    )
    p.add_argument("--num_classes", "--num-classes", type=positive_int, default=8, help="outputs of the head")
    p.add_argument(
        "--image_size", "--image-size", type=positive_int, default=64, help="side of the dummy input images in pixels"
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="a trained .ckpt: its backbone, classes, image size and weights replace the flags above",
    )
    p.add_argument(
        "--freeze_backbone",
        "--freeze-backbone",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="freeze the feature extractor first, as training with --freeze_backbone does",
    )
    p.add_argument(
        "--full",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="list every state_dict entry (default: the first and last ones of a long list)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.checkpoint is not None:
            classifier = load_classifier(args.checkpoint)
            model = classifier.model
            hp = classifier.hparams
            num_classes, image_size = hp.num_classes, hp.image_size
            print(
                f"checkpoint {args.checkpoint}: backbone {hp.backbone}, {num_classes} classes "
                f"({', '.join(hp.class_names)}), image size {image_size}\n"
                f"{weights_shown(load_checkpoint_safely(args.checkpoint))}\n"
            )
        else:
            model = build_backbone(args.backbone, args.num_classes)
            num_classes, image_size = args.num_classes, args.image_size
        if args.freeze_backbone:
            freeze_feature_extractor(model)
        report = inspect_model(model, image_size, num_classes)
    # AssertionError: the size checks of ViTs (torchvision's and timm's) on a wrong --image_size
    except (UsageError, ValueError, RuntimeError, AssertionError) as error:
        print(f"inspect_model.py: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    print(format_report(report, full=args.full))
    return 0


if __name__ == "__main__":
    sys.exit(main())
