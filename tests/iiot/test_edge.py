"""``tessera edge iiot`` as a real process: readings published on its local broker are scored on the
device with a tiny edge ONNX model exported here through the model code, and risk is published on
the upstream broker, where a test client receives it. Both brokers are Mosquittos of this test
(not the shared one), so each can be restarted mid-test.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from services.iiot.edge import GatewayRegistry, RollingWindows
from services.iiot.features import STEP_FEATURES
from services.iiot.model import SensorWindowConfig, SensorWindowNet, save_risk_model
from services.iiot.mqtt_io import readings_topic
from tests.iiot.mqtt_support import Collector, Publisher
from tests.support import REPO_ROOT, ManagedProcess, free_port, port_open, python_argv, wait_until

START = datetime(2026, 1, 1, tzinfo=UTC)
QUANTITIES = {"temp": ("temperature", "degC", -20.0, 150.0), "vib": ("vibration", "mm/s", 0.0, 25.0),
              "pres": ("pressure", "bar", 0.0, 16.0), "amp": ("current", "A", 0.0, 200.0),
              "rpm": ("speed", "rpm", 0.0, 3600.0)}
REGISTRY = {
    "plants": [{"plant_id": "p1", "name": "Plant", "timezone": "UTC"}],
    "lines": [{"line_id": "l1", "plant_id": "p1", "name": "Line"}],
    "assets": [{"asset_id": asset, "line_id": "l1", "kind": "pump", "name": asset} for asset in ("a1", "a2")],
    "sensors": [{"asset_id": asset, "sensor_id": sensor, "quantity": quantity, "unit": unit, "min_value": low,
                 "max_value": high, "sampling_interval_s": 3600.0}
                for asset in ("a1", "a2") for sensor, (quantity, unit, low, high) in QUANTITIES.items()],
}


def hour_of_readings(hour: int, *, fahrenheit: bool = False) -> list[dict[str, Any]]:
    moment = (START + timedelta(hours=hour)).isoformat()
    values = {"temp": 60.0 + hour * 0.1, "vib": 3.0, "pres": 8.0, "amp": 90.0, "rpm": 1480.0}
    rows: list[dict[str, Any]] = [{"sensor": sensor, "timestamp": moment, "value": value}
                                  for sensor, value in values.items()]
    if fahrenheit:
        rows[0] = {**rows[0], "value": rows[0]["value"] * 9 / 5 + 32, "unit": "degF"}
    return rows


@pytest.fixture(scope="module")
def edge_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained edge model (the model code's edge sizes), exported to ONNX and sealed."""
    from model_runtime.artifacts import save_artifact

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("edge-model") / "v1"
    save_risk_model(SensorWindowNet(SensorWindowConfig.for_tier("edge", STEP_FEATURES)), directory)
    save_artifact(directory, name="iiot-edge", version="test-edge", framework="torch+onnx")
    return directory


class LocalBroker:
    """A Mosquitto of this test on a free loopback port, which the test can restart."""

    def __init__(self, directory: Path, *, persistent: bool = False) -> None:
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self.config = directory / "mosquitto.conf"
        persistence = f"persistence true\npersistence_location {directory}/\n" if persistent else "persistence false\n"
        # Started as root, Mosquitto drops to the user "mosquitto", which cannot write its database
        # into this test's directory: the persistent broker would then forget every session.
        self.config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\nuser {getpass.getuser()}\n"
                               f"{persistence}")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(["mosquitto", "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_until(lambda: port_open("127.0.0.1", self.port), 10, "the local Mosquitto")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@contextlib.contextmanager
def running_broker(directory: Path, *, persistent: bool = False) -> Iterator[LocalBroker]:
    if shutil.which("mosquitto") is None:
        pytest.skip("the mosquitto binary is not installed (the gateway's brokers)")
    broker = LocalBroker(directory, persistent=persistent)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def local_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """The gateway's local broker (forgets its sessions when restarted, as a small device's might)."""
    with running_broker(tmp_path / "local") as broker:
        yield broker


@pytest.fixture
def upstream_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """The upstream broker, persistent: the cloud side's session survives its restart."""
    with running_broker(tmp_path / "upstream", persistent=True) as broker:
        yield broker


def test_rolling_windows_convert_units_trim_to_the_span_and_count_what_they_drop() -> None:
    windows = RollingWindows(GatewayRegistry.from_payload(REGISTRY), hours=4)
    for hour in range(6):
        windows.add("a1", hour_of_readings(hour, fahrenheit=hour == 5))
    windows.add("a1", [{"sensor": "nope", "timestamp": START.isoformat(), "value": 1.0},
                       {"sensor": "temp", "timestamp": "yesterday", "value": 1.0},
                       {"sensor": "temp", "timestamp": START.isoformat(), "value": "hot"},
                       {"sensor": "temp", "timestamp": START.isoformat(), "value": 1.0, "unit": "furlongs"},
                       {"sensor": "temp", "timestamp": "0001-01-01T00:00:00+14:00", "value": 1.0},
                       {"sensor": "temp", "timestamp": "1960-01-01T00:00:00Z", "value": 1.0},
                       {"sensor": "temp", "timestamp": START.isoformat(), "value": 1e308}])
    assert windows.due() == ["a1"]
    frame, end = windows.frame("a1")
    assert end == START + timedelta(hours=5) and windows.due() == []
    assert frame["ts"].min() == START + timedelta(hours=2)  # only the last 4 hours stay
    newest_temp = frame[frame["sensor_pk"] == 1]["value"].iloc[-1]
    assert newest_temp == pytest.approx(60.5)  # sent in degF, kept in degC
    assert dict(windows.dropped) == {"unknown_sensor": 1, "bad_timestamp": 3, "not_a_number": 1, "unknown_unit": 1,
                                     "out_of_range": 1}


GATEWAY_SCORING = """
import json, sys
from pathlib import Path

from services.iiot.edge import EdgeScorer, GatewayRegistry, RollingWindows, build_window

payload = json.loads(sys.argv[1])
registry = GatewayRegistry.from_payload(payload["registry"])
scorer = EdgeScorer(Path(sys.argv[2]))
windows = RollingWindows(registry, scorer.window_hours)
for readings in payload["readings"]:
    windows.add("a1", readings)
frame, end = windows.frame("a1")
[result] = scorer.score([build_window(frame, registry.sensors_of("a1"), end, scorer.window_hours,
                                      scorer.config.step_hours)])
scorer.close()
print(json.dumps({"p_failure": result.p_failure, "torch": sorted(name for name in sys.modules
                                                                 if name.split(".")[0] == "torch")}))
"""


def test_the_gateway_loads_and_scores_its_onnx_model_without_importing_torch(edge_model: Path) -> None:
    """A gateway on a small device must not need torch (its import alone: seconds and hundreds of MB)."""
    payload = {"registry": REGISTRY, "readings": [hour_of_readings(hour) for hour in range(6)]}
    done = subprocess.run(python_argv("-c", GATEWAY_SCORING, json.dumps(payload), str(edge_model)), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["torch"] == [] and 0.0 <= answer["p_failure"] <= 1.0


def test_the_edge_process_scores_local_readings_on_the_device_and_publishes_risk_upstream_across_restarts(
        edge_model: Path, local_broker: LocalBroker, upstream_broker: LocalBroker, tmp_path: Path) -> None:
    prefix = f"tessera-test/{uuid.uuid4().hex[:12]}"
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps(REGISTRY))
    argv = python_argv("-m", "services.cli", "edge", "iiot", "--local-mqtt", local_broker.url,
                       "--upstream-mqtt", upstream_broker.url, "--tenant", "t1", "--registry", str(registry),
                       "--model-dir", str(edge_model), "--every-s", "0.3", "--local-prefix", f"{prefix}/local",
                       "--upstream-prefix", f"{prefix}/up", "--client-id", f"edge-{uuid.uuid4().hex[:8]}")
    with Collector.on(f"{prefix}/up/t1/risk/+", upstream_broker.url, persistent=True) as upstream:
        edge = ManagedProcess(argv, {"TESSERA_LOG_LEVEL": "INFO", "TESSERA_LOG_JSON": "false"}, "edge gateway")
        try:
            edge.wait_for_output(r"connected to the local broker", timeout_s=60)
            with Publisher.connected(port=local_broker.port) as local:
                for hour in range(48):
                    local.publish(readings_topic(f"{prefix}/local", "t1", "p1", "l1", "a1"),
                                  json.dumps(hour_of_readings(hour)))
                wait_until(lambda: 47 in _window_ends(upstream, "a1"), 30,
                           f"risk of a1 up to hour 47 upstream\n{edge.output[-2000:]}")
            topic, risk = upstream.messages[-1]
            assert topic == f"{prefix}/up/t1/risk/a1"
            assert 0.0 <= risk["p_failure"] <= 1.0 and risk["rul_hours"] >= 0.0
            assert (risk["tier"], risk["model_version"]) == ("edge", "test-edge")
            assert "libtorch" not in Path(f"/proc/{edge.process.pid}/maps").read_text()  # scored without torch

            local_broker.stop()  # the local broker restarts (and, without persistence, forgets the session)
            local_broker.start()
            wait_until(lambda: edge.output.count("connected to the local broker") >= 2, 30, "the gateway reconnecting")
            with Publisher.connected(port=local_broker.port) as local:
                local.publish(readings_topic(f"{prefix}/local", "t1", "p1", "l1", "a1"),
                              json.dumps(hour_of_readings(48, fahrenheit=True)))
                wait_until(lambda: 48 in _window_ends(upstream, "a1"), 30, "risk of a1 at hour 48 after the restart")

                upstream_broker.stop()  # risk scored meanwhile waits in the gateway's client
                local.publish(readings_topic(f"{prefix}/local", "t1", "p1", "l1", "a1"),
                              json.dumps(hour_of_readings(49)))
                hour_49 = (START + timedelta(hours=49)).isoformat()
                edge.wait_for_output(f"published the risk of 1 assets, windows up to {re.escape(hour_49)}", 30)
                upstream_broker.start()
                # Both clients back off up to 30 s between reconnection attempts (paho's delay doubles
                # while the broker is down), so the first attempt after the restart can be 30 s away.
                wait_until(lambda: 49 in _window_ends(upstream, "a1"), 90, "risk of hour 49 once upstream is back")
        finally:
            assert edge.stop() == 0, edge.output[-3000:]
    assert "a2" not in {topic.rsplit("/", 1)[1] for topic, _ in upstream.messages}  # no readings, no score


def _window_ends(collector: Collector, asset: str) -> list[int]:
    """Hours after START of each risk message's window end for ``asset``."""
    return [int((datetime.fromisoformat(risk["window_end"]) - START) / timedelta(hours=1))
            for topic, risk in list(collector.messages) if topic.endswith(f"/{asset}")]
