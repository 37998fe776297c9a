"""The chest CT simulator with ground truth: not built yet (issue 17).

It will write simulated chest CT as real DICOM series (body, lungs, vessels, airways, nodules of
3-30 mm of each type including juxta-pleural and juxta-vascular, noise, varied spacing, slice
counts and kernels) for training and evaluation, and provide ``main(argv)`` for
``tessera simulate nodule`` once declared in ``vertical.py``.
"""
