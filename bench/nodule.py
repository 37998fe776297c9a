"""Nodule vertical benchmark: the detector per volume, C-STORE ingest against Orthanc and dcmtk, end to end.

One run, three tables, ``bench/results/nodule.json``:

1. **Detector per volume** (CPU, a simulated chest CT from :mod:`services.nodule.simulate`,
   256 x 256 x 64): the student and the teacher through :func:`services.nodule.detect.detect_series`
   (the shared runtime's sliding window, post-processing included), and as the naive reference a
   plain MONAI ``BasicUNet`` (default features, random weights: timing only) through MONAI's
   ``sliding_window_inference`` with the detector's patch size and overlap (``sw_batch_size`` 1).
   Each way in its own subprocess, so its peak RSS (VmHWM) is its own; p50 over 12 runs (two volumes in
   turn) after one warm-up pass over each volume (with 5 runs and one warm-up the student's p50 moved by
   half from one run to the next on a 2-core VM), and the mean: the two volumes differ in slice spacing (1 and
   2 mm, so stage 1 works on 3 and 6.5 million voxels), which makes the runs bimodal, and the ratio of the means
   over the same volumes is the paired teacher/student figure. Then the student's volumes/s with 1 and 4 studies
   in flight through one runtime.
2. **C-STORE ingest**: one 64-slice series (512 x 512 int16, explicit VR little endian) pushed by
   dcmtk ``storescu`` (one association, ``TCP_NODELAY=1`` in its environment) into our SCP
   (``tessera listen nodule dicom``), Orthanc and dcmtk's ``storescp`` (the ceiling); instances/s
   and MB/s, median of the runs, a fresh study / series / SOP instance UIDs per run. Orthanc and
   ``storescp`` are Debian's dcmtk 3.6.7 builds, which leave Nagle's algorithm on unless
   ``TCP_NODELAY=1`` is in the environment: their C-STORE response (header and body written
   separately) then waits for storescu's delayed ACK, ~40 ms an instance. Both are measured as
   installed and with ``TCP_NODELAY=1``.
3. **End to end**: the series (256 x 256 x 64) pushed into our SCP with a worker (beat on) and
   Orthanc as the PACS; from the last instance received to the SR stored in Orthanc (the send
   job's end), with the quiet period (1 s) reported apart. One warm-up study first (model load).

When ``models/nodule/student`` is missing, a ``--quick`` teacher/student pair is trained into a
temporary models directory first (and the output says so: their accuracy means nothing).

Usage::

    python bench/nodule.py            # ~8 min on 2 cores (also: tessera bench nodule)
    python bench/nodule.py --quick    # ~2 min (128 x 128 x 32 volumes, 256 x 256 series, 1 run each)
    python bench/nodule.py --quick --sections ingest    # a subset: detector, ingest, e2e
    python bench/nodule.py --smoke --sections ingest    # toy sizes, for the test (~20 s)
    python bench/nodule.py --sections detector --device cuda    # the detector table on a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._measure import peak_rss_mb  # noqa: E402
from shared.processes import with_allocator_env  # noqa: E402

RESULTS = REPO / "bench" / "results" / "nodule.json"
QUIET_PERIOD_S = 1.0
SCU_AE, OUR_AE, ORTHANC_AE, STORESCP_AE = "BENCH-SCU", "TESSERA", "ORTHANC", "STORESCP"


@dataclass(frozen=True)
class Plan:
    """The sizes of one run (full or ``--quick``)."""

    volume_shape: tuple[int, int, int]
    """(slices, rows, columns) of the detector volumes."""
    repeats: int
    reference_repeats: int
    concurrency: tuple[int, ...]
    ingest_size: int
    ingest_runs: int
    ingest_slices: int
    e2e_shape: tuple[int, int, int]


FULL = Plan(volume_shape=(64, 256, 256), repeats=12, reference_repeats=2, concurrency=(1, 4), ingest_size=512,
            ingest_runs=3, ingest_slices=64, e2e_shape=(64, 256, 256))
QUICK = Plan(volume_shape=(32, 128, 128), repeats=2, reference_repeats=1, concurrency=(1, 2), ingest_size=256,
             ingest_runs=1, ingest_slices=64, e2e_shape=(32, 128, 128))
SMOKE = Plan(volume_shape=(16, 64, 64), repeats=1, reference_repeats=1, concurrency=(1, 2), ingest_size=64,
             ingest_runs=1, ingest_slices=16, e2e_shape=(16, 64, 64))
"""For the test: every path of the code in seconds; its numbers mean nothing."""


# -- helpers ---------------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Block until something accepts connections on ``127.0.0.1:port``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listened on port {port} within {timeout_s:.0f} s")


@contextlib.contextmanager
def background(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` in its own process group, output to ``log``; SIGTERM (then SIGKILL) the group on exit."""
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **env}, stdout=sink, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


def dcmtk_tools() -> dict[str, str | None]:
    """``storescu``, ``storescp`` and ``Orthanc`` on PATH (or /usr/sbin), ``None`` where absent."""
    return {"storescu": shutil.which("storescu"), "storescp": shutil.which("storescp"),
            "orthanc": shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")}


def student_artifacts(workdir: Path) -> tuple[Path, str]:
    """The models directory holding nodule/{teacher,student}, and where it came from.

    The shipped ``models/`` when the student is there, else a ``--quick`` pair trained into ``workdir``.
    """
    from services.nodule.model import default_artifact_dir

    with contextlib.suppress(FileNotFoundError, OSError):
        student, teacher = default_artifact_dir("student").resolve(), default_artifact_dir("teacher").resolve()
        if (student / "weights.pt").exists() and (teacher / "weights.pt").exists():
            return student.parents[2], f"shipped ({student.relative_to(REPO)}, {teacher.relative_to(REPO)})"
    from services.nodule.training import main as train

    root = workdir / "models"
    print("no shipped nodule student: training a --quick pair (timing only, its accuracy means nothing)",
          flush=True)
    if train(["--quick", "--output", str(root / "nodule"), "--version", "bench"]) != 0:
        raise RuntimeError("tessera train nodule --quick failed")
    return root, "trained here with --quick (timing only)"


# -- 1. the detector per volume, one subprocess per way --------------------------------------------
def detector_volumes(count: int, shape: tuple[int, int, int]) -> list[Any]:
    """``count`` simulated chest CTs as :class:`SeriesVolume` (seeds 100...)."""
    from services.nodule.evaluation import volume_from_simulated
    from services.nodule.simulate import SimulationConfig, simulate_study

    return [volume_from_simulated(simulate_study(SimulationConfig(seed=100 + i, shape=shape)), uid=f"1.2.826.{i}")
            for i in range(count)]


async def _detector_point(role: str, models_dir: Path, shape: tuple[int, int, int], repeats: int,
                          concurrency: tuple[int, ...], device: str = "cpu") -> dict[str, Any]:
    import torch

    from model_runtime.runtime import ModelRuntime
    from services.nodule.detect import detect_series, load_detector
    from services.nodule.model import default_artifact_dir

    artifact = default_artifact_dir(role)  # under TESSERA_MODELS_DIR, set by point()
    runtime = ModelRuntime()
    name = f"nodule-{role}"
    await load_detector(runtime, role=role, model_name=name, artifact_dir=str(artifact), device=device)
    try:
        volumes = detector_volumes(max(2, max(concurrency, default=1)), shape)
        for volume in volumes:  # warm-up: the first pass over a volume size allocates what later ones reuse
            await detect_series(volume, runtime=runtime, model_name=name)
        record: dict[str, Any] = {"parameters": sum(
            t.numel() for t in torch.load(artifact / "weights.pt", weights_only=True).values())}
        if not concurrency:
            seconds = []
            for i in range(repeats):
                started = time.perf_counter()
                await detect_series(volumes[i % len(volumes)], runtime=runtime, model_name=name)
                seconds.append(time.perf_counter() - started)
            record.update(seconds=seconds, p50_s=statistics.median(seconds), mean_s=statistics.fmean(seconds))
        async def caller(volume: Any) -> None:  # one study after the other, ``repeats`` times
            for _ in range(repeats):
                await detect_series(volume, runtime=runtime, model_name=name)

        for level in concurrency:
            started = time.perf_counter()
            await asyncio.gather(*(caller(volumes[i]) for i in range(level)))
            record[f"volumes_per_s_k{level}"] = level * repeats / (time.perf_counter() - started)
        record["peak_rss_mb"] = peak_rss_mb()
        return record
    finally:
        await runtime.close()


def _reference_point(roi: tuple[int, int, int], overlap: float, shape: tuple[int, int, int],
                     repeats: int, device: str = "cpu") -> dict[str, Any]:
    """A plain MONAI BasicUNet (default features) through ``sliding_window_inference``, per volume."""
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import BasicUNet

    from services.nodule.model import normalise_hu

    torch.manual_seed(0)
    network = BasicUNet(spatial_dims=3, in_channels=1, out_channels=1).eval().to(device)
    volume = detector_volumes(1, shape)[0]
    seconds = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        with torch.inference_mode():
            inputs = torch.from_numpy(normalise_hu(volume.hu))[None, None].to(device)
            logits = sliding_window_inference(inputs, roi, 1, network, overlap=overlap, mode="gaussian")
            assert isinstance(logits, torch.Tensor)
            torch.sigmoid(logits).cpu()
        seconds.append(time.perf_counter() - started)
    return {"seconds": seconds[1:], "p50_s": statistics.median(seconds[1:]), "peak_rss_mb": peak_rss_mb(),
            "parameters": sum(p.numel() for p in network.parameters())}


def run_point(args: argparse.Namespace) -> dict[str, Any]:
    """The body of one subprocess point (``point --way ...``)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    shape = tuple(int(v) for v in args.shape.split(","))
    assert len(shape) == 3
    concurrency = tuple(int(v) for v in args.concurrency.split(",")) if args.concurrency else ()
    if args.way == "reference":
        from services.nodule.classifier import is_two_stage
        from services.nodule.model import DetectorSettings, NoduleArtifactConfig, default_artifact_dir

        student = default_artifact_dir("student")
        # A two-stage (v3) student has no sliding window: the reference keeps the dense detector's.
        settings = DetectorSettings() if is_two_stage(student) else NoduleArtifactConfig.read(student).detector
        roi = tuple(settings.roi_size)
        overlap = settings.overlap
        record = _reference_point((roi[0], roi[1], roi[2]), overlap, (shape[0], shape[1], shape[2]), args.repeats,
                                  args.device)
        return {**record, "roi": roi, "overlap": overlap}
    return asyncio.run(_detector_point(args.way, Path(args.models_dir), (shape[0], shape[1], shape[2]),
                                       args.repeats, concurrency, args.device))


def point(way: str, models_dir: Path, shape: tuple[int, int, int], repeats: int,
          concurrency: tuple[int, ...] = (), device: str = "cpu") -> dict[str, Any]:
    """One detector way in a fresh subprocess on ``device``; its JSON record."""
    command = [sys.executable, __file__, "point", "--way", way, "--models-dir", str(models_dir),
               "--shape", ",".join(map(str, shape)), "--repeats", str(repeats),
               "--concurrency", ",".join(map(str, concurrency)), "--device", device]
    # every way under the allocator settings `tessera up` gives its processes (the MONAI reference too)
    env = {**with_allocator_env(os.environ), "TESSERA_LOG_JSON": "false", "TESSERA_LOG_LEVEL": "WARNING",
           "PYTHONWARNINGS": "ignore",
           "TESSERA_DEVICE": device, "TESSERA_TORCH_THREADS": str(os.cpu_count() or 1),
           "TESSERA_MODELS_DIR": str(models_dir)}
    completed = subprocess.run(command, capture_output=True, text=True, check=False, env=env, cwd=REPO)
    if completed.returncode != 0:
        raise RuntimeError(f"detector point {way} failed:\n{completed.stderr[-3000:]}")
    record: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return {**record, "way": way}


def bench_detector(plan: Plan, models_dir: Path, device: str = "cpu") -> dict[str, Any]:
    """Section 1: student, teacher and the MONAI reference per volume; the student's volumes/s at K."""
    shape = plan.volume_shape
    ways = {}
    for way, repeats in (("student", plan.repeats), ("teacher", plan.repeats), ("reference", plan.reference_repeats)):
        ways[way] = point(way, models_dir, shape, repeats, device=device)
        print(f"  {way:<10} p50 {ways[way]['p50_s']:.2f} s  rss {ways[way]['peak_rss_mb']:.0f} MB", flush=True)
    concurrent = point("student", models_dir, shape, max(1, plan.repeats // 2), plan.concurrency, device)
    print("  student concurrent: " + ", ".join(f"K={k} {concurrent[f'volumes_per_s_k{k}']:.3f} vol/s"
                                                 for k in plan.concurrency), flush=True)
    return {"shape_zyx": shape, "threads": os.cpu_count(), "device": device, "ways": ways,
            "teacher_over_student": ways["teacher"]["p50_s"] / ways["student"]["p50_s"],
            "teacher_over_student_mean": ways["teacher"]["mean_s"] / ways["student"]["mean_s"],
            "reference_over_student": ways["reference"]["p50_s"] / ways["student"]["p50_s"],
            "student_volumes_per_s": {str(k): concurrent[f"volumes_per_s_k{k}"] for k in plan.concurrency},
            "student_concurrent_peak_rss_mb": concurrent["peak_rss_mb"]}


# -- 2. C-STORE ingest -----------------------------------------------------------------------------
def write_series(directory: Path, shape: tuple[int, int, int], seed: int = 3) -> Path:
    """A simulated series (int16, explicit VR little endian) under ``directory``."""
    from services.nodule.simulate import SimulationConfig, simulate_study, write_dicom_series

    spacing = (0.6, 0.75) if shape[1] >= 512 else (0.6, 0.9)
    write_dicom_series(simulate_study(SimulationConfig(seed=seed, shape=shape, pixel_spacing_mm=spacing)), directory)
    return directory


def fresh_copy(source: Path, target: Path) -> Path:
    """``source``'s instances with new study, series and SOP instance UIDs (a new series for every peer)."""
    import pydicom
    from pydicom.uid import generate_uid

    target.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for path in sorted(source.iterdir()):
        dataset = pydicom.dcmread(path)
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.save_as(target / path.name, enforce_file_format=True)
    return target


def storescu(tool: str, called_ae: str, port: int, directory: Path) -> float:
    """Push ``directory`` in one association; the wall seconds (the same command for every peer)."""
    started = time.perf_counter()
    pushed = subprocess.run([tool, "-aet", SCU_AE, "-aec", called_ae, "+sd", "127.0.0.1", str(port), str(directory)],
                            env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True, timeout=300,
                            check=False)
    seconds = time.perf_counter() - started
    if pushed.returncode != 0:
        raise RuntimeError(f"storescu into {called_ae} failed: {pushed.stderr[-2000:]}")
    return seconds


def orthanc_config(directory: Path, dicom_port: int, http_port: int) -> Path:
    """An Orthanc configuration as ``tests/nodule/orthanc.py`` writes it (loopback, no plugins)."""
    config = {"Name": "tessera-bench-pacs", "StorageDirectory": str(directory / "storage"),
              "IndexDirectory": str(directory / "index"), "StorageCompression": False, "Plugins": [],
              "LuaScripts": [], "ConcurrentJobs": 1, "SaveJobs": False, "HttpServerEnabled": True,
              "HttpPort": http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
              "WebDavEnabled": False, "OrthancExplorerEnabled": False, "DicomServerEnabled": True,
              "DicomAet": ORTHANC_AE, "DicomPort": dicom_port, "DicomCheckCalledAet": True,
              "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True, "StableAge": 60}
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    return path


@contextlib.contextmanager
def orthanc(binary: str, directory: Path, *, nodelay: bool) -> Iterator[tuple[int, int]]:
    """A running Orthanc (``TCP_NODELAY=1`` in its environment when ``nodelay``); yields (DICOM, HTTP) ports."""
    dicom_port, http_port = free_port(), free_port()
    config = orthanc_config(directory, dicom_port, http_port)
    env = {"TCP_NODELAY": "1"} if nodelay else {"TCP_NODELAY": "0"}
    with background([binary, str(config)], env, directory / "orthanc.log") as process:
        wait_for_port(http_port, 30, process)
        wait_for_port(dicom_port, 30, process)
        yield dicom_port, http_port


@contextlib.contextmanager
def storescp(binary: str, directory: Path, *, nodelay: bool) -> Iterator[int]:
    """dcmtk's ``storescp`` writing every instance under ``directory``; yields its port."""
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    env = {"TCP_NODELAY": "1"} if nodelay else {"TCP_NODELAY": "0"}
    with background([binary, "-aet", STORESCP_AE, "-od", str(directory), str(port)], env,
                    directory.parent / f"{directory.name}.log") as process:
        wait_for_port(port, 10, process)
        yield port


def stack_env(data_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The embedded (SQLite) deployment with every file under ``data_dir``, migrated; with the allocator settings
    `tessera up` gives its processes (:data:`shared.processes.ALLOCATOR_ENV`)."""
    from alembic import command
    from alembic.config import Config

    data_dir.mkdir(parents=True, exist_ok=True)
    database_url = f"sqlite:///{data_dir / 'tessera.db'}"
    config = Config(str(REPO / "alembic.ini"))
    config.set_main_option("script_location", str(REPO / "migrations"))
    config.set_main_option("sqlalchemy.url", database_url)
    command.upgrade(config, "head")
    return {**with_allocator_env({}), "TESSERA_ENVIRONMENT": "test", "TESSERA_DATA_DIR": str(data_dir),
            "TESSERA_DATABASE_URL": database_url, "TESSERA_BROKER_URL": f"sqla+sqlite:///{data_dir / 'broker.db'}",
            "TESSERA_RESULT_BACKEND": f"db+sqlite:///{data_dir / 'results.db'}", "TESSERA_LOG_JSON": "false",
            "TESSERA_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1", "TESSERA_DEVICE": "cpu",
            "TESSERA_JOB_SWEEP_INTERVAL_S": "1", **(extra or {})}


@contextlib.contextmanager
def our_scp(data_dir: Path, extra: dict[str, str] | None = None) -> Iterator[tuple[int, dict[str, str]]]:
    """``tessera listen nodule dicom`` on a fresh stack; yields (port, the stack's environment)."""
    port = free_port()
    env = stack_env(data_dir, {"TESSERA_NODULE_DICOM_PORT": str(port),
                               "TESSERA_NODULE_QUIET_PERIOD_S": str(QUIET_PERIOD_S), **(extra or {})})
    with background([sys.executable, "-m", "services.cli", "listen", "nodule", "dicom"], env,
                    data_dir / "listener.log") as process:
        wait_for_port(port, 120, process)
        yield port, env


def ingest_rates(seconds: list[float], instances: int, megabytes: float) -> dict[str, Any]:
    """Median seconds of the runs as instances/s and MB/s."""
    median = statistics.median(seconds)
    return {"seconds": seconds, "median_s": median, "instances_per_s": instances / median,
            "mb_per_s": megabytes / median}


def bench_ingest(plan: Plan, workdir: Path, tools: dict[str, str | None]) -> dict[str, Any]:
    """Section 2: the same storescu push into each peer, ``plan.ingest_runs`` fresh series each."""
    assert tools["storescu"] and tools["storescp"] and tools["orthanc"]
    size = plan.ingest_size
    source = write_series(workdir / "ingest-source", (plan.ingest_slices, size, size))
    instances = len(list(source.iterdir()))
    megabytes = sum(p.stat().st_size for p in source.iterdir()) / 1e6
    copies = iter(fresh_copy(source, workdir / f"push-{i}") for i in range(100))
    peers: dict[str, dict[str, Any]] = {}

    def measure(label: str, called_ae: str, port: int) -> None:
        storescu(tools["storescu"] or "", called_ae, port, next(copies))  # warm-up (first association, caches)
        seconds = [storescu(tools["storescu"] or "", called_ae, port, next(copies)) for _ in range(plan.ingest_runs)]
        peers[label] = ingest_rates(seconds, instances, megabytes)
        print(f"  {label:<28} {peers[label]['instances_per_s']:7.1f} inst/s {peers[label]['mb_per_s']:6.1f} MB/s",
              flush=True)

    with our_scp(workdir / "ingest-stack") as (port, _env):
        measure("tessera (pynetdicom)", OUR_AE, port)
    for nodelay in (False, True):
        suffix = " TCP_NODELAY=1" if nodelay else " (as installed)"
        with orthanc(tools["orthanc"], workdir / f"orthanc-{int(nodelay)}", nodelay=nodelay) as (dicom_port, _):
            measure("orthanc" + suffix, ORTHANC_AE, dicom_port)
        with storescp(tools["storescp"], workdir / f"storescp-{int(nodelay)}", nodelay=nodelay) as scp_port:
            measure("storescp" + suffix, STORESCP_AE, scp_port)
    return {"series": {"instances": instances, "rows_columns": size, "megabytes": megabytes,
                       "transfer_syntax": "explicit VR little endian", "runs": plan.ingest_runs},
            "storescu": f"TCP_NODELAY=1 storescu -aet {SCU_AE} -aec <AE> +sd 127.0.0.1 <port> <series dir>",
            "peers": peers}


# -- 3. end to end ---------------------------------------------------------------------------------
def _utc(value: datetime) -> float:
    """POSIX seconds of a database timestamp (naive ones are UTC)."""
    return (value.replace(tzinfo=UTC) if value.tzinfo is None else value).timestamp()


def series_timeline(database_url: str, series_uid: str, timeout_s: float) -> dict[str, float]:
    """Wait for the series' analysis and the newest send job to finish; the seconds between their marks."""
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session

    from services.nodule.db import Series
    from shared.jobs import Job

    engine = create_engine(database_url)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            with Session(engine) as session:
                series = session.scalars(select(Series).where(Series.series_instance_uid == series_uid)).first()
                analysis = session.get(Job, series.job_id) if series is not None and series.job_id else None
                send = None
                if analysis is not None and analysis.finished_at is not None:
                    send = session.scalars(select(Job).where(Job.task_name == "nodule.send_results",
                                                             Job.created_at >= analysis.created_at)
                                           .order_by(Job.created_at.desc())).first()
                if analysis is not None and analysis.status == "failed":
                    raise RuntimeError(f"the analysis failed: {analysis.error}")
                if series is not None and analysis is not None and send is not None and send.finished_at is not None:
                    if send.status != "succeeded":
                        raise RuntimeError(f"the send job ended {send.status}: {send.error}")
                    last = _utc(series.last_instance_at)
                    assert analysis.finished_at is not None
                    return {"last_instance_to_sr_stored_s": _utc(send.finished_at) - last,
                            "last_instance_to_analysis_queued_s": _utc(analysis.created_at) - last,
                            "analysis_s": _utc(analysis.finished_at) - _utc(analysis.created_at),
                            "send_s": _utc(send.finished_at) - _utc(analysis.finished_at),
                            "instances": float(series.instance_count)}
            time.sleep(0.05)
    finally:
        engine.dispose()
    raise RuntimeError(f"series {series_uid} did not reach the PACS within {timeout_s:.0f} s")


def sr_in_orthanc(database_url: str, series_uid: str, http_port: int) -> dict[str, Any]:
    """The results made from ``series_uid`` by kind, and whether Orthanc holds its SR (REST lookup)."""
    import httpx
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session

    from services.nodule.db import Result

    engine = create_engine(database_url)
    try:
        with Session(engine) as session:
            results = session.scalars(select(Result).where(Result.source_series_instance_uid == series_uid)).all()
            kinds = sorted(result.kind for result in results)
            sr_uids = [result.sop_instance_uid for result in results if result.kind == "sr"]
    finally:
        engine.dispose()
    found = [httpx.post(f"http://127.0.0.1:{http_port}/tools/lookup", content=uid, timeout=10.0).json()
             for uid in sr_uids]
    return {"results": kinds, "sr_in_orthanc": bool(sr_uids) and all(
        any(match.get("Type") == "Instance" for match in matches) for matches in found)}


def bench_end_to_end(plan: Plan, workdir: Path, tools: dict[str, str | None], models_dir: Path) -> dict[str, Any]:
    """Section 3: listener + worker with beat + Orthanc; a warm-up study, then the timed one."""
    import pydicom

    assert tools["storescu"] and tools["orthanc"]
    warm_source = write_series(workdir / "e2e-warm", (16, 64, 64), seed=5)
    source = write_series(workdir / "e2e-source", plan.e2e_shape, seed=11)
    with orthanc(tools["orthanc"], workdir / "e2e-orthanc", nodelay=False) as (pacs_port, http_port):
        extra = {"TESSERA_MODELS_DIR": str(models_dir), "TESSERA_NODULE_PACS_HOST": "127.0.0.1",
                 "TESSERA_NODULE_PACS_PORT": str(pacs_port), "TESSERA_NODULE_PACS_AE_TITLE": ORTHANC_AE,
                 "TESSERA_TASK_LEASE_S": "30"}
        with our_scp(workdir / "e2e-stack", extra) as (port, env):
            worker = [sys.executable, "-m", "celery", "-A", "shared.queue:celery_app", "worker", "-Q", "default,nodule",
                      "--concurrency", "1", "-B", "--schedule", str(workdir / "beat"), "--without-gossip",
                      "--without-mingle", "--loglevel", "WARNING"]
            with background(worker, env, workdir / "worker.log"):
                timelines = {}
                for label, series_dir in (("warm-up", warm_source), ("timed", source)):
                    pushed = fresh_copy(series_dir, workdir / f"e2e-push-{label}")
                    storescu(tools["storescu"], OUR_AE, port, pushed)
                    uid = str(pydicom.dcmread(next(pushed.iterdir()), stop_before_pixels=True).SeriesInstanceUID)
                    try:
                        timelines[label] = series_timeline(env["TESSERA_DATABASE_URL"], uid, 300)
                        timelines[label].update(sr_in_orthanc(env["TESSERA_DATABASE_URL"], uid, http_port))
                    except RuntimeError as error:
                        log = (workdir / "worker.log").read_text(errors="replace")[-3000:]
                        raise RuntimeError(f"{error}\nworker log:\n{log}") from error
    timed = timelines["timed"]
    if not timed["sr_in_orthanc"]:
        raise RuntimeError(f"the send job succeeded but Orthanc holds no SR of the series: {timed}")
    print(f"  end to end {timed['last_instance_to_sr_stored_s']:.2f} s (quiet period {QUIET_PERIOD_S:.0f} s; "
          f"analysis {timed['analysis_s']:.2f} s, send {timed['send_s']:.2f} s)", flush=True)
    return {"shape_zyx": plan.e2e_shape, "quiet_period_s": QUIET_PERIOD_S, "timed": timed,
            "warm_up": timelines["warm-up"]}


# -- tables ----------------------------------------------------------------------------------------
def print_tables(record: dict[str, Any]) -> None:
    """The three tables of one run."""
    detector = record.get("detector")
    if detector:
        shape = "x".join(map(str, reversed(detector["shape_zyx"])))
        where = str(detector.get("device", "cpu")).upper()
        print(f"\nDetector per {shape} volume, {where} ({detector['threads']} CPU threads), models: {record['models']}")
        print(f"{'way':<44} {'p50 s':>7} {'mean s':>7} {'RSS MB':>7} {'params':>9}")
        labels = {"student": "student (detect_series, runtime)", "teacher": "teacher (detect_series, runtime)",
                  "reference": "MONAI BasicUNet + sliding_window_inference"}
        for way, label in labels.items():
            point_record = detector["ways"][way]
            mean = point_record.get("mean_s", statistics.fmean(point_record["seconds"]))
            print(f"{label:<44} {point_record['p50_s']:>7.2f} {mean:>7.2f} {point_record['peak_rss_mb']:>7.0f} "
                  f"{point_record['parameters'] / 1e6:>8.2f}M")
        by_mean = detector.get("teacher_over_student_mean")
        print(f"teacher / student {detector['teacher_over_student']:.1f}x (p50)"
              + (f", {by_mean:.1f}x (mean over the same volumes)" if by_mean else "") + ", "
              f"reference / student {detector['reference_over_student']:.1f}x; student volumes/s: "
              + ", ".join(f"K={k} {v:.3f}" for k, v in detector["student_volumes_per_s"].items()))
    ingest = record.get("ingest")
    if ingest:
        series = ingest["series"]
        print(f"\nC-STORE ingest: {series['instances']} x {series['rows_columns']}x{series['rows_columns']} int16 "
              f"({series['megabytes']:.1f} MB), median of {series['runs']} run(s); {ingest['storescu']}")
        print(f"{'peer':<30} {'inst/s':>8} {'MB/s':>7} {'s':>7}")
        for label, peer in ingest["peers"].items():
            print(f"{label:<30} {peer['instances_per_s']:>8.1f} {peer['mb_per_s']:>7.1f} {peer['median_s']:>7.2f}")
    e2e = record.get("end_to_end")
    if e2e:
        timed = e2e["timed"]
        shape = "x".join(map(str, reversed(e2e["shape_zyx"])))
        print(f"\nEnd to end ({shape}, {timed['instances']:.0f} instances, worker with beat, Orthanc as the PACS; "
              f"results sent: {', '.join(timed['results'])}; SR found in Orthanc: {timed['sr_in_orthanc']})")
        print(f"last instance -> SR stored in Orthanc   {timed['last_instance_to_sr_stored_s']:6.2f} s")
        print(f"  of which quiet period (setting)       {e2e['quiet_period_s']:6.2f} s")
        print(f"  last instance -> analysis queued      {timed['last_instance_to_analysis_queued_s']:6.2f} s")
        print(f"  analysis job                          {timed['analysis_s']:6.2f} s")
        print(f"  results sent (analysis end -> SR in)  {timed['send_s']:6.2f} s")
        print(f"  without the quiet period              "
              f"{timed['last_instance_to_sr_stored_s'] - e2e['quiet_period_s']:6.2f} s")


def bench(plan: Plan, sections: list[str], device: str = "cpu") -> dict[str, Any]:
    """Every requested section; the JSON record."""
    tools = dcmtk_tools()
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()}
    record: dict[str, Any] = {"plan": asdict(plan), "machine": machine, "tools": tools,
                              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="tessera-bench-nodule-") as temporary:
        workdir = Path(temporary)
        models_dir = Path()
        if {"detector", "e2e"} & set(sections):
            models_dir, record["models"] = student_artifacts(workdir)
        if "detector" in sections:
            print("detector per volume", flush=True)
            record["detector"] = bench_detector(plan, models_dir, device)
        missing = [name for name, path in tools.items() if path is None]
        if missing and ({"ingest", "e2e"} & set(sections)):
            print(f"skipping ingest and end to end: {', '.join(missing)} not installed "
                  "(scripts/ensure_services.sh installs dcmtk and orthanc)", flush=True)
            record["skipped"] = f"{', '.join(missing)} not installed"
            return record
        if "ingest" in sections:
            print("C-STORE ingest", flush=True)
            record["ingest"] = bench_ingest(plan, workdir, tools)
        if "e2e" in sections:
            print("end to end", flush=True)
            record["end_to_end"] = bench_end_to_end(plan, workdir, tools, models_dir)
    return record


def main(argv: list[str] | None = None) -> int:
    """``python bench/nodule.py [--quick] [--sections detector,ingest,e2e] [--out PATH]``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    one = sub.add_parser("point", help="one detector way in this process (prints its JSON)")
    one.add_argument("--way", required=True, choices=("student", "teacher", "reference"))
    one.add_argument("--models-dir", required=True)
    one.add_argument("--shape", required=True)
    one.add_argument("--repeats", type=int, default=3)
    one.add_argument("--concurrency", default="")
    one.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="small volumes, one run each (~3 min)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes for the test (numbers mean nothing)")
    parser.add_argument("--sections", default="detector,ingest,e2e")
    parser.add_argument("--device", default="cpu", help="the detector section's device (cpu, cuda)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.command == "point":
        print(json.dumps(run_point(args)))
        return 0
    started = time.monotonic()
    plan = SMOKE if args.smoke else QUICK if args.quick else FULL
    record = bench(plan, [s.strip() for s in args.sections.split(",") if s.strip()], args.device)
    record["wall_s"] = time.monotonic() - started
    print_tables(record)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"\nwrote {args.out} ({record['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
