"""Results that cannot be built leave the findings in place: the job succeeds with a results_error,
no result row is indexed, and the study is done (the findings are the analysis' main product)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from services.nodule import analysis, report
from services.nodule.db import Result, SeriesFinding, Study
from shared.db import session_scope
from shared.jobs import Job
from tests.conftest import Stack
from tests.nodule.dicom_factory import SeriesIdentity
from tests.nodule.test_api_results import analyse, stand_in_detector


def test_a_failure_to_build_results_keeps_the_findings(nodule_env: Stack, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> list[Any]:
        raise report.ReportError("frame of reference differs")

    monkeypatch.setattr(analysis, "run_detector", stand_in_detector)
    monkeypatch.setattr(report, "build_results", broken)
    identity = SeriesIdentity.new()
    analyse(identity, "20260301", (9.0, 7.0), "unbuilt", tmp_path)
    with session_scope() as session:
        [job] = session.scalars(select(Job).where(Job.tenant_id == "unbuilt")).all()
        assert job.status == "succeeded" and job.result is not None
        assert job.result["results_error"].startswith("results not built (ReportError)")
        assert "frame of reference" not in job.result["results_error"]  # details stay in the worker log
        assert session.scalars(select(Result).where(Result.tenant_id == "unbuilt")).all() == []
        [finding] = session.scalars(select(SeriesFinding).where(SeriesFinding.tenant_id == "unbuilt")).all()
        assert len(finding.nodules) == 1 and finding.risk is not None
        study = session.get(Study, ("unbuilt", identity.study_instance_uid))
        assert study is not None and study.state == "done"
