"""The knowledge base's retrieval: a suggested reply for an utterance, by BM25 over each tenant's articles.

Articles are managed over the API and stored in ``cs_articles`` (:mod:`services.customer_service.store`);
this module keeps an in-memory index of them per tenant, updated one article at a time
(:meth:`KnowledgeIndex.upsert`, :meth:`KnowledgeIndex.remove`), and answers
:meth:`KnowledgeIndex.suggest`: the best article for an utterance, its suggested reply (the article's
``reply`` when set, else the first sentence(s) of its body) and its score, or ``None`` below the
minimum score. Each tenant has its own statistics (document frequencies, lengths): one tenant's
articles neither match nor weigh in another's retrieval.

Scoring is Okapi BM25 (k1, b) with Lucene's non-negative IDF ``ln(1 + (N - df + 0.5) / (df + 0.5))``
over one field made of the title (each title term counted ``title_weight`` times) and the body;
terms come from :func:`tokenize`: lower case words without stopwords, lightly stemmed
(:func:`stem`). An emotion may boost articles by tag (default: ``apology`` and ``de-escalation``
for angry or frustrated callers, ``empathy`` for sad ones): a matching article's score is
multiplied by the boost, so an apology snippet wins over an equally relevant plain answer; a
boost never makes an article match on its own.

``min_score`` is in BM25 units, which grow with the corpus: one query term found in one article of
ten scores about 2, a term found in every article almost 0, and in a tenant's only article about
0.3. A tenant with a handful of articles may want a lower ``min_score`` (it is a per-tenant setting).
"""

from __future__ import annotations

import heapq
import math
import re
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

_STOPWORD_TEXT = """
a about above after again against all am an and any are aren't as at be because been before being below
between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during each
few for from further had hadn't has hasn't have haven't having he he'd he'll he's her here here's hers herself
him himself his how how's i i'd i'll i'm i've if in into is isn't it it's its itself just let's me more most
mustn't my myself no nor not now of off on once only or other ought our ours ourselves out over own same
shan't she she'd she'll she's should shouldn't so some such than that that's the their theirs them themselves
then there there's these they they'd they'll they're they've this those through to too under until up very
was wasn't we we'd we'll we're we've were weren't what what's when when's where where's which while who who's
whom why why's will with won't would wouldn't you you'd you'll you're you've your yours yourself yourselves
um uh yeah okay ok hi hello please thanks thank yes also get got like really want wanna gonna
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
"""English function words (and call fillers) that carry no topic; matched before stemming."""

WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
MIN_STEM = 3


@lru_cache(maxsize=65_536)
def stem(word: str) -> str:
    """A light suffix stripper: plurals, -ing, -ed, -ly, a final -e and a doubled final consonant, so
    refund/refunds/refunded/refunding, charge/charges/charged/charging, cancel/cancelled/canceling and
    policy/policies meet. Not Porter: it leaves derivations (-ation, -ment) alone."""
    for suffix, replacement in (("ies", "y"), ("es", "e"), ("s", "")):
        if word.endswith(suffix) and not word.endswith(("ss", "us", "is")) and len(word) - len(suffix) >= MIN_STEM:
            word = word[: -len(suffix)] + replacement
            break
    for suffix in ("ing", "ed", "ly"):
        if word.endswith(suffix) and len(word) - len(suffix) >= MIN_STEM:
            word = word[: -len(suffix)]
            break
    if word.endswith("e") and len(word) > MIN_STEM + 1:
        word = word[:-1]
    if len(word) > MIN_STEM and word[-1] == word[-2] and word[-1] not in "aeiou":
        word = word[:-1]
    return word


def tokenize(text: str) -> list[str]:
    """The index terms of ``text``: lower-case words, stopwords dropped, stemmed (apostrophes: "don't" is one word)."""
    return [stem(word.replace("'", "")) for word in WORD.findall(text.lower().replace("’", "'"))
            if word not in STOPWORDS]


@dataclass(frozen=True, slots=True)
class Article:
    """One knowledge-base article as the index sees it."""

    tenant_id: str
    article_id: str
    title: str
    body: str
    tags: tuple[str, ...] = ()
    reply: str | None = None
    """The reply to suggest; when absent, the first sentence(s) of the body."""
    updated_at: datetime | None = None


BoostFactor = Annotated[StrictFloat, Field(gt=0, le=10)]
"""An emotion boost: a finite multiplier of an article's score, above 0 (0 or less would hide or invert it)."""


class RetrievalSettings(BaseModel):
    """How suggestions are scored; every field has a default a tenant may override."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    k1: StrictFloat = Field(default=1.2, ge=0, le=3, description="BM25 term-frequency saturation")
    b: StrictFloat = Field(default=0.75, ge=0, le=1, description="BM25 length normalisation")
    title_weight: StrictInt = Field(default=2, ge=1, le=10, description="times a title term counts (read when an "
                                    "article is indexed: the index's own settings, not a search's)")
    min_score: StrictFloat = Field(default=1.0, ge=0, le=1000, description="below this score no reply is suggested")
    max_reply_chars: StrictInt = Field(default=240, ge=20, le=4000, description="the body's first sentences up to "
                                       "this length make the reply (at least one sentence, cut at a word if longer)")
    emotion_boosts: dict[str, dict[str, BoostFactor]] = Field(
        default_factory=lambda: {"angry": {"apology": 1.5, "de-escalation": 1.5},
                                 "frustrated": {"apology": 1.5, "de-escalation": 1.5},
                                 "sad": {"empathy": 1.3}},
        description="emotion -> {article tag: score multiplier} applied to matching articles")


@dataclass(frozen=True, slots=True)
class Suggestion:
    """The best article for an utterance and the reply suggested from it."""

    article_id: str
    title: str
    reply: str
    score: float
    boost: float = 1.0
    """The emotion boost applied (1.0: none)."""
    matched_terms: tuple[str, ...] = ()


@dataclass(slots=True)
class _Document:
    article: Article
    frequencies: Counter[str]
    length: int


@dataclass(slots=True)
class _TenantIndex:
    """One tenant's documents and postings (term -> {article id: term frequency})."""

    documents: dict[str, _Document] = field(default_factory=dict)
    postings: dict[str, dict[str, int]] = field(default_factory=dict)
    total_length: int = 0

    def add(self, document: _Document) -> None:
        article_id = document.article.article_id
        self.documents[article_id] = document
        for term, frequency in document.frequencies.items():
            self.postings.setdefault(term, {})[article_id] = frequency
        self.total_length += document.length

    def discard(self, article_id: str) -> bool:
        document = self.documents.pop(article_id, None)
        if document is None:
            return False
        for term in document.frequencies:
            posting = self.postings[term]
            del posting[article_id]
            if not posting:
                del self.postings[term]
        self.total_length -= document.length
        return True

    def scores(self, terms: Counter[str], settings: RetrievalSettings) -> dict[str, tuple[float, list[str]]]:
        """BM25 score and matched terms of every document holding a query term."""
        count = len(self.documents)
        average_length = self.total_length / count if self.total_length else 1.0
        k1, b = settings.k1, settings.b
        scores: dict[str, tuple[float, list[str]]] = {}
        for term, query_frequency in terms.items():
            posting = self.postings.get(term)
            if not posting:
                continue
            idf = math.log(1 + (count - len(posting) + 0.5) / (len(posting) + 0.5))
            for article_id, frequency in posting.items():
                norm = k1 * (1 - b + b * self.documents[article_id].length / average_length)
                score, matched = scores.get(article_id, (0.0, []))
                matched.append(term)
                scores[article_id] = (score + query_frequency * idf * frequency * (k1 + 1) / (frequency + norm),
                                      matched)
        return scores


class KnowledgeIndex:
    """BM25 indexes of every tenant's articles, updated incrementally; safe to share between threads."""

    def __init__(self, settings: RetrievalSettings | None = None) -> None:
        self.settings = settings or RetrievalSettings()
        self._tenants: dict[str, _TenantIndex] = {}
        self._lock = threading.Lock()

    def upsert(self, article: Article) -> None:
        """Index ``article``, replacing the tenant's article of the same id (created or changed)."""
        document = self._document(article)
        with self._lock:
            tenant = self._tenants.setdefault(article.tenant_id, _TenantIndex())
            tenant.discard(article.article_id)
            tenant.add(document)

    def remove(self, tenant_id: str, article_id: str) -> bool:
        """Drop an article (deleted); False when the index did not hold it."""
        with self._lock:
            tenant = self._tenants.get(tenant_id)
            return tenant is not None and tenant.discard(article_id)

    def replace_tenant(self, tenant_id: str, articles: Iterable[Article]) -> None:
        """Make ``articles`` the tenant's whole index (a first load, or a reload from the database)."""
        fresh = _TenantIndex()
        for article in articles:
            if article.tenant_id != tenant_id:
                raise ValueError(f"article {article.article_id!r} belongs to another tenant")
            fresh.discard(article.article_id)
            fresh.add(self._document(article))
        with self._lock:
            self._tenants[tenant_id] = fresh

    def holds(self, tenant_id: str) -> bool:
        """True once the tenant's articles were loaded or one was indexed."""
        with self._lock:
            return tenant_id in self._tenants

    def count(self, tenant_id: str) -> int:
        """How many articles the tenant's index holds."""
        with self._lock:
            tenant = self._tenants.get(tenant_id)
            return 0 if tenant is None else len(tenant.documents)

    def articles(self, tenant_id: str) -> list[Article]:
        """The tenant's indexed articles, by id (what its domain language model is built from)."""
        with self._lock:
            tenant = self._tenants.get(tenant_id)
            return [] if tenant is None else [tenant.documents[key].article for key in sorted(tenant.documents)]

    def search(self, tenant_id: str, text: str, *, emotion: str | None = None, limit: int = 5,
               settings: RetrievalSettings | None = None) -> list[Suggestion]:
        """The tenant's best-matching articles for ``text``, best first (score > 0; no minimum applied)."""
        settings = settings or self.settings
        terms = Counter(tokenize(text))
        boosts = settings.emotion_boosts.get(emotion or "", {})
        with self._lock:
            tenant = self._tenants.get(tenant_id)
            if tenant is None or not terms:
                return []
            scored = [(score * _boost(tenant.documents[article_id].article, boosts), article_id, matched,
                       tenant.documents[article_id].article)
                      for article_id, (score, matched) in tenant.scores(terms, settings).items() if score > 0]
        best = heapq.nsmallest(limit, scored, key=lambda hit: (-hit[0], hit[1]))
        return [Suggestion(article.article_id, article.title, reply_of(article, settings.max_reply_chars), score,
                           _boost(article, boosts), tuple(sorted(matched))) for score, _, matched, article in best]

    def suggest(self, tenant_id: str, text: str, *, emotion: str | None = None,
                settings: RetrievalSettings | None = None) -> Suggestion | None:
        """The tenant's best article for ``text`` with its reply, or None when none scores ``min_score``."""
        settings = settings or self.settings
        best = self.search(tenant_id, text, emotion=emotion, limit=1, settings=settings)
        return best[0] if best and best[0].score >= settings.min_score else None

    def _document(self, article: Article) -> _Document:
        frequencies: Counter[str] = Counter()
        for _ in range(self.settings.title_weight):
            frequencies.update(tokenize(article.title))
        frequencies.update(tokenize(article.body))
        return _Document(article, frequencies, sum(frequencies.values()))


def _boost(article: Article, boosts: Mapping[str, float]) -> float:
    """The largest boost of the article's tags (1.0: none)."""
    return max((boosts.get(tag, 1.0) for tag in article.tags), default=1.0)


def reply_of(article: Article, max_chars: int = 240) -> str:
    """The reply to suggest from ``article``: its ``reply``, else its body's first sentences within ``max_chars``."""
    if article.reply and article.reply.strip():
        return article.reply.strip()
    sentences = [s for s in SENTENCE_END.split(" ".join(article.body.split())) if s]
    if not sentences:
        return article.title.strip()
    reply = sentences[0]
    for sentence in sentences[1:]:
        if len(reply) + 1 + len(sentence) > max_chars:
            break
        reply = f"{reply} {sentence}"
    if len(reply) > max_chars:
        reply = reply[:max_chars].rsplit(" ", 1)[0].rstrip(",;:") + "…"
    return reply
