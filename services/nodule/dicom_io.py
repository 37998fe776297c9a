"""Reading and writing DICOM for the nodule vertical: not built yet (issue 17).

Its responsibility: parse instances arriving by C-STORE, STOW-RS or a zip upload (every transfer
syntax pydicom and pylibjpeg can decode), refuse other SOP classes with a proper status, store
them on disk and index them by patient, study, series and SOP instance UID (a duplicate is not an
error), and tell when a series is complete (quiet period ``TESSERA_NODULE_QUIET_PERIOD_S``). No
patient name or id is ever logged.
"""
