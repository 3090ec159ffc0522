"""Our tokenizers + shared encoder reproduce Hugging Face BERT and ViT hidden states after hf_init loading."""

from __future__ import annotations

import os

import pytest
import torch

from models import ModelConfig, ViTBERT, config_from_hf_bert, load_hf_bert, load_hf_vit

transformers = pytest.importorskip("transformers")

SENTENCES = [
    "A dog runs across the beach.",
    "The quick brown fox jumps over the lazy dog while the cat watches from a sunny window sill.",
    "Hi",
    "Unified foundation models share one encoder between pixels and word pieces.",
]
ATOL = 1e-4


@pytest.fixture(scope="module")
def bert_pair(minilm: str) -> tuple[ViTBERT, torch.nn.Module, dict]:
    ours = ViTBERT(config_from_hf_bert(minilm, num_classes=3)).eval()
    loaded = load_hf_bert(ours, minilm)
    assert len(loaded) == 5 + 16 * ours.config.n_layer
    theirs = transformers.AutoModel.from_pretrained(minilm).eval()
    tokens = transformers.AutoTokenizer.from_pretrained(minilm)(SENTENCES, padding=True, return_tensors="pt")
    return ours, theirs, tokens


def test_config_from_hf_bert(minilm: str) -> None:
    c = config_from_hf_bert(minilm, max_text_len=128)
    assert (c.n_layer, c.n_head, c.d_model, c.d_mlp, c.vocab_size) == (6, 12, 384, 1536, 30522)
    assert c.norm_first is False and c.layer_norm_eps == 1e-12 and c.max_text_len == 128


@torch.no_grad()
def test_bert_padded_matches_hf(bert_pair: tuple) -> None:
    ours, theirs, tokens = bert_pair
    mask = tokens["attention_mask"].bool()  # (B, T)
    assert len(set(mask.sum(1).tolist())) == len(SENTENCES), "sentences should differ in length"
    expected = theirs(**tokens).last_hidden_state  # (B, T, D)
    got = ours.encode_text(tokens["input_ids"].to(torch.int32), mask)  # ids travel as int32
    diff = (got - expected)[mask].abs().max().item()  # padding positions are never used
    print(f"BERT padded max abs diff {diff:.3g}")
    assert diff < ATOL


@torch.no_grad()
def test_bert_jagged_matches_hf(bert_pair: tuple) -> None:
    ours, theirs, tokens = bert_pair
    mask = tokens["attention_mask"].bool()  # (B, T)
    lengths = mask.sum(1)  # (B,)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])  # (B+1,)
    got = ours.encode_text_packed(tokens["input_ids"][mask], offsets, int(lengths.max()))  # (sum T, D)
    expected = theirs(**tokens).last_hidden_state[mask]  # (sum T, D), row-major = packed order
    diff = (got - expected).abs().max().item()
    print(f"BERT jagged max abs diff {diff:.3g}")
    assert diff < ATOL


def test_bert_shape_mismatch_is_refused(minilm: str) -> None:
    with pytest.raises(ValueError, match="norm_first"):
        load_hf_bert(ViTBERT(config_from_hf_bert(minilm, norm_first=True)), minilm)
    with pytest.raises(ValueError, match="config_from_hf_bert"):
        load_hf_bert(ViTBERT(ModelConfig.preset("tiny", vocab_size=30522, norm_first=False)), minilm)


def _tiny_vit(tmp_path: os.PathLike) -> tuple[str, torch.nn.Module]:
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, image_size=32, patch_size=8)
    torch.manual_seed(0)  # transformers initializes from the global generator; this test owns it
    vit = transformers.ViTModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():  # move LayerNorms and biases off their 1/0 init so a wrong mapping cannot pass
        for p in vit.parameters():
            p.add_(0.02 * torch.randn_like(p))
    vit.save_pretrained(tmp_path)
    return str(tmp_path), vit


@torch.no_grad()
@pytest.mark.parametrize("size", [32, 48])
def test_vit_matches_hf(tmp_path: os.PathLike, size: int) -> None:
    path, vit = _tiny_vit(tmp_path)
    ours = ViTBERT(ModelConfig(n_layer=2, n_head=4, d_model=64, d_mlp=128, image_size=32, patch_size=8,
                               vocab_size=100, max_text_len=16, layer_norm_eps=1e-12, image_mean=(0.5,) * 3,
                               image_std=(0.5,) * 3)).eval()
    load_hf_vit(ours, path)
    pixels = torch.randint(0, 256, (3, 3, size, size), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    expected = vit(pixel_values=(pixels.float() / 255 - 0.5) / 0.5,
                   interpolate_pos_encoding=size != 32).last_hidden_state  # (N, 1+P, D)
    got = ours.encode_images(pixels)  # (N, 1+P, D)
    assert got.shape == expected.shape == (3, 1 + (size // 8) ** 2, 64)
    diff = (got - expected).abs().max().item()
    print(f"ViT {size}px max abs diff {diff:.3g}")
    assert diff < ATOL
