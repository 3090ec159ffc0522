"""mmload: mixed image/text training streams, batched five ways, as drop-in DataLoader collators.

Names are imported on first use (PEP 562), so ``from mmload import PaddedCollator`` loads the collators, not the
shard reader, webdataset or torchdata.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_WHERE = {
    # the sample schema
    "IGNORE_INDEX": "mmload.sample", "Modality": "mmload.sample", "Sample": "mmload.sample",
    # batch types, the model input and the one-copy staging
    "Batch": "mmload.batch", "BatchStats": "mmload.tensors", "EmbeddingBatch": "mmload.batch",
    "NestedBatch": "mmload.batch", "PaddedBatch": "mmload.batch", "PerSampleBatch": "mmload.batch",
    "ImageBatch": "mmload.layouts", "JaggedImages": "mmload.layouts", "JaggedText": "mmload.layouts",
    "TextBatch": "mmload.layouts",
    "PackedEmbeddings": "mmload.layouts", "ModelInput": "mmload.layouts",
    "PackedBatch": "mmload.staging", "pack": "mmload.staging",
    # collators and stages
    "EmbeddingCollator": "mmload.collate", "NestedCollator": "mmload.collate", "PaddedCollator": "mmload.collate",
    "PerSampleCollator": "mmload.collate", "BucketBatcher": "mmload.bucketing",
    "ModalityBucketBatchSampler": "mmload.bucketing", "MLMMasking": "mmload.masking",
    # strategies
    "STRATEGIES": "mmload.strategy", "Strategy": "mmload.strategy", "get_strategy": "mmload.strategy",
    # datasets and loaders
    "ShardDataset": "mmload.dataset", "BlendedDataset": "mmload.dataset", "open_data": "mmload.dataset",
    "Loader": "mmload.loader", "StatefulLoader": "mmload.loader", "make_collator": "mmload.loader",
    "make_loader": "mmload.loader", "EpochStream": "mmload.epochs",
    # reliability
    "Coverage": "mmload.coverage", "loader_errors": "mmload.coverage", "ErrorKind": "mmload.errors",
    "NoSamples": "mmload.errors", "SampleError": "mmload.errors", "TooManyErrors": "mmload.errors",
    "WorkerDied": "mmload.errors",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'mmload' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

