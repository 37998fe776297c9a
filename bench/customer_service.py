"""Customer-service benchmark: live calls over WebSockets, end-of-utterance to emotion and transcript.

One run, ``bench/results/customer_service.json``:

1. **Live calls.** The cs app under uvicorn (its own process, a migrated SQLite stack), and 1, 2, 4
   and 8 concurrent calls streamed in real time (20 ms frames, paced) by the platform-like clients
   of ``tests/customer_service/stream_clients.py``: even calls over Twilio Media Streams
   (``both_tracks``), odd ones over Genesys AudioHook (both channels), each with a subscriber of
   its assist feed. The calls are simulated (espeak-ng voices over a simulated telephone line,
   :mod:`services.customer_service.simulate`), so ground truth is known.

   Per level: from the VAD's end-of-utterance decision to the audio ``emotion`` event, the
   ``transcript`` event and the fused ``emotion`` (p50/p95 of the server's ``latency_ms``); the VAD
   hangover apart (silence waited for before deciding, not part of those); the same latencies as
   the client sees them (arrival time minus the decision's place in the paced stream: adds VAD lag
   and feed delivery, approximate); the word error rate of the transcripts against the simulated
   script; server CPU (the uvicorn process and its children, e.g. the ASR decoder processes) per
   second of call audio, and peak RSS. The most concurrent calls keeping the emotion event's p95,
   the transcript event's, and both within 300 ms are reported.
2. **Naive baseline** (same run, after the server stopped): the same utterances (cut at their
   simulated boundaries) through the same models in this process, one at a time, ASR then emotion,
   no runtime and no batching. Its service time per utterance, the ASR real-time factor and word
   error rate; and its latency at each level, from a FIFO replay of the level's utterance decision
   times (end of speech + hangover, calls starting together) through one such worker with the
   measured service times.

Usage::

    python bench/customer_service.py            # 1, 2, 4, 8 calls, whole calls (~4 min on 2 cores)
    python bench/customer_service.py --quick    # 1 and 2 calls, 10 s of each (~1 min; a smoke run)
    tessera bench customer_service [--quick]

The machine is shared while this runs: its numbers are those of a busy 2-core box unless told.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench._cs_load import (  # noqa: E402
    CallRun,
    EventTiming,
    ProcessTree,
    percentile,
    stream_calls,
)
from services.customer_service.simulate import SimulatedCall, UtteranceTruth  # noqa: E402

RESULTS = REPO / "bench" / "results" / "customer_service.json"
CALLS_CACHE = REPO / "bench" / "results" / "cs_calls"
GOAL_P95_MS = 300.0
SCENARIOS = ("routine", "escalating", "bereavement", "satisfied", "recovered", "disappointed", "routine",
             "escalating")


@dataclass(frozen=True)
class Plan:
    """The sizes of one run."""

    levels: tuple[int, ...]
    max_call_s: float | None
    """Stream only this much of each call (``None``: whole calls)."""
    pacing: float = 1.0
    seed: int = 18


FULL = Plan(levels=(1, 2, 4, 8), max_call_s=None)
QUICK = Plan(levels=(1, 2), max_call_s=10.0)


# --- simulated calls -------------------------------------------------------------------------------

def simulated_calls(count: int, seed: int, cache: Path | None) -> list[SimulatedCall]:
    """``count`` simulated calls (scenarios cycling through :data:`SCENARIOS`), read from ``cache``
    when written there before, else synthesised (and written there)."""
    from services.customer_service.simulate import call_seed, read_call, simulate_call, write_call

    calls = []
    for index in range(count):
        call_id_seed = call_seed(seed, index)
        scenario = SCENARIOS[index % len(SCENARIOS)]
        manifest = cache / f"{seed}-{index}" if cache else None
        found = sorted(manifest.glob("CA*.json")) if manifest and manifest.exists() else []
        if found:
            calls.append(read_call(found[0]))
            continue
        call = simulate_call(call_id_seed, scenario=scenario)
        if manifest is not None:
            write_call(call, manifest)
        calls.append(call)
    return calls


def truths_within(call: SimulatedCall, max_call_s: float | None) -> list[UtteranceTruth]:
    """The call's utterances that end within the streamed part."""
    return [u for u in call.utterances if max_call_s is None or u.end_ms <= max_call_s * 1000]


# --- word error rate -------------------------------------------------------------------------------

def matched_transcripts(run: CallRun, call: SimulatedCall, max_call_s: float | None,
                        ) -> tuple[list[str], list[str], int]:
    """References and hypotheses for the WER: each transcript event joined to the simulated utterance
    of its speaker it overlaps most; words of transcripts overlapping none count as insertions. An
    utterance cut by ``max_call_s`` counts neither way."""
    from services.customer_service.evaluation import normalize_words

    whole = {truth.index for truth in truths_within(call, max_call_s)}
    hypotheses: dict[int, list[str]] = {index: [] for index in whole}
    inserted = 0
    for event in sorted(run.transcripts, key=lambda e: e.start_ms):
        overlaps = [(min(event.end_ms, t.end_ms) - max(event.start_ms, t.start_ms), t.index) for t in call.utterances
                    if t.role == event.speaker]
        overlap, index = max(overlaps, default=(0, -1))
        if overlap <= 0:
            inserted += len(normalize_words(event.text))
        elif index in whole:
            hypotheses[index].append(event.text)
    truths = [truth for truth in call.utterances if truth.index in whole]
    return [t.text for t in truths], [" ".join(hypotheses[t.index]) for t in truths], inserted


def wer_of(runs: Sequence[CallRun], calls: dict[str, SimulatedCall], max_call_s: float | None) -> dict[str, Any]:
    """Corpus WER of the live transcripts against the simulated scripts."""
    from services.customer_service.evaluation import word_errors

    references: list[str] = []
    hypotheses: list[str] = []
    inserted = 0
    for run in runs:
        refs, hyps, extra = matched_transcripts(run, calls[run.simulated_id], max_call_s)
        references += refs
        hypotheses += hyps
        inserted += extra
    errors = word_errors(references, hypotheses)
    total = errors.errors + inserted
    return {"wer": round(total / max(errors.reference_words, 1), 3), "reference_words": errors.reference_words,
            "utterances": errors.utterances, "words_outside_any_utterance": inserted}


# --- one level -------------------------------------------------------------------------------------

def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """p50, p95, max and count of ``values`` (ms)."""
    return {"p50": percentile(values, 50), "p95": percentile(values, 95),
            "max": round(max(values), 1) if values else None, "n": len(values)}


def level_summary(level: int, runs: Sequence[CallRun], cpu_s: float, wall_s: float, peak_rss_mb: float,
                  calls: dict[str, SimulatedCall], max_call_s: float | None) -> dict[str, Any]:
    """The record of one concurrency level."""
    events = [event for run in runs for event in run.events]

    def of(kind: str) -> list[EventTiming]:
        return [event for event in events if event.kind == kind]

    audio_seconds = sum(run.audio_s for run in runs)
    summary: dict[str, Any] = {
        "concurrent_calls": level,
        "calls": {"twilio": sum(run.protocol == "twilio" for run in runs),
                  "audiohook": sum(run.protocol == "audiohook" for run in runs)},
        "utterances": len(of("transcript")),
        "emotion_ms": summarize([e.latency_ms for e in of("emotion")]),
        "transcript_ms": summarize([e.latency_ms for e in of("transcript")]),
        "fused_emotion_ms": summarize([e.latency_ms for e in of("emotion_final")]),
        "hangover_ms": summarize([e.hangover_ms for e in of("transcript")]),
        "client_observed_ms": {
            "emotion": summarize([e.client_ms for e in of("emotion") if e.client_ms is not None]),
            "transcript": summarize([e.client_ms for e in of("transcript") if e.client_ms is not None])},
        "asr": wer_of(runs, calls, max_call_s),
        "audio_s": round(audio_seconds, 1),
        "wall_s": round(wall_s, 1),
        "server_cpu_s": round(cpu_s, 2),
        "server_cpu_s_per_call_s": round(cpu_s / audio_seconds, 3) if audio_seconds else None,
        "server_cpu_s_per_call": round(cpu_s / len(runs), 2) if runs else None,
        "server_peak_rss_mb": round(peak_rss_mb, 1),
        "failures": [run.failure for run in runs if run.failure],
    }
    holds = {event: summary[key]["p95"] is not None and summary[key]["p95"] <= GOAL_P95_MS and not summary["failures"]
             for event, key in (("emotion", "emotion_ms"), ("transcript", "transcript_ms"))}
    summary["within_goal"] = {**holds, "both": all(holds.values())}
    return summary


def largest_within_goal(levels: Sequence[dict[str, Any]], event: str) -> int | None:
    """The largest number of concurrent calls up to which every level tried held the goal for
    ``event`` (``emotion``, ``transcript`` or ``both``); ``None`` when the smallest did not."""
    largest = None
    for level in sorted(levels, key=lambda item: item["concurrent_calls"]):
        if not level["within_goal"][event]:
            break
        largest = level["concurrent_calls"]
    return largest


async def run_level(server: Any, tree: ProcessTree, calls: Sequence[SimulatedCall], level: int,
                    plan: Plan) -> dict[str, Any]:
    """Stream ``level`` calls at once and summarise them."""
    protocols = ["twilio" if index % 2 == 0 else "audiohook" for index in range(level)]
    cpu_before = tree.cpu_seconds()
    started = time.monotonic()
    runs = await stream_calls(server, calls[:level], protocols, pacing=plan.pacing, max_call_s=plan.max_call_s,
                              tree=tree)
    wall = time.monotonic() - started
    return level_summary(level, runs, tree.cpu_seconds() - cpu_before, wall, tree.peak_rss_mb(),
                         {call.call_id: call for call in calls}, plan.max_call_s)


# --- the naive baseline ----------------------------------------------------------------------------

@dataclass
class BaselinePoint:
    """One utterance through the naive path."""

    call: str
    decided_s: float
    """Its end-of-utterance decision in the call's time: end of speech + the hangover."""
    asr_s: float
    emotion_s: float
    audio_s: float
    text: str
    reference: str

    @property
    def service_s(self) -> float:
        """ASR then emotion."""
        return self.asr_s + self.emotion_s


def naive_baseline(calls: Sequence[SimulatedCall], plan: Plan, hangover_ms: float) -> list[BaselinePoint]:
    """Every streamed utterance of ``calls`` through the models in this process, one at a time."""
    from bench._cs_load import direct_models

    transcribe, emotion = direct_models()
    points = []
    pad = 800  # 100 ms on each side, as the endpointer pads
    for call in calls:
        for truth in truths_within(call, plan.max_call_s):
            pcm = call.pcm(truth.role)
            samples = pcm[max(truth.start_ms * 8 - pad, 0): truth.end_ms * 8 + pad]
            started = time.perf_counter()
            text = transcribe(samples)
            asr_done = time.perf_counter()
            emotion(samples, text)
            done = time.perf_counter()
            points.append(BaselinePoint(call.call_id, (truth.end_ms + hangover_ms) / 1000, asr_done - started,
                                        done - asr_done, len(samples) / 8000, text, truth.text))
    return points


def fifo_latencies_ms(points: Sequence[BaselinePoint]) -> list[float]:
    """Latency of each utterance served one at a time in decision order by one worker (calls start
    together): finish - decision, with waiting for the worker included."""
    free_at = 0.0
    latencies = []
    for point in sorted(points, key=lambda p: p.decided_s):
        start = max(free_at, point.decided_s)
        free_at = start + point.service_s
        latencies.append(1000 * (free_at - point.decided_s))
    return latencies


def baseline_summary(points: Sequence[BaselinePoint], calls: Sequence[SimulatedCall],
                     levels: Sequence[int]) -> dict[str, Any]:
    """Service time, ASR RTF and WER of the naive path, and its FIFO latency per level."""
    from services.customer_service.evaluation import word_errors

    errors = word_errors([p.reference for p in points], [p.text for p in points])
    per_level = {}
    for level in levels:
        chosen = {call.call_id for call in calls[:level]}
        latencies = fifo_latencies_ms([p for p in points if p.call in chosen])
        per_level[str(level)] = {"latency_ms": summarize(latencies),
                                 "within_goal": bool(latencies) and (percentile(latencies, 95) or 0) <= GOAL_P95_MS}
    return {
        "utterances": len(points),
        "service_ms": summarize([1000 * p.service_s for p in points]),
        "asr_ms": summarize([1000 * p.asr_s for p in points]),
        "emotion_ms": summarize([1000 * p.emotion_s for p in points]),
        "asr_real_time_factor": round(sum(p.asr_s for p in points) / max(sum(p.audio_s for p in points), 1e-9), 3),
        "wer": round(errors.wer, 3), "reference_words": errors.reference_words,
        "fifo_latency_by_level": per_level,
    }


# --- the run ---------------------------------------------------------------------------------------

@dataclass
class Record:
    """What the run writes."""

    generated_at: str
    mode: str
    simulated: bool
    host: dict[str, Any]
    plan: dict[str, Any]
    emotion_model: str = ""
    levels: list[dict[str, Any]] = field(default_factory=list)
    max_calls_within_goal: dict[str, int | None] = field(default_factory=dict)
    """Per event (``emotion``, ``transcript``, ``both``): the most concurrent calls up to which
    every level tried kept p95 within the goal."""
    baseline: dict[str, Any] = field(default_factory=dict)


def run(plan: Plan, mode: str, out: Path, cache: Path | None) -> Record:
    """The live levels, then the baseline; the record is written to ``out``."""
    from bench._cs_load import serve_for_bench

    record = Record(generated_at=datetime.now(UTC).isoformat(timespec="seconds"), mode=mode, simulated=True,
                    host={"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                          "load_average_at_start": list(os.getloadavg())},
                    plan={**asdict(plan), "goal_p95_ms": GOAL_P95_MS})
    calls = simulated_calls(max(plan.levels), plan.seed, cache)
    print(f"{len(calls)} simulated calls ({', '.join(f'{c.scenario} {c.duration_ms / 1000:.0f} s' for c in calls)})",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="tessera-bench-cs-") as workdir:
        with serve_for_bench(Path(workdir)) as (server, tree, model_origin):
            record.emotion_model = model_origin
            print(f"emotion model: {model_origin}", flush=True)
            for level in plan.levels:
                summary = asyncio.run(run_level(server, tree, calls, level, plan))
                record.levels.append(summary)
                print(level_line(summary), flush=True)
        hangover = statistics.median([level["hangover_ms"]["p50"] for level in record.levels
                                      if level["hangover_ms"]["p50"] is not None] or [500.0])
        points = naive_baseline(calls[:max(plan.levels)], plan, hangover)
    record.baseline = baseline_summary(points, calls, plan.levels)
    record.max_calls_within_goal = {event: largest_within_goal(record.levels, event)
                                    for event in ("emotion", "transcript", "both")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(asdict(record), indent=1))
    return record


def level_line(level: dict[str, Any]) -> str:
    """One level as a progress line."""
    return (f"  {level['concurrent_calls']} calls: emotion p95 {level['emotion_ms']['p95']} ms, transcript p95 "
            f"{level['transcript_ms']['p95']} ms, {level['utterances']} utterances"
            + (f", failures: {level['failures']}" if level["failures"] else ""))


def print_table(record: Record) -> None:
    """The record as the README table."""
    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

    print(f"\nLive calls ({record.mode}; simulated speech; decision = VAD end of utterance; server latency_ms; "
          f"goal p95 <= {GOAL_P95_MS:g} ms)")
    header = ("calls", "utts", "emotion p50/p95", "transcript p50/p95", "fused p50/p95", "client emo/tr p95",
              "hangover p50", "WER", "CPU s/call-s", "peak RSS MB", "naive p50/p95")
    print(" | ".join(header))
    baseline = record.baseline.get("fifo_latency_by_level", {})
    for level in record.levels:
        naive = baseline.get(str(level["concurrent_calls"]), {}).get("latency_ms", {})
        client = level["client_observed_ms"]
        print(" | ".join([
            str(level["concurrent_calls"]), str(level["utterances"]),
            f"{cell(level['emotion_ms']['p50'])}/{cell(level['emotion_ms']['p95'])}",
            f"{cell(level['transcript_ms']['p50'])}/{cell(level['transcript_ms']['p95'])}",
            f"{cell(level['fused_emotion_ms']['p50'])}/{cell(level['fused_emotion_ms']['p95'])}",
            f"{cell(client['emotion']['p95'])}/{cell(client['transcript']['p95'])}",
            cell(level["hangover_ms"]["p50"]), cell(level["asr"]["wer"]), cell(level["server_cpu_s_per_call_s"]),
            cell(level["server_peak_rss_mb"]), f"{cell(naive.get('p50'))}/{cell(naive.get('p95'))}"]))
    base = record.baseline
    print(f"\nNaive baseline (in-process, one utterance at a time, ASR then emotion): service p50/p95 "
          f"{cell(base['service_ms']['p50'])}/{cell(base['service_ms']['p95'])} ms (ASR "
          f"{cell(base['asr_ms']['p50'])}, emotion {cell(base['emotion_ms']['p50'])} ms p50), ASR real-time factor "
          f"{cell(base['asr_real_time_factor'])}, WER {cell(base['wer'])} on {base['utterances']} utterances")
    within = record.max_calls_within_goal
    print(f"Most concurrent calls keeping p95 <= {GOAL_P95_MS:g} ms (levels tried: "
          f"{', '.join(str(x) for x in record.plan['levels'])}): emotion event {cell(within['emotion'])}, "
          f"transcript event {cell(within['transcript'])}, both {cell(within['both'])}")


def main(argv: list[str] | None = None) -> int:
    """``python bench/customer_service.py [--quick] [--out PATH] [--calls-cache DIR|none]``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 and 2 calls, 10 s of each (a smoke run, ~1 min)")
    parser.add_argument("--levels", help="comma-separated concurrent calls (default 1,2,4,8; quick 1,2)")
    parser.add_argument("--max-call-s", type=float, help="stream only this much of each call (default: whole "
                        "calls; quick 10)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--calls-cache", default=str(CALLS_CACHE),
                        help="where simulated calls are kept between runs ('none': synthesise every time)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.levels:
        try:
            levels = tuple(sorted({int(x) for x in args.levels.split(",") if x.strip()}))
        except ValueError:
            parser.error(f"--levels {args.levels!r}: comma-separated whole numbers")
        if not levels or min(levels) < 1:
            parser.error("--levels: at least one level, each >= 1")
        plan = replace(plan, levels=levels)
    if args.max_call_s is not None:
        if args.max_call_s < 2:
            parser.error("--max-call-s: at least 2 seconds")
        plan = replace(plan, max_call_s=args.max_call_s)
    import shutil

    if shutil.which("espeak-ng") is None:
        print("espeak-ng is not installed: no simulated calls (scripts/ensure_services.sh installs it)",
              file=sys.stderr)
        return 2
    cache = None if args.calls_cache == "none" else Path(args.calls_cache)
    record = run(plan, "quick" if args.quick else "full", args.out, cache)
    print_table(record)
    print(f"\nwrote {args.out}")
    failures = [failure for level in record.levels for failure in level["failures"]]
    return 1 if failures or np.isnan(record.baseline["service_ms"]["p50"] or 0.0) else 0


if __name__ == "__main__":
    raise SystemExit(main())
