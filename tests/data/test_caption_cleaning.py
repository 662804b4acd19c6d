from torchmm_ext.data import pre_caption, pre_question


def test_pre_caption_examples() -> None:
    assert pre_caption("A Man's (big) dog, running!") == "a mans big dog running"
    assert pre_caption("  red-and-white/blue   things\n") == "red and white blue things"
    assert pre_caption("<person> holds a *sign*: \"hi\"; ~ok~ #1?") == "person holds a sign hi ok 1"
    assert pre_caption("Is it day - or night?") == "is it day or night"
    assert pre_caption("a b c d e", max_words=3) == "a b c"
    assert pre_caption("") == ""


def test_pre_question_keeps_50_words() -> None:
    question = " ".join(["why"] * 60) + "?"
    assert pre_question(question).split() == ["why"] * 50
    assert pre_caption(question).split() == ["why"] * 30
