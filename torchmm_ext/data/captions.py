"""Text cleaning shared by every ALBEF-style dataset."""

import re

__all__ = ["pre_caption", "pre_question"]

# ALBEF deletes these characters outright (so "don't" -> "dont", "a.b" -> "ab").
_DELETED_CHARS = re.compile(r"[,.'!?\"()*#:;~]")
_SPACED_CHARS = re.compile(r"[-/]")
_WHITESPACE = re.compile(r"\s+")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Clean a caption the way ALBEF does before tokenisation.

    Lower-cases, deletes the characters ``, . ' ! ? " ( ) * # : ; ~``, turns ``-`` and ``/``
    into spaces, replaces ``<person>`` by ``person``, collapses whitespace, strips, and keeps
    at most ``max_words`` words.

    Args:
        caption (str): raw caption, question or sentence.
        max_words (int): maximum number of whitespace-separated words kept. ALBEF uses 30
            for captions and 50 for questions.

    Returns:
        str: the cleaned caption (possibly empty).
    """
    text = _DELETED_CHARS.sub("", caption.lower())
    text = _SPACED_CHARS.sub(" ", text).replace("<person>", "person")
    words = _WHITESPACE.sub(" ", text).strip().split(" ")
    return " ".join(words[:max_words])


def pre_question(question: str, max_words: int = 50) -> str:
    """Clean a VQA question: :func:`pre_caption` with ALBEF's 50-word limit.

    Args:
        question (str): raw question.
        max_words (int): maximum number of words kept. Default: 50.

    Returns:
        str: the cleaned question.
    """
    return pre_caption(question, max_words=max_words)
