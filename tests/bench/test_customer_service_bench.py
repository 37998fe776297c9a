"""``bench/customer_service.py --quick --levels 2 --max-call-s 7``: two real-time simulated calls at once (one over
Twilio Media Streams, one over AudioHook) against the cs app under uvicorn, then the naive baseline.

Goes through every path of the benchmark (server process, signed streams, feeds, latency, WER,
CPU and memory from ``/proc``, the models called directly, the table and the JSON record) in under
a minute; its numbers mean nothing (an untrained emotion model when none is shipped). Skipped, saying
why, without espeak-ng.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_the_quick_run_streams_both_protocols_and_writes_the_record(tmp_path: Path) -> None:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed: no simulated calls (scripts/ensure_services.sh installs it)")
    out = tmp_path / "customer_service.json"
    completed = subprocess.run([sys.executable, str(REPO / "bench" / "customer_service.py"), "--quick", "--levels",
                                "2", "--max-call-s", "7", "--out", str(out), "--calls-cache", str(tmp_path / "calls")],
                               cwd=REPO, capture_output=True, text=True, timeout=240, check=False)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "Naive baseline" in completed.stdout
    record = json.loads(out.read_text())
    assert record["simulated"] is True and record["mode"] == "quick"
    (level,) = record["levels"]
    assert level["concurrent_calls"] == 2 and level["calls"] == {"twilio": 1, "audiohook": 1}
    assert level["utterances"] >= 2 and not level["failures"]
    for key in ("emotion_ms", "transcript_ms", "fused_emotion_ms", "hangover_ms"):
        assert level[key]["p50"] is not None and level[key]["p50"] >= 0
    assert level["server_cpu_s"] > 0 and level["server_peak_rss_mb"] > 0
    assert level["asr"]["wer"] >= 0 and level["asr"]["reference_words"] > 0
    baseline = record["baseline"]
    assert baseline["utterances"] >= 2 and baseline["service_ms"]["p50"] > 0
    assert baseline["asr_real_time_factor"] > 0
    assert set(baseline["fifo_latency_by_level"]) == {"2"}
