"""The CT nodule detection vertical's declaration (see :mod:`shared.verticals`)."""

from shared.config import get_settings
from shared.verticals import Listener, Vertical


def dicom_listener_enabled() -> bool:
    """``tessera up`` starts the DICOM listener unless ``TESSERA_NODULE_DICOM_LISTENER=false``."""
    return get_settings().nodule_dicom_listener


VERTICAL = Vertical(
    name="nodule",
    title="CT nodule detection with DICOM fusion",
    listeners=(Listener("dicom", "dicom_io:serve", enabled=dicom_listener_enabled,
                        description="DICOM C-STORE SCP (CT Image Storage, C-ECHO)"),),
    commands={"train": "training:main", "simulate": "simulate:main"},
    benchmarks=("nodule", "nodule_eval"),
)
"""CT nodule detection with DICOM fusion (`/nodule`); its DICOM listener runs beside the API."""
