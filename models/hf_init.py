"""Initialize ViTBERT from local Hugging Face BERT and ViT checkpoints (no download).

The text tokenizer and the shared encoder take a BERT checkpoint (post-LN: build the model with
``config_from_hf_bert``); the image tokenizer and the shared encoder take a ViT checkpoint (pre-LN). The encoder
is shared, so loading one after the other overwrites the encoder with the second checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from models.config import ModelConfig
from models.vit_bert import ViTBERT, resize_positions

PathLike = str | os.PathLike


def config_from_hf_bert(path: PathLike, **overrides: Any) -> ModelConfig:
    """A post-LN ModelConfig with the widths, heads, vocabulary and eps of the BERT checkpoint at ``path``."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(path)
    fields = dict(n_layer=hf.num_hidden_layers, n_head=hf.num_attention_heads, d_model=hf.hidden_size,
                  d_mlp=hf.intermediate_size, vocab_size=hf.vocab_size, max_text_len=hf.max_position_embeddings,
                  type_vocab_size=hf.type_vocab_size, layer_norm_eps=hf.layer_norm_eps,
                  pad_id=hf.pad_token_id or 0, norm_first=False)
    return ModelConfig(**{**fields, **overrides})


def config_from_hf_vit(path: PathLike, **overrides: Any) -> ModelConfig:
    """A pre-LN ModelConfig matching the ViT checkpoint at ``path`` (mean/std from its preprocessor config)."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(path)
    fields: dict[str, Any] = dict(n_layer=hf.num_hidden_layers, n_head=hf.num_attention_heads,
                                  d_model=hf.hidden_size, d_mlp=hf.intermediate_size, image_size=hf.image_size,
                                  patch_size=hf.patch_size, layer_norm_eps=hf.layer_norm_eps, norm_first=True)
    preprocessor = Path(path) / "preprocessor_config.json"
    if preprocessor.is_file():
        pre = json.loads(preprocessor.read_text())
        if "image_mean" in pre and "image_std" in pre:
            fields.update(image_mean=tuple(pre["image_mean"]), image_std=tuple(pre["image_std"]))
    return ModelConfig(**{**fields, **overrides})


def _check(model: ViTBERT, what: str, hf_config: Any, norm_first: bool) -> None:
    c = model.config
    ours = (c.n_layer, c.n_head, c.d_model, c.d_mlp)
    theirs = (hf_config.num_hidden_layers, hf_config.num_attention_heads, hf_config.hidden_size,
              hf_config.intermediate_size)
    if ours != theirs:
        raise ValueError(f"{what} checkpoint has (n_layer, n_head, d_model, d_mlp) = {theirs}, the model {ours}; "
                         f"build the model from config_from_{what.lower()}(path)")
    if c.norm_first != norm_first:
        raise ValueError(f"{what} blocks are {'pre' if norm_first else 'post'}-LN but the model has "
                         f"norm_first={c.norm_first}; set norm_first={norm_first}")
    if getattr(hf_config, "hidden_act", "gelu") != "gelu":
        raise ValueError(f"{what} checkpoint uses hidden_act={hf_config.hidden_act!r}; the model implements 'gelu'")


def _copy(model: ViTBERT, pairs: dict[str, torch.Tensor]) -> list[str]:
    with torch.no_grad():
        for name, value in pairs.items():
            param = model.get_parameter(name)
            if param.shape != value.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} != model shape {tuple(param.shape)}")
            param.copy_(value)
    return list(pairs)


def _linear(pairs: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], ours: str, theirs: str) -> None:
    pairs[f"{ours}.weight"] = sd[f"{theirs}.weight"]
    bias = sd.get(f"{theirs}.bias")  # ViT with qkv_bias=False has none
    pairs[f"{ours}.bias"] = bias if bias is not None else torch.zeros(sd[f"{theirs}.weight"].shape[0])


def load_hf_bert(model: ViTBERT, path: PathLike) -> list[str]:
    """Copy a local BERT checkpoint into the text tokenizer and the shared encoder; returns the names loaded.

    A model with fewer text positions than the checkpoint takes the first ``max_text_len`` of them.
    """
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(path)
    hc = hf.config
    _check(model, "HF_BERT", hc, norm_first=False)
    c = model.config
    if getattr(hc, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"position_embedding_type={hc.position_embedding_type!r}; only 'absolute' is supported")
    if (c.vocab_size, c.type_vocab_size) != (hc.vocab_size, hc.type_vocab_size):
        raise ValueError(f"model (vocab_size, type_vocab_size) = {(c.vocab_size, c.type_vocab_size)} != checkpoint's "
                         f"{(hc.vocab_size, hc.type_vocab_size)}; use config_from_hf_bert(path)")
    if c.max_text_len > hc.max_position_embeddings:
        raise ValueError(f"max_text_len={c.max_text_len} exceeds the checkpoint's {hc.max_position_embeddings} "
                         f"positions; lower max_text_len")
    sd = hf.state_dict()
    pairs = {
        "text.wte.weight": sd["embeddings.word_embeddings.weight"],
        "text.wpe.weight": sd["embeddings.position_embeddings.weight"][: c.max_text_len],
        "text.wtt.weight": sd["embeddings.token_type_embeddings.weight"],
        "text.ln.weight": sd["embeddings.LayerNorm.weight"],
        "text.ln.bias": sd["embeddings.LayerNorm.bias"],
    }
    for i in range(c.n_layer):
        ours, theirs = f"encoder.blocks.{i}", f"encoder.layer.{i}"
        for a, b in (("attn.q", "attention.self.query"), ("attn.k", "attention.self.key"),
                     ("attn.v", "attention.self.value"), ("attn.proj", "attention.output.dense"),
                     ("ln_1", "attention.output.LayerNorm"), ("mlp.fc", "intermediate.dense"),
                     ("mlp.proj", "output.dense"), ("ln_2", "output.LayerNorm")):
            _linear(pairs, sd, f"{ours}.{a}", f"{theirs}.{b}")
    return _copy(model, pairs)


# ViTModel parameter names per block: transformers >= 5 first, then the 4.x layout
_VIT_LAYOUTS = (
    ("layers.{i}", (("attn.q", "attention.q_proj"), ("attn.k", "attention.k_proj"), ("attn.v", "attention.v_proj"),
                    ("attn.proj", "attention.o_proj"), ("ln_1", "layernorm_before"), ("ln_2", "layernorm_after"),
                    ("mlp.fc", "mlp.fc1"), ("mlp.proj", "mlp.fc2"))),
    ("encoder.layer.{i}", (("attn.q", "attention.attention.query"), ("attn.k", "attention.attention.key"),
                           ("attn.v", "attention.attention.value"), ("attn.proj", "attention.output.dense"),
                           ("ln_1", "layernorm_before"), ("ln_2", "layernorm_after"),
                           ("mlp.fc", "intermediate.dense"), ("mlp.proj", "output.dense"))),
)


def load_hf_vit(model: ViTBERT, path: PathLike) -> list[str]:
    """Copy a local ViT checkpoint into the image tokenizer and the shared encoder; returns the names loaded.

    Position embeddings of another grid size are resized bicubically to the model's ``image_size``.
    """
    from transformers import ViTModel

    hf = ViTModel.from_pretrained(path, add_pooling_layer=False)
    hc = hf.config
    _check(model, "HF_ViT", hc, norm_first=True)
    c = model.config
    if (hc.patch_size, hc.num_channels) != (c.patch_size, 3):
        raise ValueError(f"checkpoint patch_size={hc.patch_size}, num_channels={hc.num_channels}; the model needs "
                         f"patch_size={c.patch_size} and 3 channels")
    sd = hf.state_dict()
    grid = c.image_size // c.patch_size
    pos = sd["embeddings.position_embeddings"]  # (1, 1 + g*g, D)
    if pos.shape[1] != 1 + grid * grid:
        pos = resize_positions(pos, grid, grid)
    pairs = {
        "image.patch.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "image.patch.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "image.cls": sd["embeddings.cls_token"],
        "image.pos": pos,
        "encoder.ln_f.weight": sd["layernorm.weight"],
        "encoder.ln_f.bias": sd["layernorm.bias"],
    }
    prefix, names = next(((p, n) for p, n in _VIT_LAYOUTS if f"{p.format(i=0)}.layernorm_before.weight" in sd),
                         (None, None))
    if prefix is None:
        raise ValueError(f"unrecognized ViTModel parameter names, e.g. {sorted(sd)[:8]}")
    for i in range(c.n_layer):
        for a, b in names:
            _linear(pairs, sd, f"encoder.blocks.{i}.{a}", f"{prefix.format(i=i)}.{b}")
    return _copy(model, pairs)
