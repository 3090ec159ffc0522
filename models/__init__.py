"""The joint ViT-BERT model fed by every mmload batch type."""

from models.config import ModelConfig
from models.hf_init import config_from_hf_bert, config_from_hf_vit, load_hf_bert, load_hf_vit
from models.vit_bert import FREEZE_GROUPS, ModelOutput, ViTBERT

__all__ = ["FREEZE_GROUPS", "ModelConfig", "ModelOutput", "ViTBERT", "config_from_hf_bert", "config_from_hf_vit",
           "load_hf_bert", "load_hf_vit"]
