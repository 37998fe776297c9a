"""``bench/nodule.py`` in its smallest mode: the same storescu push into our SCP, Orthanc and storescp.

The smoke plan (16 slices of 64 x 64, one run per peer) goes through every ingest path of the
benchmark: a migrated stack and ``tessera listen nodule dicom`` as a process, Orthanc and dcmtk's
``storescp`` each as installed and with ``TCP_NODELAY=1``, fresh UIDs per push, the table and the
JSON record. About 20 s; skipped, saying why, without dcmtk or Orthanc.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.nodule import dcmtk_tools

REPO = Path(__file__).resolve().parents[2]
PEERS = {"tessera (pynetdicom)", "orthanc (as installed)", "orthanc TCP_NODELAY=1", "storescp (as installed)",
         "storescp TCP_NODELAY=1"}


def test_the_smoke_run_pushes_one_series_into_every_peer_and_writes_the_record(tmp_path: Path) -> None:
    missing = [name for name, path in dcmtk_tools().items() if path is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: the ingest benchmark cannot run "
                    "(scripts/ensure_services.sh installs dcmtk and orthanc)")
    out = tmp_path / "nodule.json"
    completed = subprocess.run([sys.executable, str(REPO / "bench" / "nodule.py"), "--smoke", "--sections", "ingest",
                                "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120,
                               check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "C-STORE ingest: 16 x 64x64 int16" in completed.stdout
    record = json.loads(out.read_text())
    ingest = record["ingest"]
    assert ingest["series"]["instances"] == 16
    assert set(ingest["peers"]) == PEERS
    for peer in ingest["peers"].values():
        assert peer["instances_per_s"] > 0 and peer["mb_per_s"] > 0
        assert len(peer["seconds"]) == 1
    assert "detector" not in record and "end_to_end" not in record
