"""The default tokenizer: training, determinism, save/load round trip, lookup beside the shards, pickling."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mmload.shards import pydoc_corpus
from mmload.tokenizer import SPECIAL_TOKENS, load_tokenizer, save_tokenizer, train_wordpiece

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


def test_missing_tokenizer_says_how_to_fix(tmp_path: Path) -> None:
    for urls in ([str(tmp_path / "shard-000000.tar")], ["pipe:curl -s http://example.com/shard.tar"], []):
        with pytest.raises(ValueError, match="--tokenizer.*make-shards"):
            load_tokenizer(None, urls)
