"""``bench/runtime_gpu.py`` on the CPU, in its smallest sizes: every way of the fusion and sensor sections
and the forward costs run and land in the JSON record, and the out-of-memory section says it needs a
CUDA device. Its numbers mean nothing here; the GPU figures in the README come from a CUDA machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_gpu_bench_runs_its_ways_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "runtime_gpu.json"
    completed = subprocess.run([sys.executable, str(REPO / "bench" / "runtime_gpu.py"), "--device", "cpu",
                                "--sections", "costs,fusion,sensor,oom", "--seconds", "0.2", "--out", str(out)],
                               cwd=REPO, capture_output=True, text=True, timeout=280, check=False)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    record = json.loads(out.read_text())
    fusion_ways = {(point["way"], point["precision"], point["callers"]) for point in record["fusion"]["points"]}
    for way in ("one-by-one", "runtime", "runtime+buckets", "runtime+window"):
        assert {(way, "fp32", callers) for callers in (1, 4, 16)} <= fusion_ways
    assert ("runtime", "bf16", 4) in fusion_ways  # fp16 is not served on a CPU
    sensor_ways = {(point["way"], point["callers"]) for point in record["sensor"]["points"]}
    expected = {(way, callers) for way in ("unbatched", "runtime", "runtime+window") for callers in (1, 4, 16)}
    assert sensor_ways == expected
    assert all(point["windows_per_s"] > 0 and point["count"] > 0 for point in record["sensor"]["points"])
    assert record["oom"]["skipped"] == "needs a CUDA device"
    assert {(cost["precision"], cost["batch"]) for cost in record["costs"]["forward"]} == {
        (precision, batch) for precision in ("fp32", "bf16") for batch in (1, 2)}
    assert "copies_ms" not in record["costs"]  # host <-> device copies only on a GPU
    assert record["machine"]["device"] == "cpu"
