"""Scoring throughput and alert lead time for ``bench/iiot.py`` (sections 3 and 4; simulated fleets).

Section 3, in one process (``bench/iiot.py point scoring``) against a fresh PostgreSQL copy of a
seeded registry whose readings were ingested through H1's job handler (setup, timed apart):

- **cloud**: H5's :func:`services.iiot.scoring.score_tenant` (every asset due: one read of the
  readings, H4's ``window_tensor`` per asset, the model through the shared runtime, a RiskScore
  and the alert policy per asset), rolled back after each run so every run scores every asset.
  ``batched``: all windows in one ``predict_many_sync`` (batches of 64); ``naive``: the same
  pipeline with one asset's window at a time through a runtime model of ``max_batch_size=1``.
- **edge**: the edge ONNX model in ONNX Runtime with one intra-op and one inter-op thread (one
  core), windows/s at batch 1 (what a gateway does per asset) and 64, beside eager torch at batch 1.

With no shipped artifact (``models/iiot/{cloud,edge}``) an untrained network of the tier's sizes
stands in, and the record says so: its timing is the model's, its answers mean nothing.

Section 4 (:func:`alert_point`): a held-out simulated fleet (a seed no training run used) scored
hourly by the shipped cloud model, each asset's scores replayed through H5's
:func:`services.iiot.alerts.replay` with the default :class:`AlertPolicy` and maintenance resets,
then :func:`services.iiot.lead_time.summarise` (the onset rule, the window rule beside it). Scores
while an asset is down (failure to repair) are left out (it is known to have failed), and failures
before the first full window are not counted.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench._iiot_data import TENANT

HELD_OUT_SEED = 4242
"""The alert section's fleet: training used seed 0 (train/validation) and 1000 (test fleet)."""


def risk_spec(tier: str, name: str, max_batch_size: int, threads: int | None = None) -> tuple[Any, str]:
    """The tier's risk model as a runtime spec, and where it came from (shipped, or untrained stand-in)."""
    import torch

    from services.iiot.features import STEP_FEATURES
    from services.iiot.model import SensorWindowConfig, SensorWindowNet, default_risk_dir, risk_model_spec

    try:
        artifact = default_risk_dir(tier)  # type: ignore[arg-type]
    except FileNotFoundError:
        torch.manual_seed(0)
        net = SensorWindowNet(SensorWindowConfig.for_tier(tier, STEP_FEATURES))  # type: ignore[arg-type]
        return (risk_model_spec(net=net, name=name, max_batch_size=max_batch_size),
                f"untrained {tier} network (no shipped artifact: timing only)")
    return (risk_model_spec(artifact, name=name, max_batch_size=max_batch_size, threads=threads),
            f"shipped {artifact.relative_to(artifact.parents[2])}")


def _predictor(runtime: Any, name: str, one_at_a_time: bool, spent: list[float]) -> Any:
    """A :class:`services.iiot.scoring.Predictor` over ``runtime``'s model ``name``; adds its seconds to ``spent``."""
    from services.iiot.model import RiskRequest
    from services.iiot.scoring import Prediction

    def predict(_tenant: str, windows: Sequence[Any]) -> tuple[list[Any], str]:
        started = time.perf_counter()
        requests = [RiskRequest(w.window, w.mask) for w in windows]
        if one_at_a_time:
            answers = [runtime.predict_many_sync(name, [r], return_exceptions=True)[0] for r in requests]
        else:
            answers = runtime.predict_many_sync(name, requests, return_exceptions=True)
        spent.append(time.perf_counter() - started)
        return [a if isinstance(a, Exception) else
                Prediction(a.p_failure, a.rul_hours, {"channels": [list(c) for c in a.drivers.channels]})
                for a in answers], runtime.version(name)

    return predict


def scoring_point(url: str, readings_file: Path, repeats: int) -> dict[str, Any]:
    """Section 3's cloud figures in this process (the configured database is ``url``)."""
    from sqlalchemy.orm import Session

    from bench._iiot_ingest import tessera_ingest
    from model_runtime import ModelRuntime
    from services.iiot.scoring import score_tenant
    from shared.db import make_engine

    started = time.perf_counter()
    ingested = tessera_ingest(readings_file)
    record: dict[str, Any] = {"readings_ingested": ingested["rows_kept"], "ingest_s": time.perf_counter() - started}
    runtime = ModelRuntime()
    batched, source = risk_spec("cloud", "bench-cloud", 64)
    naive, _ = risk_spec("cloud", "bench-cloud-naive", 1)
    runtime.load_sync(batched)
    runtime.load_sync(naive)
    record["model"] = source
    engine = make_engine(url)
    try:
        ways = (("batched", "bench-cloud", False), ("naive", "bench-cloud-naive", True))
        runs: dict[str, list[tuple[float, int, int, float]]] = {label: [] for label, _, _ in ways}
        for repeat in range(repeats + 1):  # the first round warms both up and is not counted
            for label, name, one in ways if repeat % 2 else ways[::-1]:
                spent: list[float] = []
                with Session(engine) as session:
                    begun = time.perf_counter()
                    summary = score_tenant(session, TENANT, predictor=_predictor(runtime, name, one, spent))
                    if repeat:
                        runs[label].append((time.perf_counter() - begun, summary.scored, summary.failed, sum(spent)))
                    session.rollback()
        for label, _, _ in ways:
            seconds = float(np.median([r[0] for r in runs[label]]))
            model_s = float(np.median([r[3] for r in runs[label]]))
            scored = runs[label][-1][1]
            record[label] = {"assets_scored": scored, "failed": runs[label][-1][2], "seconds": seconds,
                             "assets_per_s": scored / seconds if seconds else None, "runs": len(runs[label]),
                             "model_s": model_s, "model_windows_per_s": scored / model_s if model_s else None}
    finally:
        runtime.close_sync()
        engine.dispose()
    return record


def edge_point(windows: int) -> dict[str, Any]:
    """Section 3's edge figures: ONNX Runtime on one thread at batch 1 and 64, eager torch at batch 1."""
    import tempfile

    import onnxruntime as ort
    import torch

    from services.iiot.features import STEP_FEATURES
    from services.iiot.model import (
        ONNX_FILE,
        SensorWindowConfig,
        SensorWindowNet,
        default_risk_dir,
        export_risk_onnx,
        load_artifact,
    )

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        try:
            directory = default_risk_dir("edge")
            onnx_path, net = directory / ONNX_FILE, load_artifact(directory)
            source = f"shipped {directory.relative_to(directory.parents[2])}"
        except FileNotFoundError:
            torch.manual_seed(0)
            net = SensorWindowNet(SensorWindowConfig.for_tier("edge", STEP_FEATURES)).eval()
            onnx_path = export_risk_onnx(net, Path(scratch) / ONNX_FILE)
            source = "untrained edge network exported to ONNX (no shipped artifact: timing only)"
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        config = net.config
        rng = np.random.default_rng(0)
        x = rng.normal(size=(windows, config.window, len(config.channels))).astype(np.float32)
        mask = np.ones((windows, config.window), np.float32)
        record: dict[str, Any] = {"model": source, "onnx_bytes": onnx_path.stat().st_size,
                                  "window": [config.window, len(config.channels)]}
        for batch in (1, 64):
            record[f"onnx_batch{batch}"] = _windows_per_s(
                lambda a, b: session.run(None, {"window": x[a:b], "mask": mask[a:b]}), windows, batch)
        with torch.inference_mode():
            record["torch_eager_batch1"] = _windows_per_s(
                lambda a, b: net(torch.from_numpy(x[a:b]), torch.from_numpy(mask[a:b])), max(windows // 4, 1), 1)
    return record


def _windows_per_s(run: Any, windows: int, batch: int) -> dict[str, Any]:
    run(0, min(batch, windows))  # warm-up
    started = time.perf_counter()
    for first in range(0, windows, batch):
        run(first, min(first + batch, windows))
    seconds = time.perf_counter() - started
    return {"windows": windows, "batch": batch, "seconds": seconds, "windows_per_s": windows / seconds}


def alert_point(assets: int, days: float, stride_h: float) -> dict[str, Any]:
    """Section 4 on a held-out simulated fleet (see the module doc); needs the shipped cloud model."""
    import pandas as pd

    from model_runtime import ModelRuntime
    from services.iiot.alerts import AlertPolicy, ScorePoint, replay
    from services.iiot.features import fleet_windows
    from services.iiot.lead_time import AssetHistory, summarise
    from services.iiot.model import RiskRequest
    from services.iiot.simulate import simulate_fleet

    spec, source = risk_spec("cloud", "bench-alerts", 64)
    if not source.startswith("shipped"):
        return {"status": "not yet measured", "why": "no trained cloud model is shipped (models/iiot/cloud)"}
    started = time.perf_counter()
    fleet = simulate_fleet(assets=assets, days=days, seed=HELD_OUT_SEED)
    windows = fleet_windows(fleet, window_h=48.0, stride_h=stride_h, step_h=1.0)
    simulated_s = time.perf_counter() - started
    runtime = ModelRuntime()
    runtime.load_sync(spec)
    try:
        begun = time.perf_counter()
        answers = runtime.predict_many_sync("bench-alerts", [RiskRequest(windows.x[i], windows.mask[i])
                                                             for i in range(len(windows.x))])
        scoring_s = time.perf_counter() - begun
    finally:
        runtime.close_sync()
    events = fleet.events
    ends = pd.to_datetime(windows.ends, utc=True)
    policy = AlertPolicy()
    histories: dict[str, AssetHistory] = {}
    first_end = ends.min().to_pydatetime()
    early = 0
    for asset in sorted(set(windows.assets)):
        own = events[events["asset"] == asset]
        failed = fleet.failures_with_onsets(asset)
        early += sum(f < first_end for f, _ in failed)  # no window ends before them: not counted
        failures = [f for f, _ in failed if f >= first_end]
        onsets = [onset for f, onset in failed if f >= first_end]
        repairs = sorted(pd.to_datetime(own.loc[own["kind"] == "repair", "time"], utc=True).dt.to_pydatetime())
        resets = sorted(pd.to_datetime(own.loc[own["kind"] != "failure", "time"], utc=True).dt.to_pydatetime())
        down = [(f, next((r for r in repairs if r >= f), fleet.end.to_pydatetime())) for f in failures]
        points = [ScorePoint(end, answer.p_failure, answer.rul_hours)
                  for end, answer, owner in zip(ends.to_pydatetime(), answers, windows.assets, strict=True)
                  if owner == asset and not any(start <= end < stop for start, stop in down)]
        openings = [event.at for event in replay(points, policy, resets=resets) if event.transition == "opened"]
        histories[str(asset)] = AssetHistory(openings, failures, onsets)
    observed_days = (fleet.end - fleet.start).total_seconds() / 86400 - 48.0 / 24
    summary = summarise(histories, observed_days)
    summary["failures_before_the_first_window"] = early
    return {**summary, "model": source, "seed": HELD_OUT_SEED, "fleet_days": days, "stride_h": stride_h,
            "windows": len(windows.x), "policy": policy.model_dump(), "simulate_s": simulated_s,
            "scoring_s": scoring_s}
