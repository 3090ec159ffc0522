"""CUDA-only checks of the transfer path (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from mmload import NestedCollator, PaddedCollator, PerSampleCollator, pack

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("collate", [PaddedCollator(), NestedCollator(pack=False), PerSampleCollator()])
def test_packed_batch_moves_in_one_copy_and_arrives_intact(collate, samples) -> None:
    batch = collate(samples)
    packed = pack(batch).pin_memory()
    assert packed.buffer.is_pinned()
    on_gpu = packed.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    for host, dev in zip(batch.tensors(), on_gpu.tensors()):
        assert dev.is_cuda and torch.equal(host, dev.cpu())
    base = packed.buffer.numel()
    assert all(t.untyped_storage().nbytes() == base for t in on_gpu.tensors())  # views of one device buffer


def test_dataloader_pin_thread_pins_custom_batches(samples) -> None:
    loader = DataLoader(samples, batch_size=8, collate_fn=NestedCollator(), pin_memory=True)
    for packed in loader:
        assert packed.buffer.is_pinned()
        assert packed.to("cuda", non_blocking=True).keys == packed.keys
    loader = DataLoader(samples, batch_size=8, collate_fn=PaddedCollator(), pin_memory=True)
    for batch in loader:
        assert all(t.is_pinned() for t in batch.tensors())
