"""The escalation policy over a call's utterance stream, and its running sentiment trend.

Three rules watch the customer's utterances (the agent's only feed the agent's own trend):

- ``emotion``: the probability of anger/frustration (the sum over :attr:`EscalationPolicy.anger_labels`)
  at or above ``anger_threshold`` on ``anger_consecutive`` consecutive customer utterances;
- ``keyword``: a customer utterance contains one of ``keywords`` (whole words, any case);
- ``negative_streak``: ``negative_streak`` consecutive customer utterances whose valence is below
  ``negative_valence_threshold``.

Each rule fires once and is then disarmed (hysteresis): it re-arms only after ``rearm_after``
consecutive customer utterances in which its signal is clear, that is below
``anger_release_threshold``, without a keyword, or with valence at or above
``negative_release_valence``. An utterance between those levels neither fires nor re-arms.

Valence of an utterance: ``sum(p(label) * VALENCE[label])`` over its emotion probabilities
(normalised to sum 1; a label without a valence counts 0). The trend is an exponentially weighted
moving average of it per speaker: ``trend = alpha * valence + (1 - alpha) * trend``, starting at the
first utterance's valence.

Everything here is pure: one :class:`EscalationTracker` per call, fed in order; no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator, model_validator

DEFAULT_VALENCE: dict[str, float] = {
    "angry": -1.0,
    "frustrated": -0.8,
    "disgust": -0.8,
    "fearful": -0.6,
    "sad": -0.6,
    "neutral": 0.0,
    "surprised": 0.0,
    "calm": 0.3,
    "happy": 1.0,
}
"""Valence of each emotion label in [-1, 1]: anger the most negative, happiness the most positive.
Covers the labels of the acted data (neutral, happy, sad, angry) and the usual others."""

DEFAULT_KEYWORDS = ("supervisor", "speak to a manager", "talk to a manager", "your manager", "cancel my account",
                    "cancel my subscription", "close my account", "lawyer", "attorney", "sue you", "legal action",
                    "file a complaint", "better business bureau", "unacceptable")
"""Phrases rather than single words where a word alone is common ("sue" is also a name)."""
CUSTOMER = "customer"


class Rule(StrEnum):
    """Which rule of the policy fired."""

    EMOTION = "emotion"
    KEYWORD = "keyword"
    NEGATIVE_STREAK = "negative_streak"


class EscalationPolicy(BaseModel):
    """When a call is escalated to a supervisor; every field has a default a tenant may override."""

    # numbers are JSON numbers (no "3" or true), finite: a tenant's overrides are validated with this model
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    anger_labels: tuple[str, ...] = Field(default=("angry", "frustrated"), min_length=1,
                                          description="emotion labels whose probabilities add up to the anger signal")
    anger_threshold: StrictFloat = Field(default=0.6, gt=0, le=1, description="anger probability that counts toward "
                                         "the emotion rule")
    anger_release_threshold: StrictFloat = Field(default=0.4, ge=0, le=1, description="below this the emotion rule's "
                                                 "signal is clear (re-arming); at most anger_threshold")
    anger_consecutive: StrictInt = Field(default=2, ge=1, le=50, description="consecutive customer utterances at or "
                                         "above anger_threshold that fire the emotion rule")
    keywords: tuple[str, ...] = Field(default=DEFAULT_KEYWORDS, description="words or phrases that fire the "
                                      "keyword rule (whole words, any case)")
    negative_valence_threshold: StrictFloat = Field(default=-0.3, ge=-1, le=1, description="a customer utterance with "
                                                    "valence below this is negative")
    negative_release_valence: StrictFloat = Field(default=0.0, ge=-1, le=1, description="at or above this the negative "
                                                  "streak's signal is clear; at least negative_valence_threshold")
    negative_streak: StrictInt = Field(default=4, ge=1, le=100, description="consecutive negative customer utterances "
                                       "that fire the negative-streak rule")
    rearm_after: StrictInt = Field(default=2, ge=1, le=100, description="consecutive clear customer utterances after "
                                   "which a fired rule can fire again")
    sentiment_alpha: StrictFloat = Field(default=0.3, gt=0, le=1, description="weight of the newest utterance in the "
                                         "sentiment trend (EWMA)")
    valence: dict[str, StrictFloat] = Field(default_factory=lambda: dict(DEFAULT_VALENCE),
                                            description="valence of each emotion label in [-1, 1]")
    customer_speakers: tuple[str, ...] = Field(default=(CUSTOMER,), min_length=1,
                                               description="speakers whose utterances the rules watch")

    @field_validator("keywords")
    @classmethod
    def _normalised_keywords(cls, keywords: tuple[str, ...]) -> tuple[str, ...]:
        normalised = tuple(dict.fromkeys(" ".join(_words(keyword)) for keyword in keywords))
        if any(not keyword for keyword in normalised):
            raise ValueError("a keyword must hold at least one letter or digit")
        return normalised

    @field_validator("valence")
    @classmethod
    def _valence_in_range(cls, valence: dict[str, float]) -> dict[str, float]:
        for label, value in valence.items():
            if not -1.0 <= value <= 1.0:
                raise ValueError(f"valence of {label!r} is {value}; it must lie in [-1, 1]")
        return valence

    @model_validator(mode="after")
    def _release_below_fire(self) -> Self:
        if self.anger_release_threshold > self.anger_threshold:
            raise ValueError("anger_release_threshold must not exceed anger_threshold")
        if self.negative_release_valence < self.negative_valence_threshold:
            raise ValueError("negative_release_valence must not be below negative_valence_threshold")
        return self

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> EscalationPolicy:
        """This policy with a tenant's ``overrides`` applied, validated as a whole (ValidationError if not)."""
        if not overrides:
            return self
        return EscalationPolicy.model_validate({**self.model_dump(), **overrides})


@dataclass(frozen=True, slots=True)
class Utterance:
    """What the tracker needs of one utterance: who spoke, when, what (redacted) and how it sounded."""

    speaker: str
    emotion_probabilities: Mapping[str, float]
    text: str | None = None
    index: int = 0
    """Its place in the call (0, 1, ...), echoed in the evidence."""
    at_ms: int = 0
    """Its end, from the start of the call."""


@dataclass(frozen=True, slots=True)
class EscalationEvent:
    """A rule fired: which, on which utterance, and the evidence that made it fire."""

    rule: Rule
    utterance_index: int
    at_ms: int
    evidence: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (for the assist feed and the escalations table)."""
        return {"rule": self.rule.value, "utterance_index": self.utterance_index, "at_ms": self.at_ms,
                "evidence": self.evidence}


class TrendDirection(StrEnum):
    """Where a speaker's sentiment is heading."""

    IMPROVING = "improving"
    WORSENING = "worsening"
    STEADY = "steady"


TREND_STEADY_BAND = 0.05
"""A change of the trend smaller than this is steady."""


@dataclass(frozen=True, slots=True)
class Assessment:
    """What one utterance adds: its valence and anger, the speaker's trend, the events that fired."""

    speaker: str
    valence: float
    anger: float
    trend: float
    direction: TrendDirection
    events: tuple[EscalationEvent, ...]


def normalised_probabilities(probabilities: Mapping[str, float]) -> dict[str, float]:
    """``probabilities`` scaled to sum 1; ValueError for a negative or non-finite one, or an all-zero set."""
    for label, value in probabilities.items():
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"probability of {label!r} is {value}; it must be finite and non-negative")
    total = sum(probabilities.values())
    if total <= 0:
        raise ValueError("emotion probabilities must not be empty or all zero")
    return {label: value / total for label, value in probabilities.items()}


def valence_of(probabilities: Mapping[str, float], valence: Mapping[str, float] = DEFAULT_VALENCE) -> float:
    """Expected valence of an utterance: each label's probability times its valence (unknown labels: 0)."""
    return sum(p * valence.get(label, 0.0) for label, p in normalised_probabilities(probabilities).items())


def anger_of(probabilities: Mapping[str, float], anger_labels: tuple[str, ...]) -> float:
    """The anger signal: the summed probability of ``anger_labels``."""
    return sum(p for label, p in normalised_probabilities(probabilities).items() if label in anger_labels)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def keyword_in(text: str | None, keywords: tuple[str, ...]) -> str | None:
    """The first of ``keywords`` (normalised: lower case words) that ``text`` contains as whole words."""
    if not text:
        return None
    padded = f" {' '.join(_words(text))} "
    return next((keyword for keyword in keywords if f" {keyword} " in padded), None)


@dataclass(slots=True)
class _Hysteresis:
    """One rule's state: armed or not, the current run of firing and of clear utterances."""

    needed: int
    rearm_after: int
    armed: bool = True
    hot: list[tuple[int, float]] = field(default_factory=list)
    clear_run: int = 0

    def step(self, index: int, value: float, firing: bool, clear: bool) -> list[tuple[int, float]] | None:
        """Feed one customer utterance; returns the run that fired (once per arming), else None."""
        self.hot = [*self.hot, (index, value)][-self.needed:] if firing else []
        self.clear_run = self.clear_run + 1 if clear else 0
        if not self.armed:
            if self.clear_run >= self.rearm_after:
                self.armed, self.hot = True, []
            return None
        if len(self.hot) >= self.needed:
            fired, self.armed, self.hot, self.clear_run = self.hot, False, [], 0
            return fired
        return None


class EscalationTracker:
    """The policy applied to one call's utterances, in order (not thread-safe: one per call)."""

    def __init__(self, policy: EscalationPolicy | None = None) -> None:
        self.policy = policy or EscalationPolicy()
        self._trends: dict[str, float] = {}
        self._emotion = _Hysteresis(self.policy.anger_consecutive, self.policy.rearm_after)
        self._keyword = _Hysteresis(1, self.policy.rearm_after)
        self._negative = _Hysteresis(self.policy.negative_streak, self.policy.rearm_after)
        self.events: list[EscalationEvent] = []

    def trend(self, speaker: str = CUSTOMER) -> float | None:
        """The speaker's current sentiment trend (None before their first utterance)."""
        return self._trends.get(speaker)

    def observe(self, utterance: Utterance) -> Assessment:
        """Feed the next utterance; its assessment with the events it fired (ValueError: bad probabilities)."""
        policy = self.policy
        valence = valence_of(utterance.emotion_probabilities, policy.valence)
        anger = anger_of(utterance.emotion_probabilities, policy.anger_labels)
        previous = self._trends.get(utterance.speaker)
        alpha = policy.sentiment_alpha
        trend = valence if previous is None else alpha * valence + (1 - alpha) * previous
        self._trends[utterance.speaker] = trend
        events: tuple[EscalationEvent, ...] = ()
        if utterance.speaker in policy.customer_speakers:
            events = self._apply_rules(utterance, valence, anger)
            self.events.extend(events)
        return Assessment(utterance.speaker, valence, anger, trend, _direction(previous, trend), events)

    def _apply_rules(self, utterance: Utterance, valence: float, anger: float) -> tuple[EscalationEvent, ...]:
        policy, index = self.policy, utterance.index
        events: list[EscalationEvent] = []
        run = self._emotion.step(index, anger, anger >= policy.anger_threshold, anger < policy.anger_release_threshold)
        if run is not None:
            events.append(self._event(Rule.EMOTION, utterance, {
                "labels": list(policy.anger_labels), "threshold": policy.anger_threshold,
                "utterances": [{"index": i, "anger": round(v, 4)} for i, v in run]}))
        keyword = keyword_in(utterance.text, policy.keywords)
        if self._keyword.step(index, 1.0, keyword is not None, keyword is None) is not None:
            events.append(self._event(Rule.KEYWORD, utterance, {"keyword": keyword, "utterance_index": index}))
        run = self._negative.step(index, valence, valence < policy.negative_valence_threshold,
                                  valence >= policy.negative_release_valence)
        if run is not None:
            events.append(self._event(Rule.NEGATIVE_STREAK, utterance, {
                "threshold": policy.negative_valence_threshold,
                "utterances": [{"index": i, "valence": round(v, 4)} for i, v in run]}))
        return tuple(events)

    @staticmethod
    def _event(rule: Rule, utterance: Utterance, evidence: dict[str, Any]) -> EscalationEvent:
        return EscalationEvent(rule, utterance.index, utterance.at_ms, evidence)


def _direction(previous: float | None, trend: float) -> TrendDirection:
    if previous is None or abs(trend - previous) < TREND_STEADY_BAND:
        return TrendDirection.STEADY
    return TrendDirection.IMPROVING if trend > previous else TrendDirection.WORSENING
