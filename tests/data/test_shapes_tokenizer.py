"""The offline WordPiece tokenizer of the shapes world and the other tokenizer sources."""

import json
import os
import subprocess
import sys

import pytest
from transformers import PreTrainedTokenizerBase

from torchmm_ext.data import build_tokenizer, generate_shapes_world
from torchmm_ext.data.tokenizer import train_wordpiece_vocab


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_shapes_world(tmp_path_factory.mktemp("shapes") / "w", num_train=30, num_val=5, num_test=5)


@pytest.fixture(scope="module")
def tokenizer(world):
    return build_tokenizer("shapes", corpus_file=world.vocab_corpus)


def test_bert_conventions(tokenizer) -> None:
    assert isinstance(tokenizer, PreTrainedTokenizerBase)
    assert tokenizer.pad_token_id == 0
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    enc = tokenizer(["a red circle", "a large blue square at the top left"], padding="longest", return_tensors="pt")
    ids = enc["input_ids"]
    assert (ids[:, 0] == tokenizer.cls_token_id).all()
    assert ids[0, 4].item() == tokenizer.sep_token_id and (ids[0, 5:] == 0).all()
    assert (enc["attention_mask"][0, 5:] == 0).all()


def test_round_trip_of_world_captions(world, tokenizer) -> None:
    captions = [c for rec in json.loads(world.retrieval_test.read_text()) for c in rec["caption"]]
    for caption in captions:
        ids = tokenizer(caption)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        assert decoded.replace(" ,", ",").split() == caption.split()
    assert len(tokenizer("A LARGE Red Circle")["input_ids"]) == 6  # lower-cased, whole words


def test_unknown_words(tokenizer) -> None:
    # A word outside the corpus but in its alphabet splits into pieces; a new character is [UNK].
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a red λ circle cabbage")["input_ids"])
    assert tokens == ["[CLS]", "a", "red", "[UNK]", "circle", "c", "##a", "##b", "##b", "##a", "##g", "##e", "[SEP]"]


def test_vocabulary_layout_by_hand(tmp_path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The red box, a red cab.\nA BOX\n")
    # words: a 2, box 2, red 2, the 1, cab 1; characters: , . a b c d e h o r t x
    chars = [",", ".", "a", "b", "c", "d", "e", "h", "o", "r", "t", "x"]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    layout = [*specials, *chars, *("##" + c for c in chars)]
    vocab = train_wordpiece_vocab(corpus, tmp_path / "v" / "vocab.txt", vocab_size=32)
    # "a" is already a character; the rest by count, ties alphabetical; 32 leaves room for 3.
    assert vocab.read_text().split("\n")[:-1] == [*layout, "box", "red", "cab"]
    with pytest.raises(ValueError, match="vocab_size=20 cannot hold .* use at least 29"):
        train_wordpiece_vocab(corpus, tmp_path / "small" / "vocab.txt", vocab_size=20)


def test_vocabulary_is_the_same_in_every_process(world, tmp_path) -> None:
    # Another machine (another hash seed) must give the same ids, or checkpoints would not transfer.
    script = ("import sys; from torchmm_ext.data.tokenizer import train_wordpiece_vocab; "
              "train_wordpiece_vocab(sys.argv[1], sys.argv[2])")
    files = []
    for seed in ("1", "2"):
        files.append(tmp_path / seed / "vocab.txt")
        subprocess.run([sys.executable, "-c", script, str(world.vocab_corpus), str(files[-1])], check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed})
    assert files[0].read_bytes() == files[1].read_bytes()


def test_vocabulary_is_cached_and_reloadable(world, tokenizer) -> None:
    (vocab,) = world.root.glob("wordpiece_words512_*/vocab.txt")
    mtime = vocab.stat().st_mtime_ns
    again = build_tokenizer("shapes", corpus_file=world.vocab_corpus)
    assert vocab.stat().st_mtime_ns == mtime and again.get_vocab() == tokenizer.get_vocab()
    from_dir = build_tokenizer(str(vocab.parent))
    assert from_dir("a red circle")["input_ids"] == tokenizer("a red circle")["input_ids"]


def test_errors(tmp_path, monkeypatch) -> None:
    with pytest.raises(ValueError, match="corpus_file"):
        build_tokenizer("shapes")
    with pytest.raises(FileNotFoundError, match="vocab.txt or tokenizer.json"):
        build_tokenizer(str(tmp_path / "missing_dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor vocab.txt"):
        build_tokenizer(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="directory holding vocab.txt"):
        build_tokenizer("surely-not-a-cached-tokenizer-xyz")
