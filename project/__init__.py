"""An image-classification template built on PyTorch Lightning that keeps the accelerator fed."""

__version__ = "0.1.0"
