"""Everything about data: the Dataset, transforms, the sources, the DataModule and the built-in dataset."""

from project.data.builtin import generate_shapes
from project.data.datamodule import ImageDataModule
from project.data.folder import IMG_EXTENSIONS, ImageFolderDataset
from project.data.sources import (
    DataSource,
    DecodedCacheSource,
    EncodedJpegSource,
    ImageFolderSource,
    OwnDatasetsSource,
    StreamingSource,
)
from project.data.streaming import is_streaming_source
