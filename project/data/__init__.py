"""Everything about data: the Dataset, transforms, the DataModule and the built-in dataset."""

from project.data.builtin import generate_shapes
from project.data.datamodule import ImageDataModule
from project.data.files import ImageFileDataset
from project.data.folder import IMG_EXTENSIONS, ImageFolderDataset
from project.data.streaming import is_streaming_source, optimize_datamodule

__all__ = [
    "IMG_EXTENSIONS",
    "ImageDataModule",
    "ImageFileDataset",
    "ImageFolderDataset",
    "generate_shapes",
    "is_streaming_source",
    "optimize_datamodule",
]
