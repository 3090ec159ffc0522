"""mmload: mixed image/text training streams, batched five ways, as drop-in DataLoader collators."""

from mmload.batch import (
    BatchStats,
    EmbeddingBatch,
    ImageBatch,
    JaggedText,
    NestedBatch,
    PaddedBatch,
    PerSampleBatch,
    TextBatch,
)
from mmload.bucketing import BucketBatcher, ModalityBucketBatchSampler
from mmload.collate import EmbeddingCollator, NestedCollator, PaddedCollator, PerSampleCollator
from mmload.dataset import BlendedDataset, ShardDataset, open_data
from mmload.errors import ErrorKind, SampleError, TooManyErrors
from mmload.sample import IGNORE_INDEX, Modality, Sample
from mmload.staging import PackedBatch, pack

__version__ = "0.1.0"

__all__ = [
    "IGNORE_INDEX",
    "BatchStats",
    "BlendedDataset",
    "BucketBatcher",
    "EmbeddingBatch",
    "EmbeddingCollator",
    "ErrorKind",
    "ImageBatch",
    "JaggedText",
    "Modality",
    "ModalityBucketBatchSampler",
    "NestedBatch",
    "NestedCollator",
    "PackedBatch",
    "PaddedBatch",
    "PaddedCollator",
    "PerSampleBatch",
    "PerSampleCollator",
    "Sample",
    "SampleError",
    "ShardDataset",
    "TextBatch",
    "TooManyErrors",
    "open_data",
    "pack",
]
