"""The CT nodule detection vertical's declaration (see :mod:`shared.verticals`)."""

from shared.verticals import Vertical

VERTICAL = Vertical(name="nodule", title="CT nodule detection with DICOM fusion")
