"""The IIoT failure-prediction vertical's declaration (see :mod:`shared.verticals`)."""

from shared.config import get_settings
from shared.verticals import Listener, Vertical


def mqtt_listener_enabled() -> bool:
    """``tessera up`` starts the MQTT readings subscriber when ``TESSERA_IIOT_MQTT_URL`` is set."""
    return bool(get_settings().iiot_mqtt_url)


VERTICAL = Vertical(name="iiot", title="IIoT failure prediction", benchmarks=("iiot", "iiot_eval"),
                    commands={"simulate": "simulate:main", "edge": "edge:main", "train": "training:main"},
                    listeners=(Listener("mqtt", "mqtt_io:serve", enabled=mqtt_listener_enabled,
                                        description="MQTT subscriber: readings and edge risk"),))
