"""Emotion-aware customer service (`/cs`)."""
