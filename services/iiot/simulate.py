"""The fleet simulator with ground truth: not built yet (issue 19).

It will simulate assets with several failure modes, degradation paths, sensor noise and drift,
maintenance resets and operating regimes, and provide ``main(argv)`` for ``tessera simulate iiot``
once declared in ``vertical.py``.
"""
