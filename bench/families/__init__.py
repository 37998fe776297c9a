"""Per-family serving benchmarks that bench/runtime.py runs (3D volumes, audio + text fusion, sensor windows)."""
