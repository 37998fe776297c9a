"""Training the emotion model: not built yet (issue 18).

It will provide ``main(argv)`` for ``tessera train cs``, declared in ``vertical.py`` once it exists
(until then the CLI says the vertical offers no ``train``): on simulated calls and on the acted
speech in ``../shared/datasets/emotion_speech/``, with speaker-independent splits and a model card.
"""
