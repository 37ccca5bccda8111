"""Okapi BM25 ranking over a fixed list of texts (pure Python + numpy), for offline search tools.

Terms: lower-case runs of letters and digits (HTML entities decoded first) minus a short English
stop-word list. Score of document d for query q (Robertson / Spärck Jones, as in Lucene):

    score(q, d) = sum over distinct terms t of q:  idf(t) * tf * (k1 + 1) / (tf + k1 * norm(d))
    tf = tf(t, d),   norm(d) = 1 - b + b * |d| / avgdl,   idf(t) = log(1 + (N - df + 0.5) / (df + 0.5))

Ties are broken by document order, so a search is deterministic.
"""

from __future__ import annotations

import html
import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

STOP_WORDS = frozenset("""
a about above after again all also am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers him his how i if in into is it its itself just me more most my no nor not
now of off on once only or other our out over own same she should so some such than that the their
them then there these they this those through to too under until up very was we were what when
where which while who whom why will with would you your
""".split())

_TERM = re.compile(r"[a-z0-9]+")


def terms(text: str) -> list[str]:
    """The index terms of ``text``, in order (repeats kept)."""
    return [t for t in _TERM.findall(html.unescape(text).lower()) if t not in STOP_WORDS]


class BM25:
    """BM25 index over ``documents`` (a sequence of strings; may be empty)."""

    def __init__(self, documents: Sequence[str], *, k1: float = 1.5, b: float = 0.75):
        if k1 < 0 or not 0.0 <= b <= 1.0:
            raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1; got k1={k1}, b={b}")
        self.documents = tuple(documents)
        self.k1, self.b = k1, b
        counts = [Counter(terms(d)) for d in self.documents]
        self.lengths = np.asarray([sum(c.values()) for c in counts], np.float64)
        self.average_length = float(self.lengths.mean()) if len(counts) else 0.0
        postings: dict[str, tuple[list[int], list[int]]] = {}
        for index, count in enumerate(counts):
            for term, tf in count.items():
                docs, tfs = postings.setdefault(term, ([], []))
                docs.append(index)
                tfs.append(tf)
        self._postings = {t: (np.asarray(d, np.int64), np.asarray(f, np.float64))
                          for t, (d, f) in postings.items()}
        n = len(counts)
        self._idf = {t: math.log(1.0 + (n - len(d) + 0.5) / (len(d) + 0.5))
                     for t, (d, _) in self._postings.items()}

    def __len__(self) -> int:
        return len(self.documents)

    def scores(self, query: str) -> np.ndarray:
        """float64 [documents]: each document's score for ``query`` (0 where no term matches)."""
        out = np.zeros(len(self.documents), np.float64)
        if not len(self.documents):
            return out
        norm = self.k1 * (1.0 - self.b + self.b * self.lengths / max(self.average_length, 1e-9))
        for term in dict.fromkeys(terms(query)):
            if term not in self._postings:
                continue
            docs, tf = self._postings[term]
            out[docs] += self._idf[term] * tf * (self.k1 + 1.0) / (tf + norm[docs])
        return out

    def coverage(self, query: str, index: int) -> float:
        """Share of the query's distinct terms that occur in document ``index`` (0 for no terms)."""
        wanted = list(dict.fromkeys(terms(query)))
        if not wanted:
            return 0.0
        present = set(terms(self.documents[index]))
        return sum(t in present for t in wanted) / len(wanted)

    def search(self, query: str, k: int = 1) -> list[tuple[int, float]]:
        """The ``k`` best (document index, score) with a positive score, best first."""
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        scores = self.scores(query)
        order = np.lexsort((np.arange(len(scores)), -scores))  # score descending, then index
        return [(int(i), float(scores[i])) for i in order[:k] if scores[i] > 0]
