"""Training the nodule detector (teacher, then the distilled student): not built yet (issue 17).

It will provide ``main(argv)`` for ``tessera train nodule``, declared in ``vertical.py`` once it
exists (until then the CLI says the vertical offers no ``train``), writing model artifacts with
model cards that give the command that rebuilt them.
"""
