"""The failure-risk model and its runtime adapter: not built yet (issue 19).

Its responsibility: an attention model over sensor windows predicting P(failure within 72 h) and
remaining useful life, served through the shared model runtime, and a tiny edge variant exported
to ONNX (under 1 MB) for ``tessera edge``.
"""
