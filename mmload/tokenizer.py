"""Text tokenizers: the one given, else the one saved beside the shards, else bert-base-uncased's WordPiece.

``make-shards`` trains one (``train_wordpiece``) and saves it into the shard folder; ``load_tokenizer`` finds it
there when no ``--tokenizer`` is given. Shards mmload did not write (img2dataset output, say) get
:func:`default_tokenizer`: the bert-base-uncased vocabulary (ViT-BERT's, 30,522 pieces) shipped with the package,
so nothing is downloaded. Any Hugging Face tokenizer (hub name or local folder) works instead.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from mmload.manifest import local_folder, write_json

if TYPE_CHECKING:  # transformers costs ~1 s to import: load it when a tokenizer is made, not at CLI start
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger("mmload")

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, in this order
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 1
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_TOKENIZER = "bert-base-uncased"
DEFAULT_VOCAB = Path(__file__).with_name("data") / "bert-base-uncased-vocab.txt"  # Apache-2.0, google-research/bert


def train_wordpiece(texts: Iterable[str], vocab_size: int = 8192) -> PreTrainedTokenizerFast:
    """Train a lowercasing BERT WordPiece on ``texts``; encodings come out as ``[CLS] ... [SEP]``.

    ``[PAD]`` is id 0, then ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``. The vocabulary may end up smaller than
    ``vocab_size`` when the texts are small; the same texts give the same vocabulary, byte for byte.

    NOTE [deterministic WordPiece]: the tokenizers trainer (0.23) creates the ``##c`` continuation tokens in
    hash-map order, so their ids, and with them the tie-breaks between equally frequent merges, change from run
    to run (huggingface/tokenizers#1794). We hand it every ``##c`` up front, sorted, as extra special tokens, then
    rebuild the tokenizer from the trained vocabulary so that only the five real special tokens stay special.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (the special tokens and more), got {vocab_size}")
    texts = list(texts)
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    if not any(text.strip() for text in texts):
        raise ValueError("cannot train a tokenizer on no text; give it at least one non-empty text")
    continuations = sorted({c for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(
        normalizer.normalize_str(text)) for c in word[1:]})
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=[*SPECIAL_TOKENS, *(f"##{c}" for c in continuations)],
        show_progress=False)
    tok = _bert_wordpiece(models.WordPiece(unk_token="[UNK]"), normalizer, pre_tokenizer)
    tok.train_from_iterator(texts, trainer=trainer)
    tok = _bert_wordpiece(models.WordPiece(tok.get_vocab(with_added_tokens=False), unk_token="[UNK]"),
                          normalizer, pre_tokenizer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def _bert_wordpiece(model: models.WordPiece, normalizer: normalizers.Normalizer,
                    pre_tokenizer: pre_tokenizers.PreTokenizer) -> Tokenizer:
    tok = Tokenizer(model)
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece(prefix="##")
    return tok


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: str | Path) -> None:
    """``save_pretrained`` into ``out`` (tokenizer.json + tokenizer_config.json), loadable by ``AutoTokenizer``.

    The config names the class ``PreTrainedTokenizerFast``, which transformers 4.x and 5.x both load; 5.x
    alone would write ``TokenizersBackend``, which 4.x does not know.
    """
    tokenizer.save_pretrained(out)
    config_path = Path(out) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    write_json(config_path, config)


def load_tokenizer(name_or_path: str | None, shard_urls: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Load ``name_or_path`` (a local folder or a hub name), else the tokenizer saved beside the first shard, else
    :func:`default_tokenizer` (logged once per process).

    Loads are cached per resolved path, so DataLoader workers and repeated calls share one object: do not
    mutate it (``add_tokens`` and the like); load your own copy with ``AutoTokenizer`` for that.
    """
    if name_or_path is not None:
        path = Path(name_or_path).expanduser()
        if path.exists():
            return _load(str(path.resolve()))
        if _looks_like_path(name_or_path):
            raise FileNotFoundError(f"tokenizer {name_or_path!r}: no such file or folder; give a folder holding a "
                                    "Hugging Face tokenizer (tokenizer.json) or a hub name like bert-base-uncased")
        if name_or_path == DEFAULT_TOKENIZER:
            return default_tokenizer()
        return _load(name_or_path)
    return tokenizer_beside(shard_urls) or lazy_default(shard_urls).load()


def tokenizer_beside(shard_urls: Sequence[str]) -> PreTrainedTokenizerFast | None:
    """The tokenizer ``make-shards`` saved beside the first shard, or None."""
    folder = local_folder(shard_urls[0]) if shard_urls else None
    if folder is not None and (folder / TOKENIZER_FILE).is_file():
        return _load(str(folder.resolve()))
    return None


def lazy_default(shard_urls: Sequence[str] = ()) -> LazyDefault:
    """The default tokenizer, not loaded yet, with what to log when it is (where no tokenizer was found)."""
    folder = local_folder(shard_urls[0]) if shard_urls else None
    where = f"beside the shards in {folder}" if folder is not None else (
        f"beside the first shard {shard_urls[0]!r} (not a local file)" if shard_urls else "(no shards given)")
    return LazyDefault(f"no tokenizer given and none {where}")


@dataclass(frozen=True)
class LazyDefault:
    """Stands in for :func:`default_tokenizer` until a text needs it, so that image-only data never loads
    transformers; ``load()`` logs ``why`` once per process (in DataLoader workers, from the first worker only)."""

    why: str

    def load(self) -> PreTrainedTokenizerFast:
        from torch.utils.data import get_worker_info

        tokenizer = default_tokenizer()
        worker = get_worker_info()
        if worker is None or worker.id == 0:
            with _DEFAULT_LOCK:  # one line even when threads load it together
                _log_default_once(self.why)
        return tokenizer


class TextEncoder:
    """The ids ``tokenizer(text, truncation=True, max_length=max_length)["input_ids"]`` gives, at less cost per text.

    NOTE [text encoder]: transformers' ``__call__`` spends most of a caption's time in Python (argument checks,
    setting the backend's truncation, a ``BatchEncoding``), and it sets that truncation on the shared tokenizer, so
    threads must take turns. A fast tokenizer's Rust backend, copied once with the truncation and padding the call
    would set (truncation, no padding, ``split_special_tokens``), encodes the same text 2-3x faster per call and
    leaves the tokenizer alone. A per-sample stream cannot
    batch texts across samples without reading ahead of the position it saves for a resume, so one text at a time
    through the backend is the lever. The first ``CHECK`` texts are encoded both ways; if any differ (a tokenizer
    class that does work in Python, or a slow tokenizer with no backend), every text takes the tokenizer's own call.
    """

    CHECK = 8

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length
        self.vocab = _size(tokenizer)
        self.backend = _truncating_backend(tokenizer, max_length)
        self.checked = 0 if self.backend is not None else self.CHECK

    def serves(self, tokenizer: Any, max_length: int) -> bool:
        """Whether this encoder still stands for ``tokenizer(..., max_length=max_length)``: the same object, with
        the tokens it had (``add_tokens`` after the first text makes a new one)."""
        return tokenizer is self.tokenizer and max_length == self.max_length and _size(tokenizer) == self.vocab

    def __call__(self, text: str) -> list[int]:
        if self.checked >= self.CHECK:  # checked first: past it, the backend no longer changes
            backend = self.backend
            return backend.encode(text).ids if backend is not None else self._call(text)
        ids = self._call(text)
        with _CALL_LOCK:
            if self.backend is not None and self.backend.encode(text).ids != ids:
                log.info("%s: its Rust backend's ids differ from its own call's; tokenizing through its call",
                         type(self.tokenizer).__name__)
                self.backend = None
            self.checked += 1
        return ids

    def _call(self, text: str) -> list[int]:
        with _CALL_LOCK:  # a fast tokenizer keeps the truncation of its last call: threads must not interleave
            return self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"]

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"backend": None if self.backend is None else self.backend.to_str()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if isinstance(self.backend, str):
            self.backend = _configured(Tokenizer.from_str(self.backend), self.tokenizer, self.max_length)


_CALL_LOCK = threading.RLock()


def _truncating_backend(tokenizer: Any, max_length: int) -> Tokenizer | None:
    """A copy of ``tokenizer``'s Rust backend truncating as its ``__call__(truncation=True, max_length=...)`` does,
    without padding; None for a tokenizer without one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        return None
    return _configured(Tokenizer.from_str(backend.to_str()), tokenizer, max_length)


def _configured(backend: Tokenizer, tokenizer: Any, max_length: int) -> Tokenizer:
    """``backend`` set as the tokenizer's call sets its own before encoding: truncation, no padding, and whether
    special tokens' spellings in a text are split like any other text (``split_special_tokens``)."""
    backend.enable_truncation(max_length, stride=0, strategy="longest_first",
                              direction=getattr(tokenizer, "truncation_side", "right"))
    backend.no_padding()
    backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    return backend


def _size(tokenizer: Any) -> int | None:
    try:
        return len(tokenizer)
    except TypeError:
        return None


def _looks_like_path(name: str) -> bool:
    """A hub name is ``name`` or ``owner/name``: anything else (``./x``, ``~/x``, ``/x``, ``a/b/c``, ``x\\y``) is
    meant as a local path, and a missing one is an error, not a download attempt."""
    return name.startswith((".", "~", "/")) or name.count("/") > 1 or "\\" in name or name.endswith("/")


@functools.cache
def _log_default_once(why: str) -> None:
    log.warning("%s: using the bundled %s WordPiece (%d pieces); pass --tokenizer (tokenizer=) to choose another",
                why, DEFAULT_TOKENIZER, default_tokenizer().vocab_size)


_DEFAULT_LOCK = threading.RLock()  # threads that need it first build it once (transformers' lazy imports race)


def default_tokenizer() -> PreTrainedTokenizerFast:
    """bert-base-uncased's tokenizer (the vocabulary ViT-BERT uses: 30,522 WordPiece pieces, lowercased, accents
    stripped, ``[CLS] ... [SEP]``), built from the vocabulary file shipped with mmload: no network, no hub cache.

    Its ids equal Hugging Face's ``bert-base-uncased`` tokenizer's (tested against a BERT checkpoint that ships
    that vocabulary). One object per process, made on first use; do not mutate it.
    """
    with _DEFAULT_LOCK:
        return _build_default()


@functools.cache
def _build_default() -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    vocab = {}
    with open(DEFAULT_VOCAB, encoding="utf-8") as f:
        for i, line in enumerate(f):
            vocab[line.rstrip("\n")] = i
    tok = _bert_wordpiece(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100),
                          normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer())
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                        model_max_length=512,
                                        model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    tokenizer.name_or_path = DEFAULT_TOKENIZER
    return tokenizer


@functools.lru_cache(maxsize=8)
def _load(resolved: str) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolved)
