"""Topic lexicon matching (whole words/phrases, case-insensitive) and VADER stance."""

from __future__ import annotations

import json

import pytest

from stream.config import ConfigError
from stream.worker.lexicon import Classifier, Lexicon


@pytest.fixture(scope="module")
def lex():
    return Lexicon.load()


def test_default_lexicon_has_the_five_topics(lex):
    assert lex.names == ("climate", "elections", "ai", "economy", "sports")


@pytest.mark.parametrize("text,topics", [
    ("The CLIMATE is changing", ("climate",)),
    ("we need Net   Zero now", ("climate",)),           # phrase, any whitespace, any case
    ("#wildfire smoke again", ("climate",)),            # hashtag: '#' is not a word character
    ("she said it was fine", ()),                       # 'ai' inside a word does not match
    ("AI and the election", ("elections", "ai")),       # lexicon order
    ("machine learning on GPUs", ("ai",)),              # 'gpus' is not 'gpu'; the phrase matches
    ("machinelearning", ()),
    ("inflation, tariffs; world cup!", ("economy", "sports")),
    ("", ()),
    (None, ()),
])
def test_classify_whole_words_and_phrases(lex, text, topics):
    assert lex.classify(text) == topics


def test_user_lexicon_file(tmp_path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"topics": {"cats": ["cat", "Maine Coon"], "c++": ["c++"]}}))
    lex = Lexicon.load(f)
    assert lex.classify("my maine  coon") == ("cats",)
    assert lex.classify("I write C++ daily") == ("c++",)
    assert lex.classify("concatenate") == ()


@pytest.mark.parametrize("content,match", [
    ("not json", "cannot read topics file"),
    ('{"topics": {}}', "at least one topic"),
    ('{"topics": {"x": []}}', "at least one non-empty term"),
    ('{"topics": {"x": ["ok", 3]}}', "at least one non-empty term"),
])
def test_bad_lexicon_files_give_one_line_errors(tmp_path, content, match):
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises(ConfigError, match=match) as err:
        Lexicon.load(f)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="not found"):
        Lexicon.load(tmp_path / "missing.json")


def test_stance_is_vader_compound_in_units_of_1e4():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    c = Classifier()
    vader = SentimentIntensityAnalyzer()
    good, bad = "Solar power is wonderful and I love it", "This climate disaster is horrible and sad"
    topics, st = c(good)
    assert topics == ("climate",) and st == round(vader.polarity_scores(good)["compound"] * 10_000) and st > 0
    topics, st = c(bad)
    assert topics == ("climate",) and st < 0
    assert c("I love my cat") == ((), 0)  # outside every topic: no stance computed
