"""``mmload precompute``: run a frozen encoder over shards once and write shards of embeddings.

Each output sample keeps its key, modality and label and gets ``KEY.emb.npy`` (float16): the pooled
vector ``(D,)`` (the class / [CLS] token) or, with ``tokens=True``, every token ``(L, D)``; per-token text
embeddings also keep their ids (``KEY.ids.npy``) so that masked-token labels can be made from them. An
``image_text`` pair gets both sides: its image's in ``KEY.emb.npy`` and its text's in ``KEY.text.emb.npy``.
Read the output with ``ShardDataset`` and batch it with ``EmbeddingCollator``.

Under ``torchrun`` each rank embeds its share of the shards (``ShardDataset``'s split by rank) and writes its own
``shard-r{rank}-*.tar``; rank 0 writes the one manifest once every rank is done.

The library takes encoder objects (anything with :class:`FeatureEncoder`'s fields: ``HFFeatures`` for a Hugging
Face model folder, ``ModuleImageFeatures`` for any torch module, ``models.features.MMLoadFeatures`` for an mmload
ViT-BERT); turning a path on the command line into one is the command line's work (``mmload.cli``).

NOTE [native precompute]: with ``resolution="native"`` (``--resolution native --max-patches N``) the input images
are decoded on their own aspect-preserving grids (NOTE [native grid] in :mod:`mmload.decode`), on whole patches of
the image encoder's ``patch_size``, at most ``max_patches`` of them (default: the encoder's square grid). A batch
then holds images of several sizes, each in the top-left of the largest (``ImageBatch.sizes``). Each is embedded
at its own size and never padded: the batch's images are grouped by size and the encoder runs once per group on
the unpadded images (``_embed_images``), so no padding enters any embedding and an image's embedding does not
depend on the batch it came in. The cost is one encoder call per distinct size in a batch instead of one per
batch: native grids repeat (photos come in a few aspect ratios), but a batch of many distinct grids runs as many
small calls. A Hugging Face ViT gets ``interpolate_pos_encoding=True`` for a size other than its ``image_size``
(its position grid resized bicubically, as the HF forward does it); an mmload ViT-BERT resizes its learned grid
itself (NOTE [native positions] in ``models/vit_bert.py``); any other module gets the image as it is. An encoder
that cannot take another size fails with one line that says to decode at the square size. With ``tokens=True``
an image's embedding is ``(1 + rows * cols, D)``, its own length, which ``EmbeddingCollator`` packs as it packs
texts; the pooled vector stays ``(D,)``. A ``teacher`` gets the batch on the device, padded, and takes each image
without its padding itself (``models.kd.image_rows``).
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mmload.batch import PaddedBatch
from mmload.collate import PaddedCollator
from mmload.coverage import loader_errors
from mmload.dataset import ShardDataset, _dist_rank_world
from mmload.decode import TEXT_EMB_EXT
from mmload.layouts import IMAGENET_MEAN, IMAGENET_STD, PATCH_SIZE, ImageBatch, normalize_pixels
from mmload.loader import StatefulLoader
from mmload.manifest import local_folder
from mmload.reader import expand_urls
from mmload.sample import IGNORE_INDEX
from mmload.shards.writer import SHARD_PATTERN
from mmload.tokenizer import LazyDefault, save_tokenizer


class FeatureEncoder(Protocol):
    """What ``precompute`` needs of an encoder; token 0 of each output is the pooled vector."""

    name: str
    image_size: int | None  # None: this encoder takes no images
    patch_size: int  # resolution="native" decodes images on whole patches of it (NOTE [native precompute])
    tokenizer: Any  # None: texts are tokenized with the shards' tokenizer
    takes_text: bool  # False: this encoder takes no texts
    max_text_len: int  # texts are truncated to this many tokens

    def images(self, pixels: torch.Tensor) -> torch.Tensor: ...  # uint8 (N, 3, H, W), any H x W -> (N, L, D)

    def texts(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...  # (B, T), (B, T) -> (B, T, D)


@dataclass
class ModuleImageFeatures:
    """Any torch module mapping normalized float images ``(N, 3, H, W)`` to ``(N, D)`` or ``(N, L, D)``.

    ``image_size`` is the square size it was made for; at native resolution it gets images of other sizes as they
    are (one size per call), decoded on whole patches of ``patch_size``."""

    module: nn.Module
    image_size: int
    patch_size: int = PATCH_SIZE
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    name: str = "module"
    tokenizer: Any = None
    takes_text: bool = False
    max_text_len: int = 512

    def images(self, pixels: torch.Tensor) -> torch.Tensor:
        x = normalize_pixels(pixels, self.mean, self.std)
        try:
            out = self.module(x)
        except (RuntimeError, ValueError) as e:
            if tuple(pixels.shape[-2:]) == (self.image_size, self.image_size) or isinstance(e, torch.OutOfMemoryError):
                raise
            raise ValueError(_fixed_size(self.name, self.image_size, pixels, f"it failed on them: {e}")) from e
        out = getattr(out, "last_hidden_state", out)
        return out if out.dim() == 3 else out.unsqueeze(1)

    def texts(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"encoder {self.name!r} takes images only")


class HFFeatures:
    """A local (or cached) Hugging Face model: a text model (BERT-like) or a vision model (ViT-like)."""

    def __init__(self, path: str) -> None:
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(path)
        self.name = str(path)
        self.model = AutoModel.from_pretrained(path)
        self.vision = hasattr(config, "image_size") and hasattr(config, "num_channels")
        self.image_size = int(config.image_size) if self.vision else None
        self.patch_size = int(getattr(config, "patch_size", PATCH_SIZE))
        # a ViT-like forward resizes its position grid to other image sizes when asked (NOTE [native precompute])
        self.interpolates = "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters
        self.max_text_len = int(getattr(config, "max_position_embeddings", 512))
        self.tokenizer = None
        self.takes_text = not self.vision
        self.mean, self.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # ViT's processor default
        if self.vision:
            cfg = Path(path) / "preprocessor_config.json"
            if cfg.exists():
                pre = json.loads(cfg.read_text())
                self.mean, self.std = tuple(pre.get("image_mean", self.mean)), tuple(pre.get("image_std", self.std))
        else:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(path)

    def images(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.vision:
            raise ValueError(f"{self.name} is a text model; give images a vision encoder (--encoder image=PATH)")
        x = normalize_pixels(pixels, self.mean, self.std)  # (N, 3, H, W)
        if tuple(pixels.shape[-2:]) == (self.image_size, self.image_size):
            return self.model(pixel_values=x).last_hidden_state
        if not self.interpolates:
            raise ValueError(_fixed_size(self.name, self.image_size, pixels,
                                         "its forward takes no interpolate_pos_encoding"))
        return self.model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state

    def texts(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.vision:
            raise ValueError(f"{self.name} is a vision model; give texts a text encoder (--encoder text=PATH)")
        return self.model(input_ids=ids.long(), attention_mask=mask.long()).last_hidden_state


def _fixed_size(name: str, size: int, pixels: torch.Tensor, why: str) -> str:
    """The one line for an encoder that takes images of its own square size only."""
    return (f"image encoder {name!r} takes images of {size}x{size} pixels only, got {pixels.shape[-2]}x"
            f"{pixels.shape[-1]} ({why}): decode at the square size (resolution='square', no --resolution native)")


def _embed_images(images: ImageBatch, encoder: FeatureEncoder, device: torch.device) -> list[torch.Tensor]:
    """Each image's embeddings ``(L, D)`` (float32, on the CPU), by row: one encoder call per distinct size, on
    the images without their padding (NOTE [native precompute])."""
    if images.sizes is None:  # one size: one call, as the square path always made
        return list(encoder.images(images.pixels.to(device)).float().cpu())  # N x (L, D)
    groups: dict[tuple[int, int], list[int]] = {}
    for row, (h, w) in enumerate(images.sizes.tolist()):
        groups.setdefault((h, w), []).append(row)
    out: list[torch.Tensor] = [torch.empty(0)] * len(images)
    for (h, w), rows in groups.items():
        pixels = images.pixels[torch.tensor(rows), :, :h, :w].to(device)  # (n, 3, h, w), no padding
        for row, emb in zip(rows, encoder.images(pixels).float().cpu(), strict=True):  # (n, L, D)
            out[row] = emb
    return out


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _records(batch: PaddedBatch, image_enc: FeatureEncoder | None, text_enc: FeatureEncoder | None,
             tokens: bool, device: torch.device, teacher: Callable[[PaddedBatch], torch.Tensor] | None = None
             ) -> Iterator[dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    if batch.image is not None:
        if image_enc is None:
            raise ValueError(f"shards hold images (e.g. key {batch.keys[int(batch.image.index[0])]!r}) but no "
                             "image encoder was given; pass --encoder image=PATH or an mmload checkpoint")
        feats = _embed_images(batch.image, image_enc, device)  # N x (L, D); L: each image's own at native
        # The teacher gives rows by ascending sample index, the order PaddedCollator put the images in.
        logits = None if teacher is None else teacher(batch.to(device)).float().cpu()  # (N, C)
        for row, i in enumerate(batch.image.index.tolist()):
            emb = feats[row] if tokens else feats[row][0]
            out[i] = {"json": {"modality": "image", "encoder": image_enc.name, "tokens": tokens},
                      "emb.npy": _npy(emb.half().numpy())}
            if logits is not None:
                out[i]["logits.npy"] = _npy(logits[row].half().numpy())
            label = int(batch.image.labels[row])
            if label != IGNORE_INDEX:
                out[i]["cls"] = label
    if batch.text is not None:
        if text_enc is None:
            raise ValueError(f"shards hold texts (e.g. key {batch.keys[int(batch.text.index[0])]!r}) but no "
                             "text encoder was given; pass --encoder text=PATH or an mmload checkpoint")
        feats = text_enc.texts(batch.text.ids.to(device), batch.text.mask.to(device)).float().cpu()  # (B, T, D)
        for row, i in enumerate(batch.text.index.tolist()):
            n = int(batch.text.mask[row].sum())
            emb = _npy((feats[row, :n] if tokens else feats[row, 0]).half().numpy())
            if i in out:  # an image_text pair: its image side came first, its text side goes beside it
                rec = out[i]
                rec["json"].update(modality="image_text", text_encoder=text_enc.name)
                rec[TEXT_EMB_EXT] = emb
            else:
                rec = out[i] = {"json": {"modality": "text", "encoder": text_enc.name, "tokens": tokens},
                                "emb.npy": emb}
            if tokens:
                rec["ids.npy"] = _npy(batch.text.ids[row, :n].numpy().astype(np.int32))
    for i in sorted(out):
        yield {"__key__": batch.keys[i], **out[i]}


@torch.no_grad()
def precompute(urls: str | Sequence[str], out: str | Path, *, image_encoder: FeatureEncoder | None = None,
               text_encoder: FeatureEncoder | None = None, tokens: bool = False, batch_size: int = 64,
               num_workers: int = 0, device: torch.device | str | None = None, maxcount: int = 1000,
               overwrite: bool = False, progress: bool = True,
               teacher: Callable[[PaddedBatch], torch.Tensor] | None = None, tokenizer: Any = None,
               resolution: str = "square", max_patches: int | None = None, **read: Any) -> dict[str, Any]:
    """Embed every sample of ``urls`` with the frozen encoders and write shards to ``out``; returns the manifest.

    ``teacher`` (e.g. ``models.kd.ImageTeacher``) maps a batch to image class logits by ascending sample index;
    they are stored as ``KEY.logits.npy`` for distillation without running the teacher again. ``tokenizer``
    tokenizes the texts when the text encoder brings none (default: the shards' own, else the bundled one).
    ``resolution``, ``max_patches``: how the images are decoded, as ``ShardDataset`` takes them; ``"native"`` embeds
    each image at its own size, on whole patches of the image encoder's ``patch_size`` (NOTE [native precompute]).
    ``read``: the :class:`~mmload.reader.ReadLimits` keywords (``read_timeout``, ``max_sample_bytes``,
    ``shuffle_buffer_bytes``). In an initialised ``torch.distributed`` group (``torchrun``) every rank must call
    it: each embeds and writes its share, and every rank returns the one manifest.
    """
    from mmload.manifest import MANIFEST, write_json
    from mmload.shards.writer import OUTPUTS, prepare_out, write_shards

    if image_encoder is None and text_encoder is None:
        raise ValueError("precompute needs an image_encoder, a text_encoder, or both")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_patches is not None and resolution != "native":
        raise ValueError(f"max_patches={max_patches} sets the native grid: give it with resolution='native' "
                         "(--resolution native)")
    image_kwargs: dict[str, Any] = {"resolution": resolution, "max_patches": max_patches}
    if resolution == "native" and image_encoder is not None:
        if getattr(image_encoder, "patch_size", None) is None:
            raise ValueError(f"resolution='native' decodes images on whole patches of the image encoder's "
                             f"patch_size, and {image_encoder.name!r} has none: give it a patch_size field")
        image_kwargs["patch_size"] = image_encoder.patch_size
    if text_encoder is not None and text_encoder.tokenizer is not None:
        if tokenizer is not None and tokenizer is not text_encoder.tokenizer:
            raise ValueError(f"the text encoder {text_encoder.name!r} brings its own tokenizer (its vocabulary): "
                             "give no tokenizer (--tokenizer) with it")
        tokenizer = text_encoder.tokenizer
    rank, world = _dist_rank_world() or (0, 1)
    out = Path(out)

    def check_and_prepare() -> None:
        inside = [u for u in expand_urls(urls)
                  if local_folder(u) is not None and out.resolve() in Path(u).resolve().parents]
        if inside:  # --overwrite would delete them
            raise ValueError(f"the output folder {out} holds input shards ({inside[0]}, ...): give another folder")
        prepare_out(out, overwrite, OUTPUTS)
        out.mkdir(parents=True, exist_ok=True)

    _on_rank0(check_and_prepare, rank, world)  # one rank cleans the folder; all raise what it raised
    if device is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else "cpu"
    bar = tqdm(desc="precompute" if world == 1 else f"precompute rank {rank}", unit=" samples",
               disable=not progress)
    written: list[int] = []  # with ranks: each written key's hash, for the check across them
    try:  # NOTE: every failure of this rank reaches the others (at the gather), so none waits for it for ever
        device = torch.device(device)
        image_size = image_encoder.image_size if image_encoder is not None else 32
        max_text_len = text_encoder.max_text_len if text_encoder is not None else 512
        ds = ShardDataset(urls, tokenizer=tokenizer, image_size=image_size, max_text_len=max_text_len,
                          shuffle=False, rank=rank, world_size=world, **image_kwargs, **read)
        loader = StatefulLoader(ds, batch_size=batch_size, collate_fn=PaddedCollator(ids_dtype=torch.int64),
                                num_workers=num_workers)  # stateful: its state carries the workers' error counts

        def records() -> Iterator[dict[str, Any]]:
            for batch in loader:
                for record in _records(batch, image_encoder, text_encoder, tokens, device, teacher):
                    if world > 1:
                        written.append(_key_hash(record["__key__"]))
                    yield record
                bar.update(len(batch.keys))

        names = {"image": getattr(image_encoder, "name", None), "text": getattr(text_encoder, "name", None),
                 "teacher": getattr(teacher, "name", None if teacher is None else type(teacher).__name__)}
        info = {"source": "precompute", "inputs": ds.urls, "encoders": names, "tokens": tokens, **image_kwargs}
        part = write_shards(records(), out, maxcount=maxcount, write_manifest=False, info=info,
                            pattern=SHARD_PATTERN if world == 1 else f"shard-r{rank:03d}-%06d.tar",
                            allow_empty=world > 1)
        part["errors"] = loader_errors(loader.state_dict())  # known once every input is read
        part["keys"] = np.array(written, dtype=np.uint64) if world > 1 else None
        failure = None
    except Exception as e:
        part, failure = None, e
    finally:
        bar.close()
    parts = _gather(part if failure is None else failure, world)
    failed = next((p for p in parts if isinstance(p, BaseException)), None)
    if failed is not None:
        raise failure if failure is not None else failed
    manifest = _merge(parts)

    def finish() -> None:
        tokenizer = ds.decoder.tokenizer  # not ds.tokenizer: image-only inputs never load a default one
        if tokenizer is not None and not isinstance(tokenizer, LazyDefault):
            save_tokenizer(tokenizer, out)  # beside the embeddings: it made their ids.npy
        write_json(out / MANIFEST, manifest)  # last: its presence means done (NOTE [atomic outputs] in shards.writer)

    _on_rank0(finish, rank, world)  # every rank returns once the manifest is written, or raises what rank 0 did
    return manifest


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def _on_rank0(fn: Callable[[], None], rank: int, world: int) -> None:
    """Run ``fn`` on rank 0 only; every rank raises what it raised (or none does)."""
    error: list[BaseException | None] = [None]
    if rank == 0:
        try:
            fn()
        except Exception as e:
            if world == 1:
                raise
            error = [e]
    if world > 1:
        torch.distributed.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise error[0]


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    parts: list[Any] = [None] * world
    torch.distributed.all_gather_object(parts, obj)
    return parts


def _merge(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One manifest from every rank's: their shards in rank order, their counts and errors summed; a key two ranks
    wrote is an error, as it is within one rank's shards."""
    if len(parts) > 1:
        every = np.concatenate([part["keys"] for part in parts])
        if len(np.unique(every)) < len(every):
            raise ValueError("record keys are not unique across ranks: the input holds a key twice (in two shards "
                             "that different ranks read); `mmload inspect` counts them as duplicate_key_across_shards")
    manifest = {k: v for k, v in parts[0].items() if k != "keys"}
    manifest["shards"] = [shard for part in parts for shard in part["shards"]]
    manifest["samples"] = {k: sum(part["samples"][k] for part in parts) for k in parts[0]["samples"]}
    manifest["errors"] = dict(sorted(sum((Counter(part["errors"]) for part in parts), Counter()).items()))
    if not manifest["shards"]:
        raise ValueError(f"no samples to embed in {manifest['inputs'][:3]}")
    return manifest


__all__ = ["FeatureEncoder", "HFFeatures", "ModuleImageFeatures", "precompute"]
