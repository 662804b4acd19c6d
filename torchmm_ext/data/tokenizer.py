"""Text tokenizers: an offline WordPiece vocabulary for the shapes world, or any BERT tokenizer."""

import hashlib
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Optional, Union

from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerBase  # type: ignore[attr-defined]

__all__ = ["SPECIAL_TOKENS", "build_tokenizer", "train_wordpiece_vocab"]

PathLike = Union[str, Path]

# Order fixes the ids: [PAD]=0 (as BERT, so zero-padding and attention masks agree), then the rest.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_wordpiece_vocab(corpus_file: PathLike, vocab_file: PathLike, vocab_size: int = 512) -> Path:
    """Build a BERT-style (lower-cased) WordPiece vocabulary of a corpus and write it as ``vocab.txt``.

    The vocabulary holds, in this order: the special tokens; every character of the corpus and
    its ``##`` continuation (sorted), so any word spelt in the corpus' alphabet tokenizes without
    ``[UNK]``; then the corpus' words, most frequent first (ties alphabetical), up to
    ``vocab_size``. The same corpus always gives the same file, byte for byte.

    ``tokenizers.trainers.WordPieceTrainer`` is not used because it breaks frequency ties in
    hash-map order: two runs on one corpus give different vocabularies (different tokens and
    ids), so a model trained against one machine's cache would read the wrong tokens on
    another's. Normalisation and word splitting are still the ``tokenizers`` BERT ones.

    The file is written to a temporary name and renamed, so concurrent ranks never read a
    partial vocabulary.

    Args:
        corpus_file (PathLike): text file, one sentence per line.
        vocab_file (PathLike): output path.
        vocab_size (int): the largest vocabulary; the rarest words are left out (they tokenize
            into character pieces) when the corpus has more. Default: 512.

    Returns:
        Path: ``vocab_file``.

    Raises:
        ValueError: ``vocab_size`` cannot hold the special tokens and the corpus' characters.
    """
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    word_counts: Counter = Counter()
    with open(corpus_file, encoding="utf-8") as f:
        for line in f:
            word_counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)))
    characters = sorted({c for word in word_counts for c in word})
    tokens = [*SPECIAL_TOKENS, *characters, *(f"##{c}" for c in characters)]
    if len(tokens) > vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} cannot hold the {len(SPECIAL_TOKENS)} special tokens and the "
            f"{len(characters)} characters (x2 with ##) of {corpus_file}: use at least {len(tokens)}"
        )
    whole_words = sorted((w for w in word_counts if w not in tokens), key=lambda w: (-word_counts[w], w))
    tokens += whole_words[: vocab_size - len(tokens)]

    vocab_file = Path(vocab_file)
    vocab_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".vocab-", suffix=".txt", dir=vocab_file.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(tokens) + "\n")
    os.replace(tmp, vocab_file)
    return vocab_file


def _bert_from_vocab_dir(directory: Path) -> PreTrainedTokenizerBase:
    # from_pretrained on a directory holding vocab.txt works on transformers 4 and 5 alike
    # (the constructor's vocab-file argument was renamed in 5).
    return BertTokenizerFast.from_pretrained(str(directory), do_lower_case=True)


def build_tokenizer(
    name_or_path: str,
    *,
    corpus_file: Optional[PathLike] = None,
    vocab_size: int = 512,
    cache_dir: Optional[PathLike] = None,
) -> PreTrainedTokenizerBase:
    """Build the text tokenizer.

    * ``"shapes"``: train (once, then reuse) a WordPiece vocabulary on ``corpus_file`` and
      return a ``BertTokenizerFast`` on it: ``[CLS] text [SEP]``, ``[PAD]`` id 0, lower case,
      exactly like BERT's tokenizer but with a vocabulary of the shapes world. The vocabulary
      is cached as ``<cache_dir or corpus dir>/wordpiece_words<vocab_size>_<corpus hash>/vocab.txt``; that
      directory can later be passed as ``name_or_path`` itself.
    * an existing directory: ``AutoTokenizer.from_pretrained(dir)``; it must hold
      ``tokenizer.json`` or ``vocab.txt``.
    * anything else: a Hugging Face hub name, loaded from the local cache (no internet needed
      when cached, e.g. ``bert-base-uncased``).

    Args:
        name_or_path (str): ``"shapes"``, a tokenizer directory, or a hub name.
        corpus_file (Optional[PathLike]): training text for ``"shapes"`` (the world's
            ``vocab_corpus.txt``).
        vocab_size (int): WordPiece vocabulary size for ``"shapes"``. Default: 512.
        cache_dir (Optional[PathLike]): where the ``"shapes"`` vocabulary is kept; for hub
            names, passed to ``from_pretrained``.

    Returns:
        PreTrainedTokenizerBase: the tokenizer.

    Raises:
        ValueError: ``"shapes"`` without ``corpus_file``.
        FileNotFoundError: a missing corpus file, a directory without a vocabulary, or a hub
            name that cannot be loaded offline.
    """
    if name_or_path == "shapes":
        if corpus_file is None:
            raise ValueError("build_tokenizer('shapes') needs corpus_file (the shapes world's vocab_corpus.txt)")
        corpus_file = Path(corpus_file)
        if not corpus_file.is_file():
            raise FileNotFoundError(f"tokenizer corpus not found: {corpus_file}")
        vocab_dir = Path(cache_dir) if cache_dir is not None else corpus_file.parent
        # Keyed by the corpus content too, so a shared cache_dir never serves another world's vocabulary.
        digest = hashlib.sha256(corpus_file.read_bytes()).hexdigest()[:10]
        # "words": the deterministic builder (earlier caches came from the hash-ordered trainer).
        vocab_file = vocab_dir / f"wordpiece_words{vocab_size}_{digest}" / "vocab.txt"
        if not vocab_file.is_file():
            train_wordpiece_vocab(corpus_file, vocab_file, vocab_size)
        return _bert_from_vocab_dir(vocab_file.parent)

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not ((path / "tokenizer.json").is_file() or (path / "vocab.txt").is_file()):
            raise FileNotFoundError(f"tokenizer directory {path} has neither tokenizer.json nor vocab.txt")
        if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(str(path))
        return _bert_from_vocab_dir(path)
    # Hub ids are "name" or "org/name"; anything else path-like can only be a local path.
    if path.exists() or path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"tokenizer directory not found: {path} (expected a directory with vocab.txt or tokenizer.json)")
    # Local cache first: an offline machine otherwise spends ~25 s in HTTP retries.
    try:
        return AutoTokenizer.from_pretrained(name_or_path, cache_dir=cache_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        error: Exception = e
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if not offline:
        try:
            return AutoTokenizer.from_pretrained(name_or_path, cache_dir=cache_dir)
        except (OSError, ValueError) as e:
            error = e
    raise FileNotFoundError(
        f"no tokenizer directory {name_or_path!r}, and no Hugging Face hub tokenizer of that name could be "
        f"loaded{' offline' if offline else ''} (this machine may have no internet). Pass a directory holding "
        f"vocab.txt or tokenizer.json, or 'shapes' for the built-in vocabulary. "
        f"Last error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    ) from error
