"""The call simulator with ground truth: not built yet (issue 18).

It will synthesise customer-service calls with espeak-ng (per-emotion prosody, several voices,
scripts per emotion, telephone-band μ-law) for training, tests and the latency benchmark, and
provide ``main(argv)`` for ``tessera simulate cs`` once declared in ``vertical.py``.
"""
