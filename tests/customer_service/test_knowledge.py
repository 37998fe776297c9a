"""Knowledge-base retrieval alone: the tokenizer and stemmer, BM25 against a hand computation, the
suggested reply, the minimum score, the emotion boost, tenant isolation and incremental updates
that leave the index as a fresh build of the same articles would be."""

from __future__ import annotations

import math
import threading

import pytest

from services.customer_service.knowledge import (
    Article,
    KnowledgeIndex,
    RetrievalSettings,
    reply_of,
    stem,
    tokenize,
)

TENANT = "acme"
REFUND = Article(TENANT, "refund", "Refund policy",
                 "Refunds are issued to the original card within five business days. Tell the caller the "
                 "reference number. Escalate refunds over 500 dollars to billing.", ("billing",))
PASSWORD = Article(TENANT, "password", "Reset a password",
                   "Send the reset link to the email on file. The link expires after one hour.", ("account",))
DELIVERY = Article(TENANT, "late-delivery", "Late delivery",
                   "Check the tracking number and the carrier's status. Offer a delivery credit when the "
                   "parcel is more than three days late.", ("shipping",),
                   reply="I can see your parcel is delayed; let me check the carrier's tracking for you.")
APOLOGY = Article(TENANT, "apology-charges", "Double charge apology",
                  "I'm truly sorry you were charged twice. I will reverse the duplicate charge right now.",
                  ("apology", "billing"))
CHARGES = Article(TENANT, "charges", "Duplicate charges",
                  "A duplicate charge is reversed by billing. I will reverse the duplicate charge right now.",
                  ("billing",))
ARTICLES = (REFUND, PASSWORD, DELIVERY)


def index_of(*articles: Article, settings: RetrievalSettings | None = None) -> KnowledgeIndex:
    index = KnowledgeIndex(settings)
    for article in articles:
        index.upsert(article)
    return index


@pytest.mark.parametrize("family", [("refund", "refunds", "refunded", "refunding"),
                                    ("charge", "charges", "charged", "charging"),
                                    ("cancel", "cancels", "cancelled", "cancelling", "canceled", "canceling"),
                                    ("policy", "policies"), ("bill", "bills", "billing", "billed"),
                                    ("address", "addresses"), ("order", "orders", "ordered")])
def test_the_stemmer_brings_a_words_forms_together(family: tuple[str, ...]) -> None:
    assert len({stem(word) for word in family}) == 1


def test_the_stemmer_keeps_short_and_s_ending_words() -> None:
    assert [stem(w) for w in ("status", "bus", "this", "is", "gas", "was")] == ["status", "bus", "this", "is",
                                                                                "gas", "was"]


def test_tokenize_drops_stopwords_and_fillers_and_keeps_contractions_whole() -> None:
    assert tokenize("Um, I DON'T want the card charged twice — I’m cancelling!") == ["card", "charg", "twic",
                                                                                   "cancel"]
    assert tokenize("the of and to") == [] and tokenize("") == []


def test_bm25_matches_a_hand_computation() -> None:
    settings = RetrievalSettings(title_weight=1, min_score=0)
    a = Article(TENANT, "a", "refund", "refund card")
    b = Article(TENANT, "b", "password", "reset password link email")
    index = index_of(a, b, settings=settings)
    [hit] = index.search(TENANT, "refund", settings=settings)
    k1, bb, n, df, tf, length, average = 1.2, 0.75, 2, 1, 2, 3, (3 + 5) / 2
    idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
    expected = idf * tf * (k1 + 1) / (tf + k1 * (1 - bb + bb * length / average))
    assert hit.article_id == "a" and math.isclose(hit.score, expected) and hit.matched_terms == ("refund",)


def test_the_best_article_and_its_reply() -> None:
    index = index_of(*ARTICLES, settings=RetrievalSettings(max_reply_chars=120))
    suggestion = index.suggest(TENANT, "hi I was wondering when my refund gets back to my card")
    assert suggestion is not None and suggestion.article_id == "refund"
    assert suggestion.reply == ("Refunds are issued to the original card within five business days. Tell the "
                                "caller the reference number.")  # the first sentences within 120 characters
    assert suggestion.score >= 1.0 and suggestion.boost == 1.0
    delivery = index.suggest(TENANT, "my parcel is late and tracking shows nothing")
    assert delivery is not None and delivery.reply == DELIVERY.reply
    password = index.suggest(TENANT, "I forgot my password")
    assert password is not None and password.article_id == "password"


def test_nothing_is_suggested_below_the_minimum_score_or_without_terms() -> None:
    index = index_of(*ARTICLES)
    assert index.suggest(TENANT, "what a lovely day it is") is None
    assert index.suggest(TENANT, "the and of um uh") is None
    assert index.suggest(TENANT, "") is None
    weak = index.search(TENANT, "card")[0]  # one common word: matched, but weakly
    assert index.suggest(TENANT, "card", settings=RetrievalSettings(min_score=weak.score + 0.01)) is None
    assert index.suggest(TENANT, "card", settings=RetrievalSettings(min_score=weak.score)) is not None


def test_an_angry_caller_gets_the_apology_snippet_of_equal_relevance() -> None:
    index = index_of(CHARGES, APOLOGY, *ARTICLES)
    query = "you charged me twice, reverse the duplicate charge"
    calm = index.suggest(TENANT, query)
    angry = index.suggest(TENANT, query, emotion="angry")
    assert calm is not None and angry is not None
    assert angry.article_id == "apology-charges" and angry.boost == 1.5
    assert calm.boost == 1.0
    assert index.suggest(TENANT, "a lovely day", emotion="angry") is None  # a boost alone never matches


def test_each_tenant_retrieves_only_its_own_articles() -> None:
    other = Article("globex", "secret", "Refund secret", "Globex refunds in cash at the counter.")
    hours = Article("globex", "hours", "Opening hours", "The counter opens at nine.")
    index = index_of(*ARTICLES, other, hours)
    for _ in range(3):
        suggestion = index.suggest(TENANT, "refund in cash at the counter")
        assert suggestion is not None and suggestion.article_id == "refund"
    globex = index.suggest("globex", "refund")
    assert globex is not None and globex.article_id == "secret"
    assert index.suggest("initech", "refund") is None
    assert index.count(TENANT) == 3 and index.count("globex") == 2 and not index.holds("initech")


def test_incremental_updates_equal_a_fresh_build() -> None:
    index = index_of(*ARTICLES)
    changed = Article(TENANT, "password", "Unlock an account", "Unlock the account after three failed logins.")
    index.upsert(changed)
    index.upsert(APOLOGY)
    assert index.remove(TENANT, "late-delivery")
    assert not index.remove(TENANT, "late-delivery") and not index.remove("nobody", "x")
    fresh = index_of(REFUND, changed, APOLOGY)
    for query in ("refund my card", "reset password", "unlock my account", "parcel late", "charged twice"):
        assert index.search(TENANT, query) == fresh.search(TENANT, query), query
    assert index.suggest(TENANT, "reset password link") is None  # the old text is gone
    tenant = index._tenants[TENANT]
    assert tenant.postings == fresh._tenants[TENANT].postings
    assert tenant.total_length == sum(doc.length for doc in tenant.documents.values())
    assert all(tenant.postings.values())  # no term is left without a document


def test_replace_tenant_loads_a_tenant_whole_and_checks_ownership() -> None:
    index = index_of(*ARTICLES)
    index.replace_tenant(TENANT, [APOLOGY])
    assert index.count(TENANT) == 1
    with pytest.raises(ValueError, match="another tenant"):
        index.replace_tenant("globex", [REFUND])
    assert index.count(TENANT) == 1


def test_reply_falls_back_to_sentences_then_title_and_cuts_long_ones() -> None:
    assert reply_of(Article(TENANT, "x", "Title", "One. Two! Three?"), 240) == "One. Two! Three?"
    assert reply_of(Article(TENANT, "x", "Title", "One.  Two.", reply="  ")) == "One. Two."
    assert reply_of(Article(TENANT, "x", "Title only", "")) == "Title only"
    long = reply_of(Article(TENANT, "x", "T", "word " * 100 + "end."), 40)
    assert long.endswith("…") and len(long) <= 41 and " " in long


def test_updates_and_searches_from_many_threads() -> None:
    index = index_of(*ARTICLES)
    errors: list[BaseException] = []

    def churn(worker: int) -> None:
        try:
            for i in range(200):
                article = Article(TENANT, f"w{worker}-{i % 5}", f"topic {i}", f"body about refunds {i}")
                index.upsert(article)
                index.search(TENANT, "refund")
                if i % 3 == 0:
                    index.remove(TENANT, article.article_id)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    tenant = index._tenants[TENANT]
    expected: dict[str, dict[str, int]] = {}
    for article_id, document in tenant.documents.items():
        for term, frequency in document.frequencies.items():
            expected.setdefault(term, {})[article_id] = frequency
    assert tenant.postings == expected
