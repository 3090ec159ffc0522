"""mmload checkpoints: one self-contained file per save (model config, weights, tokenizer), written atomically.

A checkpoint is a dict saved with ``torch.save``. Every checkpoint has ``format``, ``config`` (the
``ModelConfig`` fields), ``model`` (the state dict of the bare model: no DDP ``module.`` or compile prefixes) and
``tokenizer`` (the fast tokenizer's JSON and special tokens, or None); a training checkpoint adds optimizer,
scheduler, step, RNG, gradient-mask and loader state (see ``models.loop``). ``load_model`` reads the first part
only, so a training checkpoint doubles as a model file (``mmload precompute --encoder``, ``--image-teacher``).

NOTE [atomic writes]: the file is written to a temporary sibling and renamed over the target (``os.replace`` is
atomic on POSIX), so a crash mid-save leaves the previous checkpoint intact and never a truncated one.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import torch

from models.config import ModelConfig
from models.vit_bert import ViTBERT

FORMAT = "mmload-checkpoint/1"
NAME = "checkpoint-{step:07d}.pt"
_NAME_RE = re.compile(r"checkpoint-(\d+)\.pt")


def tokenizer_state(tokenizer: Any) -> dict[str, Any] | None:
    """A fast tokenizer as plain data (its tokenizers JSON and special tokens); None for anything else."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return {"json": backend.to_str(), "special_tokens": dict(tokenizer.special_tokens_map)}


def tokenizer_from_state(state: dict[str, Any] | None) -> Any:
    if state is None:
        return None
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(state["json"]), **state["special_tokens"])


def model_state(model: ViTBERT, tokenizer: Any = None) -> dict[str, Any]:
    """The model part of a checkpoint: format, config, weights, tokenizer."""
    return {"format": FORMAT, "config": dataclasses.asdict(model.config), "model": model.state_dict(),
            "tokenizer": tokenizer_state(tokenizer)}


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """``torch.save(state)`` to ``path`` atomically (see NOTE [atomic writes]); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def checkpoints(folder: str | Path) -> list[Path]:
    """Every ``checkpoint-STEP.pt`` in ``folder``, oldest step first."""
    found = [(int(m.group(1)), p) for p in Path(folder).glob("checkpoint-*.pt") if (m := _NAME_RE.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(folder: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints of ``folder`` (``keep`` 0: keep all); returns what went."""
    gone = checkpoints(folder)[:-keep] if keep > 0 else []
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def drop_checkpoints_after(folder: str | Path, step: int) -> list[Path]:
    """Delete the checkpoints of ``folder`` past ``step``: a run resumed from ``step`` into the folder goes another
    way from there, and ``--resume FOLDER`` (its latest) or ``--keep-checkpoints`` must not take the old ones."""
    gone = [p for p in checkpoints(folder) if int(_NAME_RE.fullmatch(p.name).group(1)) > step]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def remove_partial_saves(folder: str | Path) -> list[Path]:
    """Delete the temporary files a save that was killed left behind (NOTE [atomic writes])."""
    gone = sorted(Path(folder).glob(".checkpoint-*.pt.tmp-*"))
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The ``checkpoint-STEP.pt`` with the highest step in ``folder``; None if there is none."""
    found = checkpoints(folder)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint dict; ``path`` may be a file or a folder (its latest ``checkpoint-STEP.pt``)."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint-STEP.pt in {path}; give a checkpoint file or a training --out")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not an mmload checkpoint (format {FORMAT!r}); for Hugging Face checkpoints "
                         "use --init-bert / --init-vit")
    return state


def load_model(path: str | Path, map_location: torch.device | str = "cpu") -> tuple[ViTBERT, Any]:
    """``(ViTBERT with the checkpoint's weights, its tokenizer or None)``."""
    state = load_checkpoint(path, map_location)
    return model_from_state(state).to(map_location), tokenizer_from_state(state["tokenizer"])


def model_from_state(state: dict[str, Any]) -> ViTBERT:
    """The ViTBERT a checkpoint dict describes, with its weights."""
    model = ViTBERT(ModelConfig(**state["config"]))
    model.load_state_dict(state["model"])
    return model
