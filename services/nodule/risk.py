"""Fusion of findings with clinical data into risk: not built yet (issue 17).

Its responsibility: the malignancy probability of each nodule by the Brock (PanCan) model from
image findings, DICOM header (age, sex) and clinical data posted over the API (smoking history,
family history, emphysema); the study's Lung-RADS v2022 category; against a prior study of the
same patient, matched nodules, growth and volume doubling time. Each formula is tested against
published worked examples.
"""
