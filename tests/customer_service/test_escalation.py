"""The escalation policy alone: each rule fires on its condition with its evidence, once, and re-arms
only after its signal has been clear long enough (hysteresis); the sentiment trend is the EWMA of
each speaker's valence; a tenant's overrides are validated."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from weakref import WeakKeyDictionary

import pytest
from pydantic import ValidationError

from services.customer_service.escalation import (
    DEFAULT_VALENCE,
    EscalationPolicy,
    EscalationTracker,
    Rule,
    TrendDirection,
    Utterance,
    anger_of,
    keyword_in,
    valence_of,
)

ANGRY = {"angry": 0.9, "neutral": 0.1}
SOMEWHAT = {"angry": 0.5, "neutral": 0.5}  # between the release level (0.4) and the threshold (0.6)
CALM = {"neutral": 0.9, "angry": 0.1}
HAPPY = {"happy": 1.0}
SAD = {"sad": 1.0}
QUIET = EscalationPolicy(keywords=(), negative_streak=100)
"""Only the emotion rule can fire."""


FIRST_INDEX = 100
_indexes: WeakKeyDictionary[EscalationTracker, Iterator[int]] = WeakKeyDictionary()


def feed(tracker: EscalationTracker, *emotions: dict[str, float], speaker: str = "customer",
         texts: tuple[str | None, ...] = ()) -> list[list[Rule]]:
    """Feed utterances in order (indexes from :data:`FIRST_INDEX` on, at 1 s each); the rules fired by each."""
    indexes = _indexes.setdefault(tracker, itertools.count(FIRST_INDEX))
    fired = []
    for offset, probabilities in enumerate(emotions):
        index = next(indexes)
        text = texts[offset] if offset < len(texts) else None
        assessment = tracker.observe(Utterance(speaker, probabilities, text, index=index, at_ms=1000 * index))
        fired.append([event.rule for event in assessment.events])
    return fired


def test_valence_is_the_expectation_over_the_explicit_map() -> None:
    assert valence_of({"angry": 1.0}) == -1.0
    assert valence_of(HAPPY) == 1.0
    assert valence_of({"angry": 0.5, "happy": 0.5}) == 0.0
    assert math.isclose(valence_of({"sad": 0.25, "neutral": 0.75}), 0.25 * DEFAULT_VALENCE["sad"])
    assert valence_of({"bored": 1.0}) == 0.0  # a label the map lacks counts 0
    assert math.isclose(valence_of({"angry": 2.0, "happy": 2.0}), 0.0)  # scaled to sum 1
    assert all(-1.0 <= value <= 1.0 for value in DEFAULT_VALENCE.values())


@pytest.mark.parametrize("probabilities", [{}, {"angry": 0.0}, {"angry": -0.1, "happy": 1.1},
                                           {"angry": math.nan}, {"happy": math.inf}])
def test_bad_probabilities_are_a_precise_error(probabilities: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="probabilit"):
        EscalationTracker().observe(Utterance("customer", probabilities))


def test_anger_sums_the_configured_labels() -> None:
    assert math.isclose(anger_of({"angry": 0.3, "frustrated": 0.3, "neutral": 0.4}, ("angry", "frustrated")), 0.6)
    assert anger_of({"angry": 0.3, "neutral": 0.7}, ("frustrated",)) == 0.0


def test_anger_on_consecutive_customer_utterances_fires_once_with_evidence() -> None:
    tracker = EscalationTracker(QUIET)
    assert feed(tracker, ANGRY) == [[]]
    assert feed(tracker, CALM, ANGRY) == [[], []]  # a calm utterance breaks the run
    assert feed(tracker, ANGRY) == [[Rule.EMOTION]]
    [event] = tracker.events
    assert event.rule == Rule.EMOTION and event.utterance_index == 103 and event.at_ms == 103_000
    assert event.evidence == {"labels": ["angry", "frustrated"], "threshold": 0.6,
                              "utterances": [{"index": 102, "anger": 0.9}, {"index": 103, "anger": 0.9}]}
    assert feed(tracker, ANGRY, ANGRY, ANGRY) == [[], [], []]  # disarmed: stays angry, no new event


def test_the_emotion_rule_rearms_only_after_m_clear_utterances() -> None:
    tracker = EscalationTracker(QUIET.model_copy(update={"rearm_after": 2}))
    assert feed(tracker, ANGRY, ANGRY) == [[], [Rule.EMOTION]]
    assert feed(tracker, CALM, SOMEWHAT, ANGRY, ANGRY) == [[], [], [], []]  # one clear, then between: no re-arm
    assert feed(tracker, CALM, CALM) == [[], []]  # re-armed now
    assert feed(tracker, ANGRY, ANGRY) == [[], [Rule.EMOTION]]
    assert len(tracker.events) == 2


def test_utterances_between_the_levels_keep_a_fired_rule_disarmed() -> None:
    tracker = EscalationTracker(QUIET.model_copy(update={"rearm_after": 1}))
    feed(tracker, ANGRY, ANGRY)
    assert feed(tracker, *[SOMEWHAT] * 5, ANGRY, ANGRY) == [[]] * 7
    assert feed(tracker, CALM, ANGRY, ANGRY) == [[], [], [Rule.EMOTION]]


def test_the_agent_neither_fires_nor_breaks_the_customers_run() -> None:
    tracker = EscalationTracker(QUIET)
    assert feed(tracker, ANGRY, ANGRY, speaker="agent") == [[], []]
    assert feed(tracker, ANGRY) == [[]]
    assert feed(tracker, CALM, speaker="agent") == [[]]
    assert feed(tracker, ANGRY) == [[Rule.EMOTION]]


def test_keywords_fire_on_customer_words_as_whole_words() -> None:
    tracker = EscalationTracker(EscalationPolicy(keywords=("supervisor", "Cancel my ACCOUNT"), rearm_after=1))
    assert feed(tracker, CALM, CALM, texts=("I want to CANCEL my account!", "my supervisor's name")) == [
        [Rule.KEYWORD], []]  # second one: disarmed (no clear utterance in between)
    assert tracker.events[0].evidence == {"keyword": "cancel my account", "utterance_index": 100}
    assert feed(tracker, CALM, CALM, texts=("thanks", "get me a supervisor")) == [[], [Rule.KEYWORD]]
    assert feed(tracker, CALM, texts=("let me get my supervisor",), speaker="agent") == [[]]
    assert keyword_in("supervisors are great", ("supervisor",)) is None  # whole words only
    assert keyword_in("cancel   my\naccount", ("cancel my account",)) == "cancel my account"
    assert keyword_in(None, ("supervisor",)) is None


def test_a_negative_streak_fires_on_n_negative_utterances() -> None:
    tracker = EscalationTracker(EscalationPolicy(anger_threshold=1.0, anger_release_threshold=0.5, keywords=(),
                                                 negative_streak=3, rearm_after=1))
    assert feed(tracker, SAD, SAD, CALM, SAD, SAD) == [[], [], [], [], []]
    assert feed(tracker, SAD) == [[Rule.NEGATIVE_STREAK]]
    event = tracker.events[-1]
    assert event.evidence == {"threshold": -0.3, "utterances": [{"index": 103, "valence": -0.6},
                                                                {"index": 104, "valence": -0.6},
                                                                {"index": 105, "valence": -0.6}]}
    assert feed(tracker, SAD, SAD, SAD, HAPPY, SAD, SAD, SAD) == [[], [], [], [], [], [], [Rule.NEGATIVE_STREAK]]


def test_one_utterance_can_fire_several_rules() -> None:
    tracker = EscalationTracker(EscalationPolicy(anger_consecutive=1, negative_streak=1))
    [fired] = feed(tracker, ANGRY, texts=("this is unacceptable, get me a supervisor",))
    assert fired == [Rule.EMOTION, Rule.KEYWORD, Rule.NEGATIVE_STREAK]
    assert [e.as_dict()["rule"] for e in tracker.events] == ["emotion", "keyword", "negative_streak"]


def test_the_trend_is_an_ewma_per_speaker() -> None:
    tracker = EscalationTracker(EscalationPolicy(sentiment_alpha=0.5))
    first = tracker.observe(Utterance("customer", HAPPY))
    assert (first.trend, first.direction) == (1.0, TrendDirection.STEADY)
    second = tracker.observe(Utterance("customer", {"angry": 1.0}))
    assert (second.valence, second.trend, second.direction) == (-1.0, 0.0, TrendDirection.WORSENING)
    agent = tracker.observe(Utterance("agent", {"neutral": 1.0}))
    assert agent.trend == 0.0 and tracker.trend("agent") == 0.0
    third = tracker.observe(Utterance("customer", HAPPY))
    assert (third.trend, third.direction) == (0.5, TrendDirection.IMPROVING)
    assert tracker.trend("customer") == 0.5 and tracker.trend("nobody") is None


def test_policy_defaults_and_tenant_overrides_are_validated() -> None:
    base = EscalationPolicy()
    assert base.anger_threshold == 0.6 and "supervisor" in base.keywords and base.valence == DEFAULT_VALENCE
    tenant = base.with_overrides({"anger_threshold": 0.8, "keywords": ["Refund NOW", "refund now"]})
    assert tenant.anger_threshold == 0.8 and tenant.keywords == ("refund now",)
    assert tenant.rearm_after == base.rearm_after
    assert base.with_overrides(None) is base
    with pytest.raises(ValidationError, match="anger_release_threshold"):
        base.with_overrides({"anger_threshold": 0.3})  # below the default release level
    with pytest.raises(ValidationError, match="extra"):
        base.with_overrides({"anger_treshold": 0.3})
    with pytest.raises(ValidationError, match=r"valence of 'angry'"):
        EscalationPolicy(valence={"angry": -2.0})
    with pytest.raises(ValidationError, match="keyword"):
        EscalationPolicy(keywords=("  ",))
    assert EscalationPolicy.model_validate_json(base.model_dump_json()) == base
