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
from mmload.coverage import Coverage, loader_errors
from mmload.dataset import BlendedDataset, ShardDataset, open_data
from mmload.errors import ErrorKind, SampleError, TooManyErrors, WorkerDied
from mmload.loader import STRATEGIES, StatefulLoader, make_collator, make_loader
from mmload.masking import MLMMasking
from mmload.sample import IGNORE_INDEX, Modality, Sample
from mmload.staging import PackedBatch, pack

__version__ = "0.1.0"

__all__ = [
    "IGNORE_INDEX",
    "BatchStats",
    "BlendedDataset",
    "BucketBatcher",
    "Coverage",
    "EmbeddingBatch",
    "EmbeddingCollator",
    "ErrorKind",
    "ImageBatch",
    "JaggedText",
    "MLMMasking",
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
    "STRATEGIES",
    "SampleError",
    "ShardDataset",
    "StatefulLoader",
    "TextBatch",
    "TooManyErrors",
    "WorkerDied",
    "loader_errors",
    "make_collator",
    "make_loader",
    "open_data",
    "pack",
]
