"""Backbones (plain nn.Modules, in a registry) and the LightningModule that trains them."""

from project.models.backbones import BACKBONES, SimpleCNN, available_backbones, build_backbone, register_backbone
from project.models.classifier import ImageClassifier
