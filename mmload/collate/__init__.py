"""Drop-in ``DataLoader`` collators, one per batching strategy."""

from mmload.collate.embeddings import EmbeddingCollator
from mmload.collate.nested import NestedCollator
from mmload.collate.padded import PaddedCollator
from mmload.collate.per_sample import PerSampleCollator

__all__ = ["EmbeddingCollator", "NestedCollator", "PaddedCollator", "PerSampleCollator"]
