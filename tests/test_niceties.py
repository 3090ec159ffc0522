"""What users of a loader expect beyond batches: len() where it is known, a short repr, and a dtype cast that leaves
token ids alone."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_samples

from mmload import ShardDataset
from mmload.loader import make_collator, make_loader
from mmload.strategy import STRATEGIES, get_strategy


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_batch_prints_as_shapes_and_dtypes_not_values(strategy: str) -> None:
    samples = make_samples(64, paired_every=5, image_size=64)
    if not get_strategy(strategy).has_raw_inputs:
        samples = [s.__class__(s.key, s.modality, emb=torch.randn(4, 8, dtype=torch.float16), label=s.label)
                   for s in samples]
    batch = make_collator(strategy)(samples)
    text = repr(batch)
    assert len(text) < 700 and "tensor(" not in text and type(batch).__name__ in text
    assert "uint8" in text or "float16" in text or "items=[64 PaddedBatch]" in text  # per-sample: a list


def test_to_a_dtype_casts_floating_tensors_only() -> None:
    batch = make_collator("padded", ids_dtype=torch.int64)(make_samples(16, paired_every=5))
    batch.text.ids[0, 1] = 2482  # bfloat16 would make it 2480
    cast = batch.to(torch.bfloat16)
    assert cast.text.ids.dtype == torch.int64 and int(cast.text.ids[0, 1]) == 2482
    assert cast.image.pixels.dtype == torch.uint8 and cast.text.mask.dtype == torch.bool
    emb = make_collator("embeddings")([s.__class__(s.key, s.modality, emb=torch.randn(8), label=s.label)
                                       for s in make_samples(4)])
    moved = emb.to("cpu", torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in moved.tensors() if t.is_floating_point())
    assert any(t.is_floating_point() for t in moved.tensors())
    packed = make_collator("nested")(make_samples(8))
    assert packed.to(dtype=torch.float16).text.values.dtype == packed.unpack().text.values.dtype  # ids stay ids
    with pytest.raises(TypeError, match="device and/or a dtype"):
        batch.to(3.5)


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_len_of_a_dataset_and_of_a_fixed_batch_loader_is_what_an_epoch_yields(builtin_shards: list[str],
                                                                             workers: int) -> None:
    dataset = ShardDataset(builtin_shards, image_size=16)
    assert len(dataset) == 300 == len(list(dataset))
    ranks = [ShardDataset(builtin_shards, image_size=16, rank=r, world_size=3, shuffle=True) for r in range(3)]
    assert sum(len(d) for d in ranks) == 300 and [len(d) for d in ranks] == [len(list(d)) for d in ranks]
    loader = make_loader("padded", builtin_shards, batch_size=16, num_workers=workers, image_size=16)
    assert len(loader) == len(list(loader))
    bucketed = make_loader("bucketed", builtin_shards, batch_size=16, num_workers=workers, image_size=16)
    with pytest.raises(TypeError, match=r"len\(loader.dataset\)"):
        len(bucketed)
    assert len(bucketed.dataset) == 300


def test_len_without_sample_counts_is_a_type_error_that_says_why(builtin_shards: list[str], tmp_path: Path) -> None:
    for shard in builtin_shards[:2]:
        shutil.copy(shard, tmp_path)
    dataset = ShardDataset(str(tmp_path), image_size=16, tokenizer=ShardDataset(builtin_shards).tokenizer)
    with pytest.raises(TypeError, match="needs each shard's sample count"):
        len(dataset)
    assert len(list(dataset)) == 80  # iterating never needs it


def test_the_readme_example_runs_on_the_cpu(builtin_shards: list[str], monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture) -> None:
    """The README's first Python example, unchanged but for its data (the test's shards) and two batches."""
    import itertools

    import mmload.make_shards

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'device = "cuda" if torch.cuda.is_available() else "cpu"' in code
    monkeypatch.setattr(mmload.make_shards, "cached_builtin_shards", lambda: builtin_shards)
    code = code.replace("for packed in loader:", "for packed in itertools.islice(loader, 2):")
    exec(compile(code, "README.md", "exec"), {"itertools": itertools})
    out = capsys.readouterr().out
    assert out.startswith("300 samples") and out.count("PackedBatch(") == 2
