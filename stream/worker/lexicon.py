"""Topic classification of post text (lexicon terms) and stance (VADER compound score).

A post belongs to topic T when its text contains any of T's terms as a whole word or phrase,
case-insensitively ("net zero" matches "Net  Zero!" and "#netzero" does not; "ai" does not match
"said"). Stance is VADER's compound score in [-1, 1], which VADER rounds to 4 decimals, so it is
carried as an exact integer in units of 1e-4 (``stance_e4``) to keep window sums free of drift.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

from stream.config import ConfigError

STANCE_SCALE = 10_000  # stance_e4 = round(compound * STANCE_SCALE)


def _read_lexicon(path: Path | None) -> dict[str, list[str]]:
    """topic -> terms from a lexicon JSON file ``{"topics": {topic: [term, ...]}}``."""
    where = str(path) if path else "the default lexicon"
    try:
        if path is None:
            raw = resources.files("stream").joinpath("data/topics.json").read_text("utf-8")
        else:
            raw = Path(path).read_text("utf-8")
        doc = json.loads(raw)
    except FileNotFoundError:
        raise ConfigError(f"topics file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read topics file {where}: {exc}") from None
    topics = doc.get("topics") if isinstance(doc, dict) else None
    if not isinstance(topics, dict) or not topics:
        raise ConfigError(f'{where}: expected {{"topics": {{name: [term, ...]}}}} with at least one topic')
    for name, terms in topics.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}: topic names must be non-empty strings")
        if (not isinstance(terms, list) or not terms
                or not all(isinstance(t, str) and t.strip() for t in terms)):
            raise ConfigError(f"{where}: topic {name!r} must list at least one non-empty term")
    return topics


def _norm(term: str) -> str:
    return " ".join(term.lower().split())


@dataclass(frozen=True)
class Lexicon:
    """Topic name -> terms (lower-case, single-spaced), in file order."""

    topics: dict[str, tuple[str, ...]]

    @classmethod
    def load(cls, path: Path | str | None = None) -> "Lexicon":
        """The shipped default (``stream/data/topics.json``) or a user file; ConfigError if bad."""
        raw = _read_lexicon(Path(path) if path else None)
        return cls({name: tuple(dict.fromkeys(_norm(t) for t in terms)) for name, terms in raw.items()})

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.topics)

    @cached_property
    def _term_topics(self) -> dict[str, tuple[str, ...]]:
        out: dict[str, list[str]] = {}
        for name, terms in self.topics.items():
            for t in terms:
                out.setdefault(t, []).append(name)
        return {t: tuple(names) for t, names in out.items()}

    @cached_property
    def _pattern(self) -> re.Pattern:
        # Longest terms first so "machine learning" wins over a shorter overlapping term.
        terms = sorted(self._term_topics, key=len, reverse=True)
        alts = "|".join(r"\s+".join(re.escape(w) for w in t.split()) for t in terms)
        return re.compile(rf"(?<!\w)(?:{alts})(?!\w)", re.IGNORECASE)

    def classify(self, text: str | None) -> tuple[str, ...]:
        """Topics whose terms occur in ``text`` (whole words/phrases), in lexicon order."""
        if not text:
            return ()
        found: set[str] = set()
        for m in self._pattern.finditer(text):
            found.update(self._term_topics[_norm(m.group(0))])
            if len(found) == len(self.topics):
                break
        return tuple(n for n in self.topics if n in found)


class Classifier:
    """Lexicon topics plus VADER stance; stance is computed only for posts in some topic."""

    def __init__(self, lexicon: Lexicon | None = None):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.lexicon = lexicon or Lexicon.load()
        self._vader = SentimentIntensityAnalyzer()

    def stance(self, text: str) -> float:
        """VADER compound score in [-1, 1] (4 decimals)."""
        return self._vader.polarity_scores(text)["compound"]

    def __call__(self, text: str | None) -> tuple[tuple[str, ...], int]:
        """(topics, stance_e4); (() , 0) for a post outside every topic."""
        topics = self.lexicon.classify(text)
        if not topics:
            return (), 0
        return topics, round(self.stance(text) * STANCE_SCALE)
