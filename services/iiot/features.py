"""Windowed sensor features: not built yet (issue 19).

Its responsibility: statistics, trends and spectral features over each sensor's windows,
computed vectorised, as the model's input and the edge variant's.
"""
