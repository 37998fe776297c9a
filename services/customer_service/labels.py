"""The emotion labels of the customer-service vertical and how the data sets' labels map onto them.

One label set serves the simulator, the real acted speech, the model and the assist feed:

=============  ==========================================  ===================================
label          simulated calls (espeak-ng, per-emotion      real acted speech (RAVDESS subset in
               prosody and scripts)                          ``../shared/datasets/emotion_speech``)
=============  ==========================================  ===================================
neutral        routine requests, agent turns               ``01`` neutral
happy          a satisfied customer ("happy/satisfied")     ``03`` happy
sad            bereavement, hardship, disappointment        ``04`` sad
angry          hostile, raised voice                        ``05`` angry
frustrated     exasperated, repeated failures               (none)
=============  ==========================================  ===================================

``frustrated`` exists because a contact centre cares about it most (escalation fires on anger *or*
frustration) and because the usual 4-class speech-emotion benchmarks (IEMOCAP, RAVDESS subsets)
have no such class. On the real set the model is therefore scored on four classes with the
probability of ``frustrated`` added to ``angry`` (:func:`fold_to_real`): both are negative
high-arousal states, and the escalation policy treats them alike. RAVDESS's other emotions (calm,
fearful, disgust, surprised) are not in our subset and map to nothing (:data:`RAVDESS_EMOTIONS`).
"""

from __future__ import annotations

from collections.abc import Mapping

EMOTIONS: tuple[str, ...] = ("neutral", "happy", "sad", "angry", "frustrated")
"""The model's output classes, in index order."""

REAL_EMOTIONS: tuple[str, ...] = ("neutral", "happy", "sad", "angry")
"""The classes the real acted speech has (the IEMOCAP-style 4 classes)."""

FOLDED_INTO: Mapping[str, str] = {"frustrated": "angry"}
"""Labels without a real-set counterpart, and the real label they are scored as."""

RAVDESS_EMOTIONS: Mapping[str, str | None] = {
    "01": "neutral", "02": None, "03": "happy", "04": "sad", "05": "angry",
    "06": None, "07": None, "08": None,
}
"""RAVDESS emotion code (third field of the file name) to our label; ``None``: not used
(calm, fearful, disgust, surprised)."""

NEGATIVE_AROUSED: frozenset[str] = frozenset({"angry", "frustrated"})
"""The labels the escalation policy watches."""


def label_index(label: str) -> int:
    """Index of ``label`` in :data:`EMOTIONS`; ``ValueError`` naming the known labels otherwise."""
    try:
        return EMOTIONS.index(label)
    except ValueError:
        raise ValueError(f"unknown emotion label {label!r}; known: {', '.join(EMOTIONS)}") from None


def fold_to_real(probabilities: Mapping[str, float]) -> dict[str, float]:
    """Probabilities over :data:`EMOTIONS` as probabilities over :data:`REAL_EMOTIONS` (folded
    labels added to their counterpart), for scoring on the real acted speech."""
    folded = {label: 0.0 for label in REAL_EMOTIONS}
    for label, probability in probabilities.items():
        target = FOLDED_INTO.get(label, label)
        if target not in folded:
            raise ValueError(f"unknown emotion label {label!r}; known: {', '.join(EMOTIONS)}")
        folded[target] += probability
    return folded


def fold_label(label: str) -> str:
    """A label as scored on the real set (``frustrated`` -> ``angry``, others unchanged)."""
    label_index(label)
    return FOLDED_INTO.get(label, label)
