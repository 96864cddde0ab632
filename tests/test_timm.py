"""timm backbones (the `timm` extra): a training step, the head that fine-tuning keeps, the size preflight,
inspect_model.py, one-line errors, and no download without --pretrained. Skipped where timm is absent,
except the checks that need it absent."""

from __future__ import annotations

import ast
import sys

import lightning as L
import pytest
import torch

from project.data import ImageDataModule
from project.models import ImageClassifier, available_backbones, build_backbone
from project.models.backbones import head_name
from project.runtime.flags import UsageError, check_image_size
from project.tools.finetune import freeze_feature_extractor
from tests.conftest import ROOT, load_script


@pytest.fixture
def timm():
    return pytest.importorskip("timm")


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert text and "\n" not in text, text
    return text


def test_without_timm_the_error_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # what `import timm` meets where timm is not installed
    with pytest.raises(ValueError) as error:
        build_backbone("timm/resnet10t", num_classes=3)
    assert 'pip install -e ".[timm]"' in one_line(error) and "timm/resnet10t" in one_line(error)


def test_core_never_imports_timm_at_module_level():
    """The quick start does not pay for timm's import: only a function body may import it."""
    for path in (ROOT / "project").rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "timm" for n in names), f"{path}: module-level import of timm"
    assert not any(name.startswith("timm/") for name in available_backbones())  # routed by prefix, never listed


def test_ci_installs_the_timm_extra():
    """CI runs the README's test command, which installs timm, so the tests below run there."""
    command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert command == 'pip install -e ".[dev,timm]" && python -m pytest'
    assert command in (ROOT / "README.md").read_text()


def test_timm_model_trains_a_step(timm, tiny_shapes):
    L.seed_everything(0, verbose=False)
    dm = ImageDataModule(data_dir=tiny_shapes, image_size=32, batch_size=16, num_workers=0)
    model = ImageClassifier(
        backbone="timm/resnet10t", num_classes=len(dm.classes), class_names=dm.classes, **dm.preprocessing
    )
    assert isinstance(model.model, timm.models.ResNet) and model.model.get_classifier().out_features == len(dm.classes)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    trainer = L.Trainer(
        fast_dev_run=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    changed = {k for k, v in model.model.state_dict().items() if not torch.equal(v, before[k])}
    assert {"fc.weight", "conv1.0.weight"} <= changed  # the head and the stem both learned


# resnet10t's head is a Linear; dla46x_c's is a 1x1 convolution, with no nn.Linear anywhere in the model
@pytest.mark.parametrize("name", ["timm/resnet10t", "timm/dla46x_c"])
def test_freeze_leaves_only_timm_classifier_trainable(timm, name):
    model = build_backbone(name, num_classes=5)
    head = head_name(model)
    assert model.get_submodule(head) is model.get_classifier()
    freeze_feature_extractor(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"{head}.weight", f"{head}.bias"}


def test_unknown_timm_name_is_one_line_with_close_names(timm):
    with pytest.raises(ValueError) as error:
        build_backbone("timm/resnet10", num_classes=3)
    assert "unknown timm model 'resnet10'" in one_line(error) and "timm/resnet10t" in one_line(error)


def test_image_size_preflight_refuses_a_vit_at_the_wrong_size(timm):
    model = ImageClassifier(backbone="timm/vit_tiny_patch16_224", num_classes=3, image_size=64)
    with pytest.raises(UsageError) as error:
        check_image_size(model, 64)
    assert "--backbone timm/vit_tiny_patch16_224 cannot take --image_size 64" in one_line(error)


def test_inspect_model_shows_a_timm_model(timm, capsys):
    script = load_script("inspect_model")
    assert script.main(["--backbone", "timm/resnet10t", "--num_classes", "3", "--freeze_backbone"]) == 0
    assert "fc.weight" in capsys.readouterr().out
    assert script.main(["--backbone", "timm/vit_tiny_patch16_224", "--image_size", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "64" in err[0], err


@pytest.fixture
def downloads(timm, monkeypatch) -> list[tuple]:
    """Every weight fetch timm attempts, each failing as it does offline (the real one retries for a minute)."""
    calls: list[tuple] = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise OSError("Name or service not known")

    monkeypatch.setattr("timm.models._hub.hf_hub_download", offline)  # the Hub: where timm's weights live
    monkeypatch.setattr("timm.models._hub.download_url_to_file", offline)  # older weights: plain URLs
    monkeypatch.setattr("timm.models._builder.load_state_dict_from_url", offline)
    return calls


def test_nothing_is_downloaded_without_pretrained(downloads):
    build_backbone("timm/resnet10t", num_classes=3)
    assert downloads == []


def test_pretrained_offline_is_one_line(downloads):
    with pytest.raises(ConnectionError) as error:
        build_backbone("timm/resnet10t", num_classes=3, pretrained=True)
    assert downloads, "timm fetched its weights some other way: patch that in `downloads`"
    text = one_line(error)
    assert (
        text.startswith("--pretrained: could not fetch the timm/resnet10t weights") and "without --pretrained" in text
    )
