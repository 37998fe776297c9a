"""The emotion-aware customer-service vertical's declaration (see :mod:`shared.verticals`)."""

from shared.verticals import Vertical

VERTICAL = Vertical(name="cs", title="Emotion-aware customer service",
                    commands={"train": "training:main", "simulate": "simulate:main"},
                    benchmarks=("customer_service", "cs_emotion_eval"))
