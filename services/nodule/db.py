"""Tables of the nodule vertical (names prefixed ``nodule_``): none yet.

Issue 17 adds them, with their migration: the index of stored DICOM instances (patient, study,
series and SOP instance UIDs, file path; a duplicate SOP instance UID is ignored), series and
studies with their analysis state and per-series errors, findings with measurements and risk,
clinical data posted for a study, and the result objects (SR, SEG, key images) with their delivery
to the PACS.
"""
