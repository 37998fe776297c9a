"""The IIoT failure-prediction vertical's declaration (see :mod:`shared.verticals`)."""

from shared.verticals import Vertical

VERTICAL = Vertical(name="iiot", title="IIoT failure prediction", benchmarks=("iiot",))
