"""Risk fusion for an analysed series: the detector's nodules + the DICOM header + clinical data.

:func:`assess_series` turns the stored nodules of one analysed series (the JSON rows of
:class:`services.nodule.db.SeriesFinding`) into a :class:`SeriesRisk`:

- per nodule, the Brock (PanCan) malignancy probability (:func:`services.nodule.risk.brock_probability`,
  model 2a: spiculation is not measured) when every input is known: age and sex from the DICOM
  header, family history and emphysema posted for the study (``POST /v1/studies/{uid}/clinical``),
  the nodule's type and mean diameter, the nodule count of the series, and whether it lies in an
  upper lobe. Otherwise ``None`` with the reason (:attr:`NoduleRisk.malignancy_note`);
- per nodule and for the series, the Lung-RADS v2022 category: baseline unless a prior study of
  the same patient was analysed; then each nodule is matched to the prior's
  (:func:`services.nodule.risk.match_to_prior`), growth and volume doubling time are measured, and
  the follow-up rules apply (a nodule without a match is new).

Upper lobe is estimated, not segmented: :func:`lung_z_extent` finds the slices holding lung
(-950..-700 HU in the central part of the slice) and :func:`in_upper_lobe` takes the cranial half
of that height as the upper lobes. The fissures are not found, so a nodule near mid-height may be
put in the wrong lobe; when the lungs cannot be found the lobe is unknown and Brock is not given.

Pure functions over JSON-like rows, so the API recomputes the risk on read (clinical data posted
after the analysis counts) and the analysis job stores what the SR reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from services.nodule.risk import (
    BrockInputs,
    LungRadsCategory,
    LungRadsNodule,
    PriorComparison,
    PriorMeasurement,
    RiskInputError,
    Sex,
    TrackedNodule,
    brock_probability,
    lung_rads_mean_diameter,
    lung_rads_study,
    match_to_prior,
)
from services.nodule.schemas import NoduleType
from services.nodule.volume import SeriesVolume

LUNG_HU_RANGE = (-950.0, -700.0)
"""Aerated lung parenchyma (outside air is about -1000 HU, soft tissue above -100 HU)."""
LUNG_SLICE_FRACTION = 0.05
"""A slice holds lung when this share of its central region is in :data:`LUNG_HU_RANGE`."""
MIN_LUNG_SLICES = 5
UPPER_LOBE_SHARE = 0.5
"""The cranial share of the lung height taken as upper lobes (an approximation, see the module)."""


@dataclass(frozen=True)
class PatientContext:
    """What is known of the patient: header demographics and posted clinical data (None: unknown)."""

    age_years: float | None = None
    sex: str | None = None
    family_history_lung_cancer: bool | None = None
    emphysema: bool | None = None


@dataclass(frozen=True)
class PriorSeries:
    """The analysed series of the patient's most recent earlier study."""

    study_instance_uid: str
    interval_days: float
    nodules: Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class PriorMatch:
    """How one nodule compares with the prior study: matched (with growth and VDT) or new."""

    matched: bool
    prior_label: int | None = None
    distance_mm: float | None = None
    diameter_change_mm: float | None = None
    volume_change_percent: float | None = None
    growth: str | None = None
    volume_doubling_time_days: float | None = None


@dataclass(frozen=True)
class NoduleRisk:
    """Risk of one nodule: Brock probability (or why not), Lung-RADS category, prior comparison."""

    label: int
    malignancy_probability: float | None = None
    brock_model: str | None = None
    malignancy_note: str | None = None
    lung_rads: str | None = None
    prior: PriorMatch | None = None


@dataclass(frozen=True)
class SeriesRisk:
    """Risk of one analysed series: its nodules' and its Lung-RADS category (the most suspicious)."""

    baseline: bool
    lung_rads: str | None
    lung_rads_note: str | None = None
    prior_study_instance_uid: str | None = None
    interval_days: float | None = None
    nodules: tuple[NoduleRisk, ...] = field(default=())

    def as_json(self) -> dict[str, Any]:
        """The stored form (``SeriesFinding.risk``)."""
        return asdict(self)

    def by_label(self) -> dict[int, NoduleRisk]:
        """Each nodule's risk by its label."""
        return {risk.label: risk for risk in self.nodules}


# --- upper lobe -------------------------------------------------------------------------------------


def lung_z_extent(volume: SeriesVolume) -> tuple[float, float] | None:
    """The (lowest, highest) LPS z in mm of the slices that hold lung, or None if too few do."""
    slices, rows, columns = volume.shape
    centre = volume.hu[:, rows // 4: rows - rows // 4, columns // 4: columns - columns // 4]
    lung = (centre > LUNG_HU_RANGE[0]) & (centre < LUNG_HU_RANGE[1])
    share = lung.reshape(slices, -1).mean(axis=1) if centre.size else np.zeros(slices)
    holding = np.flatnonzero(share >= LUNG_SLICE_FRACTION)
    if holding.size < MIN_LUNG_SLICES:
        return None
    ends = volume.voxel_to_lps(np.array([[holding[0], rows / 2, columns / 2], [holding[-1], rows / 2, columns / 2]]))
    low, high = sorted((float(ends[0][2]), float(ends[1][2])))
    return low, high


def in_upper_lobe(centre_z_mm: float, extent: tuple[float, float] | None) -> bool | None:
    """Whether a centre lies in the cranial :data:`UPPER_LOBE_SHARE` of the lung height (None: unknown)."""
    if extent is None or extent[1] <= extent[0]:
        return None
    return centre_z_mm >= extent[1] - UPPER_LOBE_SHARE * (extent[1] - extent[0])


# --- Brock ------------------------------------------------------------------------------------------


def _sex(value: str | None) -> Sex | None:
    return {"F": Sex.FEMALE, "M": Sex.MALE}.get((value or "").upper())


def brock_for(nodule: Mapping[str, Any], nodule_count: int, patient: PatientContext) -> NoduleRisk:
    """The Brock probability of one nodule (model 2a), or None with what is missing."""
    missing = []
    sex = _sex(patient.sex)
    if patient.age_years is None:
        missing.append("patient age (PatientAge or birth date in the header)")
    if sex is None:
        missing.append("patient sex M or F (header)")
    if patient.family_history_lung_cancer is None:
        missing.append("family history of lung cancer (clinical data)")
    if patient.emphysema is None:
        missing.append("emphysema (clinical data)")
    if nodule.get("upper_lobe") is None:
        missing.append("lobe (the lungs could not be found on the series)")
    label = int(nodule["label"])
    if missing:
        return NoduleRisk(label=label, malignancy_note="Brock not computed, unknown: " + "; ".join(missing))
    assert patient.age_years is not None and sex is not None
    try:
        result = brock_probability(BrockInputs(
            age_years=patient.age_years, sex=sex, family_history_lung_cancer=bool(patient.family_history_lung_cancer),
            emphysema=bool(patient.emphysema), nodule_diameter_mm=_mean_diameter(nodule),
            nodule_type=NoduleType(nodule["nodule_type"]), upper_lobe=bool(nodule["upper_lobe"]),
            nodule_count=nodule_count, spiculation=None))
    except RiskInputError as exc:
        return NoduleRisk(label=label, malignancy_note=f"Brock not computed: {exc}")
    return NoduleRisk(label=label, malignancy_probability=result.probability, brock_model=result.model)


def _mean_diameter(nodule: Mapping[str, Any]) -> float:
    return (float(nodule["long_axis_mm"]) + float(nodule["short_axis_mm"])) / 2.0


# --- prior comparison and Lung-RADS -------------------------------------------------------------------


def _tracked(nodule: Mapping[str, Any]) -> TrackedNodule:
    centre = nodule["centre_lps_mm"]
    return TrackedNodule(nodule_id=str(nodule["label"]), centre_lps_mm=(float(centre[0]), float(centre[1]),
                                                                        float(centre[2])),
                         mean_diameter_mm=_mean_diameter(nodule), volume_mm3=nodule.get("volume_mm3") or None)


def compare_with_prior(nodules: Sequence[Mapping[str, Any]], prior: PriorSeries) -> dict[int, PriorMatch]:
    """Each current nodule's match in the prior series (growth, VDT), or unmatched (new)."""
    comparison: PriorComparison = match_to_prior([_tracked(n) for n in nodules], [_tracked(n) for n in prior.nodules],
                                                 prior.interval_days)
    matches = {int(n["label"]): PriorMatch(matched=False) for n in nodules}
    for pair in comparison.matched:
        matches[int(pair.current.nodule_id)] = PriorMatch(
            matched=True, prior_label=int(pair.prior.nodule_id), distance_mm=round(pair.distance_mm, 2),
            diameter_change_mm=round(pair.diameter_change_mm, 2),
            volume_change_percent=round(pair.volume_change_percent, 1), growth=pair.doubling_time.trend.value,
            volume_doubling_time_days=(None if pair.doubling_time.days is None
                                       else round(pair.doubling_time.days, 1)))
    return matches


def _lung_rads_nodule(nodule: Mapping[str, Any], prior_nodule: Mapping[str, Any] | None,
                      prior: PriorSeries | None) -> LungRadsNodule:
    measurement = None
    if prior_nodule is not None and prior is not None:
        measurement = PriorMeasurement(
            mean_diameter_mm=lung_rads_mean_diameter(prior_nodule["long_axis_mm"], prior_nodule["short_axis_mm"]),
            solid_component_mm=prior_nodule.get("solid_component_mm"), interval_days=prior.interval_days)
    return LungRadsNodule(nodule_type=NoduleType(nodule["nodule_type"]),
                          mean_diameter_mm=lung_rads_mean_diameter(nodule["long_axis_mm"], nodule["short_axis_mm"]),
                          solid_component_mm=nodule.get("solid_component_mm"), volume_mm3=nodule.get("volume_mm3"),
                          prior=measurement)


def assess_series(nodules: Sequence[Mapping[str, Any]], patient: PatientContext,
                  prior: PriorSeries | None = None) -> SeriesRisk:
    """Brock per nodule, Lung-RADS per nodule and for the series, and the prior comparison.

    Parameters
    ----------
    nodules : sequence of mapping
        The series' stored nodules (``label``, ``centre_lps_mm``, ``long_axis_mm``, ``short_axis_mm``,
        ``volume_mm3``, ``nodule_type``, ``solid_component_mm``, ``upper_lobe``).
    patient : PatientContext
    prior : PriorSeries, optional
        The patient's earlier analysed series; None makes this a baseline screening.

    Returns
    -------
    SeriesRisk
    """
    matches = compare_with_prior(nodules, prior) if prior is not None else {}
    prior_by_label = {int(n["label"]): n for n in prior.nodules} if prior is not None else {}
    lung_rads_inputs = [_lung_rads_nodule(n, _prior_nodule(prior_by_label, matches, n), prior) for n in nodules]
    try:
        study = lung_rads_study(lung_rads_inputs, baseline=prior is None)
        categories: list[str | None] = [assessment.category.value for assessment in study.nodules]
        series_category, note = study.category.value, None
    except RiskInputError as exc:
        categories, series_category, note = [None] * len(nodules), None, f"Lung-RADS not assigned: {exc}"
    risks = []
    for nodule, category in zip(nodules, categories, strict=True):
        brock = brock_for(nodule, len(nodules), patient)
        risks.append(NoduleRisk(label=brock.label, malignancy_probability=brock.malignancy_probability,
                                brock_model=brock.brock_model, malignancy_note=brock.malignancy_note,
                                lung_rads=category, prior=matches.get(brock.label)))
    return SeriesRisk(baseline=prior is None, lung_rads=series_category, lung_rads_note=note,
                      prior_study_instance_uid=prior.study_instance_uid if prior else None,
                      interval_days=prior.interval_days if prior else None, nodules=tuple(risks))


def _prior_nodule(prior_by_label: Mapping[int, Mapping[str, Any]], matches: Mapping[int, PriorMatch],
                  nodule: Mapping[str, Any]) -> Mapping[str, Any] | None:
    match = matches.get(int(nodule["label"]))
    if match is None or match.prior_label is None:
        return None
    return prior_by_label.get(match.prior_label)


def highest_category(categories: Iterable[str | None]) -> str | None:
    """The most suspicious of some Lung-RADS categories (None when none is given)."""
    order = list(LungRadsCategory)
    known = [LungRadsCategory(category) for category in categories if category]
    return max(known, key=order.index).value if known else None
