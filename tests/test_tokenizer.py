"""The default tokenizer: training, determinism, save/load round trip, lookup beside the shards, pickling."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from mmload.shards import pydoc_corpus
from mmload.tokenizer import (
    SPECIAL_TOKENS,
    TextEncoder,
    default_tokenizer,
    load_tokenizer,
    save_tokenizer,
    train_wordpiece,
)

TEXTS = list(pydoc_corpus())[:20]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_wordpiece(TEXTS, vocab_size=1000), out)
    return out


def test_special_tokens_and_bert_template() -> None:
    tok = train_wordpiece(TEXTS, vocab_size=1000)
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (
        0, 1, 2, 3, 4)
    ids = tok("The Class statement, Defines a class.")["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3 and 1 not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "the class statement, defines a class."
    pair = tok("a b", "c", return_token_type_ids=True)
    assert pair["input_ids"].count(3) == 2 and pair["token_type_ids"][-1] == 1
    # '##x' and '[MASK]'-like text: only the five real special tokens are matched in raw text
    tokens = tok.convert_ids_to_tokens(tok("##a [MASK]")["input_ids"])
    assert tokens == ["[CLS]", "#", "#", "a", "[MASK]", "[SEP]"]
    assert len(tok) <= 1000


def test_training_is_deterministic() -> None:
    # tokenizers' own trainer gives a different vocabulary on most runs (huggingface/tokenizers#1794)
    assert len({train_wordpiece(TEXTS, vocab_size=1000).backend_tokenizer.to_str() for _ in range(4)}) == 1


def test_train_errors() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_wordpiece(TEXTS, vocab_size=5)
    with pytest.raises(ValueError, match="no text"):
        train_wordpiece(["", "  "])


def test_save_load_round_trip_and_pickle(saved: Path) -> None:
    assert sorted(p.name for p in saved.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert json.loads((saved / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    tok = load_tokenizer(str(saved))
    text = "Exceptions are raised by the raise statement."
    assert tok(text)["input_ids"] == AutoTokenizer.from_pretrained(saved)(text)["input_ids"]
    assert tok.pad_token == "[PAD]" and tok.mask_token_id == 4
    clone = pickle.loads(pickle.dumps(tok))
    assert clone(text)["input_ids"] == tok(text)["input_ids"] and clone.pad_token_id == 0


def test_load_is_cached_per_resolved_path(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(saved.parent)
    assert load_tokenizer(str(saved)) is load_tokenizer(saved.name)
    assert load_tokenizer(None, [str(saved / "shard-000000.tar")]) is load_tokenizer(str(saved))


@pytest.mark.parametrize("url", ["shard-{000000..000003}.tar", "shard-000001.tar"])
def test_found_beside_the_shards(saved: Path, url: str) -> None:
    for spelled in (str(saved / url), f"file://{saved / url}"):
        assert load_tokenizer(None, [spelled]).cls_token_id == 2


def test_no_tokenizer_anywhere_falls_back_to_the_default_and_says_where_it_looked(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from mmload.tokenizer import _log_default_once

    _log_default_once.cache_clear()
    with caplog.at_level("WARNING", logger="mmload"):
        for urls in ([str(tmp_path / "shard-000000.tar")], ["pipe:curl -s http://example.com/shard.tar"], []):
            assert load_tokenizer(None, urls) is default_tokenizer()
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 3 and str(tmp_path) in said[0] and "not a local file" in said[1], said
    assert all("--tokenizer" in m for m in said)


def test_the_default_tokenizer_is_bert_base_uncased(minilm: str) -> None:
    """Ids equal to a BERT checkpoint's own tokenizer that ships bert-base-uncased's vocabulary, on English prose,
    accents, CJK, emoji, control characters, long words and the special tokens' spelling."""
    ours, theirs = default_tokenizer(), AutoTokenizer.from_pretrained(minilm)
    texts = [*pydoc_corpus()][:300] + ["Héllo WORLD — naïve café 東京 😀", "tab\there\x00nul", "x" * 150, "",
                                       "[MASK] and [SEP] spelt out", "UPPER lower MiXeD don't co-op"]
    assert [ours(t)["input_ids"] for t in texts] == [theirs(t, truncation=False)["input_ids"] for t in texts]
    assert (len(ours), ours.cls_token_id, ours.sep_token_id, ours.mask_token_id, ours.pad_token_id) == (
        30522, 101, 102, 103, 0)
    pair = ours("a b", "c d")
    assert pair["input_ids"] == [101, 1037, 1038, 102, 1039, 1040, 102] and pair["token_type_ids"][-1] == 1
    assert load_tokenizer("bert-base-uncased") is ours and load_tokenizer(None, ()) is ours  # offline, one object
    assert pickle.loads(pickle.dumps(ours))("a car")["input_ids"] == [101, 1037, 2482, 102]


@pytest.mark.parametrize("path", ["./no-such-tokenizer", "~/no/such/tok", "/no/such", "a/b/c"])
def test_a_tokenizer_path_that_does_not_exist_says_so(path: str) -> None:
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_tokenizer(path)


# ---- the text encoder (NOTE [text encoder]) ----

def _texts() -> list[str]:
    words = " ".join(pydoc_corpus()).split()
    texts = [" ".join(words[i * 7:i * 7 + n]) for i, n in enumerate([1, 3, 15, 40, 200, 700] * 10)]
    return texts + ["Café naïve résumé", "日本語のテキスト", "emoji 🙂 ok", "[CLS] [SEP] [MASK] literal", "a\u0000b\tc"]


@pytest.mark.parametrize("max_length", [2, 5, 128])
@pytest.mark.parametrize("which", ["default", "trained", "minilm", "left", "split_special"])
def test_the_text_encoder_gives_the_tokenizers_own_ids(which: str, max_length: int, request: pytest.FixtureRequest,
                                                       saved: Path) -> None:
    if which == "minilm":
        tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue("minilm"))
    elif which == "trained":
        tokenizer = load_tokenizer(str(saved))
    elif which == "default":
        tokenizer = default_tokenizer()
    else:  # set at load time: what the call sets on its backend before every text
        extra = {"truncation_side": "left"} if which == "left" else {"split_special_tokens": True}
        tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue("minilm"), **extra)
    encoder = TextEncoder(tokenizer, max_length)
    want = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in _texts()]
    assert [encoder(t) for t in _texts()] == want
    assert encoder.backend is not None and encoder.checked == TextEncoder.CHECK  # the backend carried the rest
    tokenizer.backend_tokenizer.no_truncation()
    again = pickle.loads(pickle.dumps(encoder))  # a DataLoader worker's copy
    assert [again(t) for t in _texts()] == want and again.backend is not None
    assert tokenizer.backend_tokenizer.truncation is None  # past its check, the shared tokenizer is left alone


class _PrefixingTokenizer:
    """A tokenizer class that does work in Python before its backend: its backend alone gives other ids."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.backend_tokenizer, self.truncation_side = inner, inner.backend_tokenizer, "right"

    def __call__(self, text: str, **kwargs: Any) -> Any:
        return self.inner("prefix " + text, **kwargs)


def test_a_tokenizer_whose_backend_differs_from_its_call_is_called() -> None:
    tokenizer = _PrefixingTokenizer(default_tokenizer())
    encoder = TextEncoder(tokenizer, 64)
    texts = _texts()
    assert [encoder(t) for t in texts] == [tokenizer(t, truncation=True, max_length=64)["input_ids"] for t in texts]
    assert encoder.backend is None


class _PythonTokenizer:
    """A tokenizer with no Rust backend (a slow tokenizer, a user's own class with the HF call)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, text: str, **kwargs: Any) -> Any:
        return self.inner(text, **kwargs)


def test_a_tokenizer_without_a_backend_is_called() -> None:
    tokenizer = _PythonTokenizer(default_tokenizer())
    encoder = TextEncoder(tokenizer, 32)
    assert encoder.backend is None
    assert [encoder(t) for t in _texts()] == [tokenizer(t, truncation=True, max_length=32)["input_ids"]
                                              for t in _texts()]


def test_a_decoder_encodes_with_the_tokens_its_tokenizer_has_now(minilm: str) -> None:
    """Tokens added after the first text (``add_tokens``) are used from then on, as the tokenizer's call uses them."""
    from mmload.decode import Decoder

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    decoder = Decoder(tokenizer, max_text_len=32)
    sample = {"__key__": "k", "txt": b"a zzqx b"}
    before = decoder(sample).ids.tolist()
    tokenizer.add_tokens(["zzqx"])
    after = decoder(sample).ids.tolist()
    assert after == tokenizer("a zzqx b", truncation=True, max_length=32)["input_ids"] != before
