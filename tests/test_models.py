"""Backbones: output shapes, parameter counts, registry, and pretrained weights that fail clearly offline."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision
import torchvision.models._api

from project.models import SimpleCNN, available_backbones, build_backbone, register_backbone
from project.models.backbones import BACKBONES


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size", [32, 64, 100])
def test_simple_cnn_takes_any_size_from_32(size):
    model = build_backbone("simple_cnn", num_classes=7).eval()
    assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_simple_cnn_parameter_count_follows_its_layers():
    width, classes = 16, 5
    model = SimpleCNN(classes, width=width)
    expected, c_in = 0, 3
    for i in range(4):
        c_out = width * 2**i
        expected += c_in * c_out * 9 + 2 * c_out  # conv kernel (no bias) + batch-norm scale and shift
        c_in = c_out
    expected += c_in * classes + classes  # linear head
    assert n_params(model) == expected


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_backbones_get_a_new_head(name):
    model = build_backbone(name, num_classes=9).eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 9)


def test_resnet18_is_torchvisions_architecture():
    # 11,689,512 is the count torchvision documents for ResNet-18 with the 1000-class head
    assert n_params(build_backbone("resnet18", num_classes=1000)) == 11_689_512


def test_registry_accepts_new_models_and_rejects_unknown_names():
    @register_backbone("tiny_linear")
    def tiny_linear(num_classes: int, pretrained: bool = False) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(num_classes))

    try:
        assert "tiny_linear" in available_backbones()
        assert build_backbone("tiny_linear", 3)(torch.randn(2, 3, 8, 8)).shape == (2, 3)
    finally:
        BACKBONES.pop("tiny_linear")
    with pytest.raises(ValueError, match="unknown backbone 'nope'.*resnet18"):
        build_backbone("nope", 3)


def test_pretrained_fails_clearly_when_weights_cannot_be_fetched(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: the weights must be fetched

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(ConnectionError, match=r"--pretrained: could not fetch the resnet18 weights.*resnet18-"):
        build_backbone("resnet18", num_classes=4, pretrained=True)
    with pytest.raises(ValueError, match="simple_cnn has no pretrained weights"):
        build_backbone("simple_cnn", num_classes=4, pretrained=True)


def test_backbones_are_built_without_weights(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a default build must not fetch weights")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_download)
    assert isinstance(build_backbone("resnet18", 3), torchvision.models.ResNet)
