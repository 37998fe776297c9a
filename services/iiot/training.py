"""Training the failure-risk model: not built yet (issue 19).

It will provide ``main(argv)`` for ``tessera train iiot``, declared in ``vertical.py`` once it
exists (until then the CLI says the vertical offers no ``train``): on the fleet simulator, NASA
C-MAPSS FD001 and AI4I 2020, beside a gradient-boosting baseline, with a model card.
"""
