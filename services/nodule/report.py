"""Results back to the PACS: not built yet (issue 17).

Its responsibility: a Comprehensive 3D SR (TID 1500, highdicom), a DICOM SEG of the nodules and a
Secondary Capture key image per nodule with the outline burned in, all in the source study
(patient and study tags copied), and their delivery by C-STORE to the configured PACS as a durable
job with retries.
"""
