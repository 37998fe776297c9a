"""CT nodule detection with DICOM fusion (`/nodule`)."""
