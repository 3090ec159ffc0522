"""The architecture holds: one strategy registry, one model input of layouts, layers that only point down."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_samples

import mmload
from mmload.layouts import ModelInput, model_input
from mmload.loader import make_loader
from mmload.staging import PackedBatch
from mmload.strategy import REGISTRY, STRATEGIES, Strategy, get_strategy
from models import ModelConfig, ViTBERT

REPO = Path(__file__).resolve().parents[1]
BATCH_CLASSES = {"PaddedBatch", "PerSampleBatch", "NestedBatch", "EmbeddingBatch", "PackedBatch", "ImageBatch",
                 "TextBatch", "JaggedText", "PackedEmbeddings"}


def modules(package: str) -> dict[str, ast.Module]:
    root = REPO / package
    return {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): ast.parse(p.read_text())
            for p in sorted(root.rglob("*.py"))}


def imported(tree: ast.Module, module: str) -> set[str]:
    """Every module ``tree`` imports, at any depth (function-level imports count too)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if node.level == 0 else ".".join(module.split(".")[:-node.level] + [node.module])
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def test_the_library_never_imports_models() -> None:
    """Layers point down: models/ imports mmload/, never the reverse; only the command line (the top floor) may."""
    for name, tree in modules("mmload").items():
        if name == "mmload.cli":
            continue
        up = sorted(m for m in imported(tree, name) if m == "models" or m.startswith("models."))
        assert not up, f"{name} imports {up}"


def test_mmload_modules_import_no_cycle() -> None:
    trees = modules("mmload")
    graph = {name: {m for m in imported(tree, name) if m in trees and m != name} for name, tree in trees.items()}
    for name in graph:  # a package's own __init__ re-exporting its modules is not a cycle through them
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join([*path, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_importing_the_collators_loads_no_reader() -> None:
    code = ("import sys, mmload.collate, mmload.strategy, mmload.layouts; from mmload import PaddedCollator; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('webdataset', 'torchdata', 'braceexpand', "
            "'models') or m in ('mmload.dataset', 'mmload.loader', 'mmload.shards', 'mmload.shards.builtin')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert json.loads(out.stdout.replace("'", '"')) == []


def test_the_package_exports_what_the_readme_documents() -> None:
    for name in mmload.__all__:
        assert getattr(mmload, name) is not None, name
    documented = {"PerSampleCollator", "PaddedCollator", "NestedCollator", "EmbeddingCollator", "BucketBatcher",
                  "ModalityBucketBatchSampler", "ShardDataset", "BlendedDataset", "make_loader", "StatefulLoader",
                  "Sample", "pack", "BatchStats", "MLMMasking", "Coverage", "PackedBatch", "ModelInput", "Strategy",
                  "SampleError", "TooManyErrors", "WorkerDied"}
    assert documented <= set(mmload.__all__)
    assert not [n for n in mmload.__all__ if n.startswith("_")]
    with pytest.raises(AttributeError, match="no attribute"):
        mmload.read_shard  # noqa: B018 - an internal of the reader, not exported


def strategy_name_uses(tree: ast.Module) -> list[tuple[int, str]]:
    """Where a strategy's name is tested or looked up: a comparison (``==``, ``in``), a ``match`` case, a subscript
    (``d["nested"]``) or a ``startswith``/``endswith``/``get`` argument. A default value or a message is not."""
    names, out = set(STRATEGIES), []

    def named(node: ast.AST) -> set[str]:
        if isinstance(node, ast.Constant) and node.value in names:
            return {node.value}
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            return {e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in names}
        return set()

    for node in ast.walk(tree):
        found: set[str] = set()
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                found |= named(side)
        elif isinstance(node, ast.MatchValue):
            found |= named(node.value)
        elif isinstance(node, ast.Subscript):
            found |= named(node.slice)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("startswith", "endswith", "get"):
            for arg in node.args:
                found |= named(arg)
        out += [(node.lineno, name) for name in found]
    return out


def test_no_strategy_name_is_compared_outside_the_registry() -> None:
    """``strategy == "nested"`` and the like belong in mmload/strategy.py only; everyone else asks the registry."""
    hits = [f"{module}:{line} uses {name!r}" for package in ("mmload", "models", "bench")
            for module, tree in modules(package).items() if module != "mmload.strategy"
            for line, name in strategy_name_uses(tree)]
    assert not hits, hits
    probe = ast.parse('if s == "nested": pass\nmatch s:\n    case "padded": pass\nd["bucketed"]\n'
                      's.startswith("per-sample")\nx = {"strategy": "padded"}\ndef f(s="padded"): pass\n')
    assert sorted(strategy_name_uses(probe)) == [(1, "nested"), (3, "padded"), (4, "bucketed"), (5, "per-sample")]


def test_models_and_bench_never_test_batch_classes() -> None:
    def classes(node: ast.AST) -> set[str]:
        return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | \
            {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}

    for package in ("models", "bench"):
        for module, tree in modules(package).items():
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
                    hit = classes(node.args[1]) & BATCH_CLASSES
                    assert not hit, f"{module}:{node.lineno} tests the batch class {hit}"


@pytest.mark.parametrize("name", [s.name for s in REGISTRY.values() if s.has_raw_inputs])
def test_every_batch_of_every_strategy_packed_or_not_is_one_model_input(name: str) -> None:
    strategy = get_strategy(name)
    samples = make_samples(12, paired_every=5)
    model = ViTBERT(ModelConfig.preset("tiny", vocab_size=100)).eval()
    for pack in (False, True):
        for group in strategy.group(samples, 6):
            batch = strategy.collator(pack=pack)(group)
            assert isinstance(batch, mmload.Batch) and len(batch.keys) == len(group)
            inp = model_input(batch)
            assert isinstance(inp, ModelInput)
            rows = sorted(int(i) for leaf in inp.leaves() for part in (leaf.image, leaf.text) if part is not None
                          for i in part.index)
            want = sorted(i for i, s in enumerate(group) for _ in range(s.has_image + s.has_text))
            assert rows == want  # every side of every sample once, under its position in the collated list
            with torch.no_grad():  # the model takes the batch as it comes: a PackedBatch needs no unpacking first
                direct = model(batch)
                moved = model(batch.to("cpu"))
            for task in ("image", "mlm"):
                assert torch.equal(getattr(direct, f"{task}_index"), getattr(moved, f"{task}_index"))
                torch.testing.assert_close(getattr(direct, f"{task}_logits"), getattr(moved, f"{task}_logits"))
            if pack:
                assert isinstance(batch, PackedBatch) and batch.stats().tensors == 1


def test_a_new_strategy_is_one_object(builtin_shards: list[str]) -> None:
    """A strategy the registry does not know: batches of int16 ids, packed, in buckets. The loader, the model and
    evaluation take it as they take the registered ones."""
    mine = Strategy("bucketed-int16-packed", "bucketed, ids as int16, one buffer",
                    lambda pack, ids_dtype: REGISTRY["padded"].collator(pack=True, ids_dtype=torch.int16),
                    batcher_factory=REGISTRY["bucketed"].batcher_factory)
    loader = make_loader(mine, builtin_shards[:2], batch_size=8, num_workers=0, image_size=32, max_text_len=64)
    batches = list(loader)
    assert all(isinstance(b, PackedBatch) for b in batches) and sum(len(b.keys) for b in batches) == 80
    model = ViTBERT(ModelConfig.preset("tiny", vocab_size=len(loader.dataset.tokenizer))).eval()
    with torch.no_grad():
        out = model(batches[0])
    assert out.image_logits.shape[0] + out.mlm_index.unique().numel() > 0
    with pytest.raises(ValueError, match="unknown strategy 'nope'; choose one of per-sample, padded"):
        get_strategy("nope")


def test_the_model_reads_layouts_and_says_where_a_batch_must_go() -> None:
    images_only = [s for s in make_samples(9) if s.modality == "image"]
    assert get_strategy("nested").collator()(images_only).model_input().packed  # nested: one packed call
    assert not get_strategy("padded").collator()(images_only).model_input().packed
    model = ViTBERT(ModelConfig.preset("tiny", vocab_size=100)).to("meta")
    with pytest.raises(ValueError, match="the batch is on cpu, the model on meta: move it with batch.to"):
        model(get_strategy("nested").collator()(images_only))
    assert mmload.loader_errors({"a": [{"stage": "decode", "errors": {"image_decode": 2}}]}) == {"image_decode": 2}
