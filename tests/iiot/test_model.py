"""The failure-risk network (untrained, tiny): output shapes, padded steps that change nothing, the
edge tier's ONNX graph under 1 MB and equal to torch, a sealed artifact served by the shared
runtime in batches, and requests the runtime refuses with a reason."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from model_runtime import BadInput, ModelRuntime
from model_runtime.artifacts import save_artifact
from services.iiot.model import (
    ONNX_FILE,
    RiskRequest,
    RiskResult,
    SensorWindowConfig,
    SensorWindowNet,
    example_inputs,
    load_artifact,
    risk_model_spec,
    save_risk_model,
)

CHANNELS = ("temperature", "vibration", "pressure", "current", "speed")
WINDOW = 24


def network(tier: str = "edge", **sizes: object) -> SensorWindowNet:
    torch.manual_seed(0)
    config = SensorWindowConfig.for_tier(tier, CHANNELS, window=WINDOW, **sizes)  # type: ignore[arg-type]
    net = SensorWindowNet(config).eval()
    net.set_normalisation(np.full(len(CHANNELS), 0.5), np.full(len(CHANNELS), 2.0))
    return net


def test_outputs_are_named_and_shaped_per_window() -> None:
    net = network("cloud", d_model=16, heads=2, layers=1, d_ff=32)
    inputs = example_inputs(net.config, batch=3)
    with torch.inference_mode():
        out = net(**inputs)
    assert {name: tuple(value.shape) for name, value in out.items()} == {
        "p_failure": (3,), "rul_hours": (3,), "time_weights": (3, WINDOW), "channel_weights": (3, len(CHANNELS))}
    assert ((out["p_failure"] > 0) & (out["p_failure"] < 1)).all() and (out["rul_hours"] >= 0).all()
    assert torch.allclose(out["time_weights"].sum(1), torch.ones(3)) and torch.allclose(
        out["channel_weights"].sum(1), torch.ones(3))


@pytest.mark.parametrize(("channel_attention", "conv_layers"), [(True, 0), (False, 0), (True, 2)])
def test_padded_steps_change_nothing_and_get_no_attention(channel_attention: bool, conv_layers: int) -> None:
    net = network(channel_attention=channel_attention, conv_layers=conv_layers)
    inputs = example_inputs(net.config, batch=2)
    mask = inputs["mask"]
    assert (mask[1] == 0).any()
    noisy = inputs["window"] + torch.randn_like(inputs["window"]) * 100 * (1 - mask)[..., None]
    with torch.inference_mode():
        clean, dirty = net(**inputs), net(noisy, mask)
    for name in clean:
        assert torch.allclose(clean[name], dirty[name], atol=1e-5), name
    assert float(clean["time_weights"][1][mask[1] == 0].max()) < 1e-4


def test_edge_onnx_graph_is_under_one_megabyte_and_equals_torch(tmp_path: Path) -> None:
    import onnxruntime as ort

    net = network("edge")
    save_risk_model(net, tmp_path)
    graph = tmp_path / ONNX_FILE
    assert graph.stat().st_size < 1_000_000
    session = ort.InferenceSession(str(graph))
    assert [i.name for i in session.get_inputs()] == ["window", "mask"]
    for batch in (1, 5):  # the batch axis is dynamic
        inputs = example_inputs(net.config, batch=batch, seed=batch)
        expected = net(**inputs)
        answers = session.run(None, {name: value.numpy() for name, value in inputs.items()})
        names = [o.name for o in session.get_outputs()]
        for name, array in zip(names, answers, strict=True):
            np.testing.assert_allclose(array, expected[name].detach().numpy(), rtol=1e-4, atol=1e-5)
    reloaded = load_artifact(tmp_path)
    with torch.inference_mode():
        assert torch.allclose(reloaded(**inputs)["p_failure"], expected["p_failure"].detach(), atol=1e-6)


@pytest.mark.parametrize("frequencies", [0, 4])
def test_feature_tokens_attend_over_the_inputs_of_a_tabular_row_and_export(tmp_path: Path, frequencies: int,
                                                                             ) -> None:
    import onnxruntime as ort

    torch.manual_seed(0)
    config = SensorWindowConfig.for_tier("edge", CHANNELS, window=1, feature_tokens=True,
                                         numeric_frequencies=frequencies)
    net = SensorWindowNet(config).eval()
    inputs = example_inputs(config, batch=3)
    out = net(**inputs)
    assert out["p_failure"].shape == (3,) and out["channel_weights"].shape == (3, len(CHANNELS))
    assert torch.allclose(out["channel_weights"].sum(dim=1), torch.ones(3)) and out["time_weights"].shape == (3, 1)
    save_risk_model(net, tmp_path)
    session = ort.InferenceSession(str(tmp_path / ONNX_FILE))
    answer = session.run(["p_failure"], {name: value.numpy() for name, value in inputs.items()})[0]
    np.testing.assert_allclose(answer, out["p_failure"].detach().numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="tabular rows"):
        SensorWindowConfig.for_tier("edge", CHANNELS, window=WINDOW, feature_tokens=True)


def sealed(net: SensorWindowNet, directory: Path) -> Path:
    save_risk_model(net, directory)
    save_artifact(directory, name="iiot-edge", version="t1", framework="torch+onnx", data="test")
    return directory


def requests(count: int) -> list[RiskRequest]:
    rng = np.random.default_rng(1)
    made = []
    for index in range(count):
        steps = WINDOW - index % 5  # shorter windows are padded at the front
        mask = np.ones(steps, np.float32)
        mask[index % 3] = 0.0
        window = rng.normal(size=(steps, len(CHANNELS))).astype(np.float32)
        window[index % 3] = np.nan  # a gap may hold NaN
        made.append(RiskRequest(window, mask))
    return made


@pytest.mark.parametrize("backend", ["onnx", "eager"])
def test_a_sealed_artifact_is_served_by_the_runtime_in_batches(tmp_path: Path, backend: str) -> None:
    net = network("edge")
    directory = sealed(net, tmp_path / "edge")
    items = requests(12)

    async def serve() -> tuple[list[RiskResult], dict[str, dict[str, object]]]:
        runtime = ModelRuntime()
        try:
            await runtime.load(risk_model_spec(directory, name="iiot-test", backend=backend,  # type: ignore[arg-type]
                                               max_wait_ms=50.0))
            answers = await asyncio.gather(*[runtime.predict("iiot-test", item) for item in items])
            return list(answers), runtime.loaded()
        finally:
            await runtime.close()

    answers, loaded = asyncio.run(serve())
    assert loaded["iiot-test"]["backend"] == backend and loaded["iiot-test"]["version"] == "t1"
    alone = risk_model_spec(net=net).prepare
    assert alone is not None
    for item, answer in zip(items, answers, strict=True):
        prepared = alone(item)
        with torch.inference_mode():
            expected = net(torch.from_numpy(prepared["window"])[None], torch.from_numpy(prepared["mask"])[None])
        assert answer.p_failure == pytest.approx(float(expected["p_failure"][0]), abs=1e-5)
        assert answer.rul_hours == pytest.approx(float(expected["rul_hours"][0]), abs=1e-3)
        assert len(answer.drivers.channels) == 3 and answer.drivers.channels[0][0] in CHANNELS
        assert all(0 <= steps_ago < WINDOW for steps_ago, _ in answer.drivers.time_steps)


@pytest.mark.parametrize(("request_", "reason"), [
    (RiskRequest(np.zeros((WINDOW, 4))), "window must be"),
    (RiskRequest(np.zeros((WINDOW + 1, len(CHANNELS)))), "window must be"),
    (RiskRequest(np.full((3, len(CHANNELS)), np.nan), np.array([1, 1, 0])), "NaN"),
    (RiskRequest(np.zeros((3, len(CHANNELS))), np.zeros(3)), "no reading"),
    (RiskRequest(np.zeros((3, len(CHANNELS))), np.array([1, 0.5, 1])), "mask must be"),
    ("not a request", "expected a RiskRequest"),
])
def test_bad_requests_fail_alone_with_a_reason(request_: object, reason: str) -> None:
    runtime = ModelRuntime()
    runtime.load_sync(risk_model_spec(net=network(), name="iiot-bad"))
    try:
        good, bad = runtime.predict_many_sync("iiot-bad", [requests(1)[0], request_], return_exceptions=True)
    finally:
        runtime.close_sync()
    assert isinstance(good, RiskResult)
    assert isinstance(bad, BadInput) and reason in str(bad)
