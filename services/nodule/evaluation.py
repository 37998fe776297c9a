"""Evaluating the nodule detector on simulated studies: per-scan sensitivity/specificity, FROC, CPM.

**The studies here are simulated** (:mod:`services.nodule.simulate`); figures computed on them are
figures on simulated data, not on patients.

Splits, by seed (:func:`split_seeds`): training, validation and evaluation seeds are derived from
different roots, so no study is shared. The evaluation split is also drawn with other settings than
training and validation (:data:`EVALUATION_CONFIG`: more noise, more sharp kernels, slice spacings
not used in training, in-plane rotation, more juxta-pleural nodules). Thresholds (the reported
confidence, the attenuation shares) are chosen on the validation split only. Training may instead use
the wider domain of :data:`WIDE_TRAINING_CONFIG` (``TRAINING_SETTINGS["wide"]``), still its own seeds.

Scoring, as LUNA16 does it:

- a candidate *hits* a true nodule when its centre lies within the nodule's radius (half its long
  axis) of the true centre (LPS mm); a candidate hitting several nodules counts for the nearest;
- only nodules of at least :data:`MIN_COUNTED_MM` long axis are counted (LUNA16 evaluates nodules of
  3 mm and more); a candidate hitting a smaller one counts neither as a hit nor as a false positive;
- FROC: over all scans, for every threshold, the share of nodules hit by a candidate at or above it
  against the non-hitting candidates per scan; candidates that hit an already-hit nodule count
  neither way;
- CPM: the mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 false positives per scan, each the
  best sensitivity whose FP rate does not exceed it (a step curve, no interpolation);
- per scan at an operating threshold: a scan with (counted) nodules is a true positive when at least
  one of them is hit by a reported candidate (a detection elsewhere does not count); a scan
  without is a true negative when nothing is reported (bar hits on uncounted small nodules);
- 95 % intervals: percentile bootstrap over scans (resampled with replacement).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from services.nodule.findings import DetectedNodule, SeriesFindings
from services.nodule.simulate import SimulatedStudy, SimulationConfig
from services.nodule.volume import SeriesVolume

CPM_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""False positives per scan at which the LUNA16 CPM averages sensitivity."""
MIN_COUNTED_MM = 3.0
"""True nodules with a shorter long axis are not counted (neither to find nor as false positives)."""
SPLIT_ROOTS = {"train": 17_001, "validation": 17_002, "evaluation": 17_003, "train_small": 17_004}
"""Seed roots: ``train_small`` seeds the extra small-nodule training studies (:func:`small_nodule_config`)."""
TRAINING_CONFIG = SimulationConfig()
"""Training and validation studies: the simulator's defaults (64 x 256 x 256; slices 1-2.5 mm)."""
EVALUATION_CONFIG = SimulationConfig(
    noise_sd_hu=(15.0, 55.0), sharp_kernel_probability=0.7, slice_spacing_choices_mm=(1.1, 1.75, 2.25),
    pixel_spacing_mm=(0.62, 0.92), max_rotation_deg=8.0, juxta_pleural_fraction=0.35,
    juxta_vascular_fraction=0.25, type_weights=(0.5, 0.25, 0.25), no_nodule_probability=0.35,
)
"""Held-out studies: other seeds and other settings than :data:`TRAINING_CONFIG`."""
WIDE_TRAINING_CONFIG = SimulationConfig(
    noise_sd_hu=(5.0, 75.0), sharp_kernel_probability=0.6, slice_spacing_choices_mm=(1.0, 1.25, 1.5, 2.0, 2.5, 3.0),
    pixel_spacing_mm=(0.55, 0.95), max_rotation_deg=12.0, juxta_pleural_fraction=0.3,
    juxta_vascular_fraction=0.25, type_weights=(0.5, 0.25, 0.25), no_nodule_probability=0.25,
)
"""Training and validation over a wider domain (v6): noise from low-dose to very quiet scans (5-75 HU),
more sharp kernels, slices 1-3 mm, in-plane rotation up to 12 degrees. It spans the evaluation's ranges
without being its settings: :data:`EVALUATION_CONFIG`'s slice spacings and its mix stay its own."""
TRAINING_SETTINGS = {"default": TRAINING_CONFIG, "wide": WIDE_TRAINING_CONFIG}
"""Named training/validation domains (``tessera train nodule --two-stage --training-settings``)."""
SMALL_NODULE_MM = (3.0, 6.0)
"""Diameters (mm) of the nodules of the extra small-nodule training studies (:func:`small_nodule_config`)."""


def small_nodule_config(base: SimulationConfig) -> SimulationConfig:
    """``base`` with only small nodules (:data:`SMALL_NODULE_MM`), 2-6 of them in every study.

    Small nodules are the ones the two-stage detector generalises worst to (2026-12-05: on the training
    studies it accepted 64 % of the 3-5 mm nodules, on the development set 29 %); studies drawn so add
    positives, and the vessel crossings and noise blobs that look like them, where training is short of both.
    """
    return replace(base, nodule_diameter_mm=SMALL_NODULE_MM, nodule_count=(2, 6), no_nodule_probability=0.0)


def split_seeds(split: str, count: int) -> list[int]:
    """Seeds of the first ``count`` studies of a split (``train``, ``validation`` or ``evaluation``)."""
    root = SPLIT_ROOTS[split]
    return [int(np.random.SeedSequence([root, index]).generate_state(1, np.uint32)[0]) for index in range(count)]


CALIBRATION_STUDIES = 24
"""Validation studies the two-stage detector's training calibrates on: the validation split's first seeds
(``tessera train nodule --two-stage``'s default ``--validation-studies``). The development set starts after them."""


def development_seeds(count: int) -> list[int]:
    """Seeds of the development set: the validation split's seeds past the first :data:`CALIBRATION_STUDIES`.

    Its studies are drawn with :data:`EVALUATION_CONFIG`'s settings, so choices that must hold on
    held-out-like scans are made there and never on the evaluation seeds. A training run calibrated
    on more than :data:`CALIBRATION_STUDIES` validation studies overlaps it.
    """
    return split_seeds("validation", CALIBRATION_STUDIES + count)[CALIBRATION_STUDIES:]


def split_config(split: str, seed: int, base: SimulationConfig | None = None) -> SimulationConfig:
    """The simulation config of one study of a split (``base``: the training domain of the train and
    validation splits, :data:`TRAINING_CONFIG` by default; the evaluation split always has its own)."""
    if split == "evaluation":
        base = EVALUATION_CONFIG
    elif base is None:
        base = TRAINING_CONFIG
    return replace(base, seed=seed)


def volume_from_simulated(study: SimulatedStudy, uid: str = "") -> SeriesVolume:
    """A simulated study as the :class:`SeriesVolume` volume assembly would give (axial, LPS axes)."""
    uids = study.uids() if not uid else {"SeriesInstanceUID": uid, "StudyInstanceUID": uid}
    return SeriesVolume(
        series_instance_uid=uids["SeriesInstanceUID"], study_instance_uid=uids["StudyInstanceUID"],
        frame_of_reference_uid=None, hu=study.hu, spacing_mm=study.spacing_mm, origin_lps=study.origin_lps_mm,
        direction=np.eye(3), sop_instance_uids=(), source_paths=(), convolution_kernel=study.convolution_kernel,
        slice_thickness_mm=study.spacing_mm[0])


# -- per-scan records -----------------------------------------------------------------------------
@dataclass(frozen=True)
class TruthNodule:
    """A true nodule: centre (LPS mm), radius (mm) and what else is reported per nodule.

    ``long_axis_mm`` of 0 means unknown: the nodule is counted.
    """

    centre_lps_mm: tuple[float, float, float]
    radius_mm: float
    nodule_type: str = ""
    long_axis_mm: float = 0.0

    @property
    def counted(self) -> bool:
        """Whether it is large enough to be scored (:data:`MIN_COUNTED_MM`)."""
        return self.long_axis_mm == 0.0 or self.long_axis_mm >= MIN_COUNTED_MM


@dataclass(frozen=True)
class Candidate:
    """A detector candidate: centre (LPS mm), confidence and what it measured."""

    centre_lps_mm: tuple[float, float, float]
    confidence: float
    nodule_type: str = ""
    long_axis_mm: float = 0.0


@dataclass(frozen=True)
class ScanRecord:
    """One scan's truth and candidates (every candidate, whatever its confidence)."""

    scan_id: str
    truths: tuple[TruthNodule, ...]
    candidates: tuple[Candidate, ...]
    seconds: float = 0.0

    @property
    def positive(self) -> bool:
        """The scan has at least one counted nodule."""
        return any(truth.counted for truth in self.truths)


def truths_of(study: SimulatedStudy) -> tuple[TruthNodule, ...]:
    """The ground truth of a simulated study as :class:`TruthNodule` records."""
    return tuple(TruthNodule(n.center_lps_mm, n.long_axis_mm / 2, str(n.nodule_type), n.long_axis_mm)
                 for n in study.nodules)


def candidates_of(findings: SeriesFindings) -> tuple[Candidate, ...]:
    """A detector's findings as :class:`Candidate` records."""
    return candidates_of_nodules(findings.nodules)


def candidates_of_nodules(nodules: Sequence[DetectedNodule]) -> tuple[Candidate, ...]:
    """Detected nodules as :class:`Candidate` records (types as the simulator spells them)."""
    return tuple(Candidate(n.centre_lps_mm, n.confidence, str(n.nodule_type.value).replace("-", "_"), n.long_axis_mm)
                 for n in nodules)


def match(scan: ScanRecord) -> list[int | None]:
    """For each candidate, the index of the nearest true nodule it hits, or ``None``."""
    if not scan.truths:
        return [None] * len(scan.candidates)
    centres = np.array([t.centre_lps_mm for t in scan.truths], dtype=float)
    radii = np.array([t.radius_mm for t in scan.truths], dtype=float)
    hits: list[int | None] = []
    for candidate in scan.candidates:
        distance = np.linalg.norm(centres - np.asarray(candidate.centre_lps_mm, dtype=float), axis=1)
        inside = distance <= radii
        hits.append(int(np.argmin(np.where(inside, distance, np.inf))) if inside.any() else None)
    return hits


@dataclass(frozen=True)
class _Scored:
    """Per-scan summary used by every metric: each nodule's best hit score, the false-positive scores."""

    nodule_scores: np.ndarray  # best confidence of a candidate hitting it, -inf if none
    fp_scores: np.ndarray
    positive: bool


def _score(scan: ScanRecord) -> _Scored:
    best = np.full(len(scan.truths), -np.inf)
    false_positives = []
    for candidate, hit in zip(scan.candidates, match(scan), strict=True):
        if hit is None:
            false_positives.append(candidate.confidence)
        else:
            best[hit] = max(best[hit], candidate.confidence)
    counted = np.array([truth.counted for truth in scan.truths], dtype=bool)
    return _Scored(best[counted], np.asarray(false_positives, dtype=float), scan.positive)


# -- FROC and CPM ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Froc:
    """A FROC curve and the CPM.

    Attributes
    ----------
    fp_per_scan, sensitivity : numpy.ndarray
        The curve, one point per distinct threshold, from the highest threshold down.
    sensitivity_at : dict
        Sensitivity at each of :data:`CPM_FP_RATES`.
    cpm : float
        Mean of ``sensitivity_at``.
    nodules, scans : int
        How many true nodules and scans it was computed on.
    """

    fp_per_scan: np.ndarray
    sensitivity: np.ndarray
    sensitivity_at: dict[float, float]
    cpm: float
    nodules: int
    scans: int


def _froc_of(scored: Sequence[_Scored], fp_rates: Sequence[float] = CPM_FP_RATES) -> Froc:
    scans = len(scored)
    nodule_scores = np.concatenate([s.nodule_scores for s in scored]) if scored else np.zeros(0)
    fp_scores = np.sort(np.concatenate([s.fp_scores for s in scored]))[::-1] if scored else np.zeros(0)
    nodules = len(nodule_scores)
    thresholds = np.unique(np.concatenate([nodule_scores[np.isfinite(nodule_scores)], fp_scores]))[::-1]
    sensitivity = np.array([(nodule_scores >= t).sum() / max(nodules, 1) for t in thresholds])
    fp_per_scan = np.array([(fp_scores >= t).sum() / max(scans, 1) for t in thresholds])
    at = {rate: _sensitivity_at(nodule_scores, fp_scores, rate, scans) for rate in fp_rates}
    return Froc(fp_per_scan, sensitivity, at, float(np.mean(list(at.values()))) if at else 0.0, nodules, scans)


def _sensitivity_at(nodule_scores: np.ndarray, fp_sorted_desc: np.ndarray, rate: float, scans: int) -> float:
    """Best sensitivity with at most ``rate * scans`` false positives (thresholds strictly above the next FP)."""
    if len(nodule_scores) == 0:
        return float("nan")
    allowed = math.floor(rate * scans + 1e-9)
    if allowed >= len(fp_sorted_desc):
        return float(np.isfinite(nodule_scores).mean())
    return float((nodule_scores > fp_sorted_desc[allowed]).mean())


def froc(scans: Sequence[ScanRecord], fp_rates: Sequence[float] = CPM_FP_RATES) -> Froc:
    """FROC curve and CPM over ``scans`` (see the module docstring for the rules)."""
    return _froc_of([_score(scan) for scan in scans], fp_rates)


# -- per scan -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScanCounts:
    """Per-scan outcome counts at one operating threshold, and nodule-level figures."""

    true_positive: int
    false_negative: int
    true_negative: int
    false_positive: int
    nodules_hit: int
    nodules: int
    false_candidates: int
    scans: int

    @property
    def sensitivity(self) -> float:
        """Scans with nodules in which one was found / scans with nodules."""
        positives = self.true_positive + self.false_negative
        return self.true_positive / positives if positives else float("nan")

    @property
    def specificity(self) -> float:
        """Scans without nodules with nothing reported / scans without nodules."""
        negatives = self.true_negative + self.false_positive
        return self.true_negative / negatives if negatives else float("nan")

    @property
    def nodule_sensitivity(self) -> float:
        """Nodules hit / nodules."""
        return self.nodules_hit / self.nodules if self.nodules else float("nan")

    @property
    def fp_per_scan(self) -> float:
        """Reported candidates hitting no nodule, per scan."""
        return self.false_candidates / self.scans if self.scans else float("nan")


def _counts_of(scored: Sequence[_Scored], threshold: float) -> ScanCounts:
    tp = fn = tn = fp = hit = nodules = false_candidates = 0
    for scan in scored:
        found = bool((scan.nodule_scores >= threshold).any())
        reported_false = int((scan.fp_scores >= threshold).sum())
        false_candidates += reported_false
        hit += int((scan.nodule_scores >= threshold).sum())
        nodules += len(scan.nodule_scores)
        if scan.positive:
            tp, fn = tp + found, fn + (not found)
        else:
            tn, fp = tn + (reported_false == 0), fp + (reported_false > 0)
    return ScanCounts(tp, fn, tn, fp, hit, nodules, false_candidates, len(scored))


def scan_counts(scans: Sequence[ScanRecord], threshold: float) -> ScanCounts:
    """Per-scan and nodule-level outcomes when candidates with confidence >= ``threshold`` are reported."""
    return _counts_of([_score(scan) for scan in scans], threshold)


def choose_threshold(scans: Sequence[ScanRecord]) -> float:
    """The operating threshold maximising per-scan sensitivity + specificity.

    Every candidate confidence is tried; when several reach the best value, the median of them is
    taken (away from the edge of the plateau). Call it on the validation split only.
    """
    scored = [_score(scan) for scan in scans]
    values = sorted({0.0} | {float(c.confidence) for scan in scans for c in scan.candidates}, reverse=True)
    totals = []
    for threshold in values:
        counts = _counts_of(scored, threshold)
        sensitivity = 0.0 if math.isnan(counts.sensitivity) else counts.sensitivity
        specificity = 0.0 if math.isnan(counts.specificity) else counts.specificity
        totals.append(sensitivity + specificity)
    best = max(totals)
    winners = [threshold for threshold, total in zip(values, totals, strict=True) if total >= best - 1e-12]
    return float(np.median(winners))


# -- bootstrap ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    """A point estimate and its percentile bootstrap interval."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        """``{"value", "low", "high"}``."""
        return {"value": self.value, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class Summary:
    """Every headline figure of one detector on one set of scans, with 95 % bootstrap intervals."""

    threshold: float
    sensitivity: Interval
    specificity: Interval
    cpm: Interval
    counts: ScanCounts
    froc: Froc
    sensitivity_at: dict[float, float] = field(default_factory=dict)


def summarise(scans: Sequence[ScanRecord], threshold: float, *, resamples: int = 1000, seed: int = 0) -> Summary:
    """Per-scan sensitivity and specificity at ``threshold`` and the CPM, each with a bootstrap 95 % CI."""
    scored = [_score(scan) for scan in scans]
    counts = _counts_of(scored, threshold)
    curve = _froc_of(scored)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {"sensitivity": [], "specificity": [], "cpm": []}
    for _ in range(resamples if scored else 0):
        drawn = [scored[i] for i in rng.integers(0, len(scored), len(scored))]
        resampled = _counts_of(drawn, threshold)
        samples["sensitivity"].append(resampled.sensitivity)
        samples["specificity"].append(resampled.specificity)
        samples["cpm"].append(_froc_of(drawn).cpm)

    def interval(name: str, value: float) -> Interval:
        finite = np.asarray([v for v in samples[name] if not math.isnan(v)])
        if len(finite) == 0:
            return Interval(value, float("nan"), float("nan"))
        return Interval(value, float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5)))

    return Summary(threshold, interval("sensitivity", counts.sensitivity),
                   interval("specificity", counts.specificity), interval("cpm", curve.cpm), counts, curve,
                   dict(curve.sensitivity_at))


def type_accuracy(scans: Sequence[ScanRecord], threshold: float) -> tuple[float, int]:
    """Share of hit nodules whose reported type equals the true one (best-scoring hit), and how many."""
    right = total = 0
    for scan in scans:
        best: dict[int, Candidate] = {}
        for candidate, hit in zip(scan.candidates, match(scan), strict=True):
            reported = hit is not None and candidate.confidence >= threshold
            if reported and (hit not in best or candidate.confidence > best[hit].confidence):  # type: ignore[index]
                best[hit] = candidate  # type: ignore[index]
        for hit, candidate in best.items():
            total += 1
            right += candidate.nodule_type == scan.truths[hit].nodule_type
    return (right / total if total else float("nan")), total
