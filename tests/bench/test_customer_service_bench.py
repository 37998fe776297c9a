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


def test_fifo_replay_queues_utterances_decided_together() -> None:
    from bench.customer_service import BaselinePoint, fifo_latencies_ms

    def point(decided_s: float, service_s: float) -> BaselinePoint:
        return BaselinePoint("c", decided_s, service_s, 0.0, 1.0, "", "")

    # two decided at once: the second waits for the first; a late one finds the worker free
    assert fifo_latencies_ms([point(1.0, 0.2), point(1.0, 0.3), point(5.0, 0.1)]) == pytest.approx([200, 500, 100])


def test_largest_level_within_the_goal_stops_at_the_first_miss() -> None:
    from bench.customer_service import largest_within_goal

    levels = [{"concurrent_calls": n, "within_goal": {"emotion": ok, "transcript": n == 1, "both": n == 1}}
              for n, ok in ((1, True), (2, True), (4, False), (8, True))]
    assert largest_within_goal(levels, "emotion") == 2
    assert largest_within_goal(levels, "transcript") == 1
    assert largest_within_goal([{**levels[0], "within_goal": {"both": False}}], "both") is None


def test_transcripts_are_joined_to_the_utterance_they_overlap_most() -> None:
    from bench._cs_load import CallRun, EventTiming
    from bench.customer_service import matched_transcripts
    from services.customer_service.simulate import Prosody, SimulatedCall, UtteranceTruth

    prosody = Prosody(50, 100, 165, 90)
    truths = (UtteranceTruth(0, "agent", "v", "neutral", "hello there", "script", 0, 2000, prosody),
              UtteranceTruth(1, "customer", "v", "angry", "my order is late", "script", 2500, 5000, prosody),
              UtteranceTruth(2, "agent", "v", "neutral", "sorry about that", "script", 5500, 9000, prosody))
    call = SimulatedCall("CA1", 1, "routine", {}, {}, truths, None)
    run = CallRun("twilio", "CA1", "CA2", 9.0)
    run.events = [EventTiming("transcript", n, speaker, start, end, 1.0, 500.0, None, text)
                  for n, (speaker, start, end, text) in enumerate([
                      ("agent", 0, 2100, "hello their"), ("customer", 2400, 3600, "my order"),
                      ("customer", 3700, 5100, "is late"), ("customer", 9500, 9900, "um uh"),
                      ("agent", 5400, 8000, "sorry")])]
    references, hypotheses, inserted = matched_transcripts(run, call, max_call_s=8.0)
    assert references == ["hello there", "my order is late"]  # the third is cut at 8 s: not scored
    assert hypotheses == ["hello their", "my order is late"]
    assert inserted == 2  # "um uh" overlaps no utterance of its speaker
