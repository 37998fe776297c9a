"""Fusion of findings with clinical data into risk: Brock (PanCan) malignancy, Lung-RADS v2022,
growth and volume doubling time against a prior study, and the matching of nodules between studies.

Pure functions over frozen dataclasses: no HTTP, no database, no torch. Sizes are in mm, volumes in
mm³, intervals in days, centres in patient coordinates (DICOM LPS, mm).

::

    brock = brock_probability(BrockInputs(age_years=65, sex=Sex.FEMALE, family_history_lung_cancer=False,
                                          emphysema=True, nodule_diameter_mm=12.0,
                                          nodule_type=NoduleType.PART_SOLID, upper_lobe=True,
                                          nodule_count=1, spiculation=True))
    study = lung_rads_study([LungRadsNodule(NoduleType.SOLID, mean_diameter_mm=8.4)], baseline=True)
    comparison = match_to_prior(current_nodules, prior_nodules, interval_days=365)

Sources
-------
- McWilliams A, Tammemagi MC, Mayo JR, et al. Probability of cancer in pulmonary nodules detected on
  first screening CT. N Engl J Med 2013;369(10):910-919. doi:10.1056/NEJMoa1214726 (the Brock / PanCan
  model).
- ACR Lung-RADS v2022 (American College of Radiology, November 2022), as summarised in Christensen J,
  Prosper AE, Wu CC, et al. ACR Lung-RADS v2022: Assessment Categories and Management
  Recommendations. CHEST 2024;165(3):738-753.
- Yip R, Henschke CI, Xu DM, et al. Size and Growth Assessment of Pulmonary Nodules: Consequences of
  the Rounding. J Thorac Imaging 2017;32(3):163-168 (PMID 28007625): volume doubling times of a 1.5 mm
  diameter increase, used by the tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

import numpy as np
from scipy.optimize import linear_sum_assignment

from services.nodule.schemas import NoduleType


class RiskInputError(ValueError):
    """Inputs a risk formula cannot take (a non-positive size, volume or interval)."""


# --------------------------------------------------------------------------------------------------
# Brock (PanCan) malignancy probability
# --------------------------------------------------------------------------------------------------

class Sex(StrEnum):
    """Patient sex as the Brock model codes it (female is the indicator)."""

    MALE = "male"
    FEMALE = "female"


@dataclass(frozen=True)
class BrockCoefficients:
    """One logistic model of McWilliams et al. 2013: log-odds weights of the centred predictors.

    Attributes
    ----------
    name : str
        The paper's model label ("2b": full model with spiculation; "2a": full model without).
    intercept : float
        Log-odds of the reference nodule: age 62, male, no family history, no emphysema, 4 mm,
        solid, not upper lobe, 4 nodules per scan, not spiculated.
    age_per_year, female, family_history, emphysema : float
        Patient weights; age enters as ``age - 62``.
    size_transformed : float
        Weight of ``(diameter_mm / 10) ** -0.5 - 1.58113883`` (1.58113883 = (4 / 10) ** -0.5).
    part_solid, non_solid : float
        Nodule type weights, solid being the reference.
    upper_lobe, nodule_count, spiculation : float
        Nodule weights; the count enters as ``count - 4``.
    """

    name: str
    intercept: float
    age_per_year: float
    female: float
    family_history: float
    emphysema: float
    size_transformed: float
    part_solid: float
    non_solid: float
    upper_lobe: float
    nodule_count: float
    spiculation: float


AGE_CENTRE_YEARS = 62.0
NODULE_COUNT_CENTRE = 4.0
SIZE_CENTRE = 1.58113883  # (4 mm / 10) ** -0.5: the size term is zero at 4 mm

# Full model with spiculation (2b). Same weights in: Eur Radiol 2019;29(10):5367-5377 Table 2
# (PMC6717521), whose uncentred intercept 0.2761 = -6.7892 + 5.3854 x 1.58113883 - 0.0287 x 62
# + 0.0824 x 4 checks the centring constants; the UpToDate "Brock University cancer prediction
# equation" calculator; several independent open-source implementations found by search.
BROCK_MODEL_2B = BrockCoefficients(
    name="2b", intercept=-6.7892, age_per_year=0.0287, female=0.6011, family_history=0.2961,
    emphysema=0.2953, size_transformed=-5.3854, part_solid=0.3770, non_solid=-0.1276,
    upper_lobe=0.6581, nodule_count=-0.0824, spiculation=0.7729,
)

# Full model without spiculation (2a), used when spiculation is unknown. SINGLE SOURCE, not
# cross-checked against the paper's supplementary appendix: medicalalgorithms.com, "McWilliams et al
# ... full model ... nonspiculated mass" (https://www.medicalalgorithms.com/pulmonary-nodule-cancer).
# That page also says 4 mm is subtracted from the size before the transform; it is not (the
# constant 1.58113883 already centres the size at 4 mm, and subtracting would divide by zero at 4 mm).
BROCK_MODEL_2A = BrockCoefficients(
    name="2a", intercept=-6.8071, age_per_year=0.0321, female=0.5635, family_history=0.3013,
    emphysema=0.3462, size_transformed=-5.6693, part_solid=0.3395, non_solid=-0.3055,
    upper_lobe=0.7116, nodule_count=-0.0803, spiculation=0.0,
)


@dataclass(frozen=True)
class BrockInputs:
    """What the Brock model needs about one nodule and its patient.

    Attributes
    ----------
    age_years : float
        Age at the scan (DICOM PatientAge or birth date).
    sex : Sex
    family_history_lung_cancer, emphysema : bool
        Clinical data posted over the API; emphysema may also be read on the CT.
    nodule_diameter_mm : float
        Nodule size, mm: the mean of the long- and short-axis diameters (the Lung-RADS measure).
        The paper sizes a nodule by one diameter; which one (longest or mean) could not be
        confirmed from the sources reachable here, see the module's report.
    nodule_type : NoduleType
        Solid, part-solid, or ground-glass (the paper's "nonsolid").
    upper_lobe : bool
        Nodule in an upper lobe (the lingula counts as left upper lobe).
    nodule_count : int
        Nodules reported on the scan, this one included (>= 1).
    spiculation : bool or None
        None when unknown: the model without spiculation (2a) is used instead of 2b.
    """

    age_years: float
    sex: Sex
    family_history_lung_cancer: bool
    emphysema: bool
    nodule_diameter_mm: float
    nodule_type: NoduleType
    upper_lobe: bool
    nodule_count: int
    spiculation: bool | None = None


@dataclass(frozen=True)
class BrockResult:
    """Malignancy probability in [0, 1], its log-odds and the model label used ("2a" or "2b")."""

    probability: float
    log_odds: float
    model: str


def brock_size_term(diameter_mm: float) -> float:
    """The model's size predictor ``(d / 10) ** -0.5 - 1.58113883``: zero at 4 mm, falling with size."""
    if not diameter_mm > 0:
        raise RiskInputError(f"nodule diameter must be > 0 mm, got {diameter_mm}")
    return (diameter_mm / 10.0) ** -0.5 - SIZE_CENTRE


def brock_log_odds(inputs: BrockInputs, coefficients: BrockCoefficients) -> float:
    """Log-odds of cancer for ``inputs`` under ``coefficients`` (spiculation None counts as absent)."""
    if inputs.nodule_count < 1:
        raise RiskInputError(f"nodule count must be >= 1, got {inputs.nodule_count}")
    c = coefficients
    type_weight = {NoduleType.SOLID: 0.0, NoduleType.PART_SOLID: c.part_solid,
                   NoduleType.GROUND_GLASS: c.non_solid}[inputs.nodule_type]
    return (c.intercept
            + c.age_per_year * (inputs.age_years - AGE_CENTRE_YEARS)
            + c.female * (inputs.sex is Sex.FEMALE)
            + c.family_history * inputs.family_history_lung_cancer
            + c.emphysema * inputs.emphysema
            + c.size_transformed * brock_size_term(inputs.nodule_diameter_mm)
            + type_weight
            + c.upper_lobe * inputs.upper_lobe
            + c.nodule_count * (inputs.nodule_count - NODULE_COUNT_CENTRE)
            + c.spiculation * bool(inputs.spiculation))


def brock_probability(inputs: BrockInputs) -> BrockResult:
    """Probability that the nodule is (or becomes) lung cancer, by McWilliams et al. 2013.

    Model 2b (full, with spiculation) when spiculation is known, model 2a (full, without
    spiculation) when it is None. The model was fitted on nodules at a first screening CT
    (PanCan, ages 50-75); outside that population it is an estimate, not a calibrated risk.

    Parameters
    ----------
    inputs : BrockInputs

    Returns
    -------
    BrockResult
        ``probability = 1 / (1 + exp(-log_odds))``.
    """
    coefficients = BROCK_MODEL_2A if inputs.spiculation is None else BROCK_MODEL_2B
    log_odds = brock_log_odds(inputs, coefficients)
    return BrockResult(probability=_logistic(log_odds), log_odds=log_odds, model=coefficients.name)


def _logistic(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


# --------------------------------------------------------------------------------------------------
# Lung-RADS v2022
# --------------------------------------------------------------------------------------------------

class LungRadsCategory(StrEnum):
    """Lung-RADS v2022 assessment categories (the "S" modifier is not produced here)."""

    INCOMPLETE = "0"
    NEGATIVE = "1"
    BENIGN = "2"
    PROBABLY_BENIGN = "3"
    SUSPICIOUS_4A = "4A"
    VERY_SUSPICIOUS_4B = "4B"
    VERY_SUSPICIOUS_4X = "4X"


_RANK = {LungRadsCategory.INCOMPLETE: 0, LungRadsCategory.NEGATIVE: 1, LungRadsCategory.BENIGN: 2,
         LungRadsCategory.PROBABLY_BENIGN: 3, LungRadsCategory.SUSPICIOUS_4A: 4,
         LungRadsCategory.VERY_SUSPICIOUS_4B: 5, LungRadsCategory.VERY_SUSPICIOUS_4X: 6}

LUNG_RADS_MANAGEMENT = {
    LungRadsCategory.INCOMPLETE: "Additional lung cancer screening CT images and/or comparison to prior chest CT "
                                 "examinations is needed; 1-3 month LDCT for findings suggesting an infectious or "
                                 "inflammatory process.",
    LungRadsCategory.NEGATIVE: "12-month screening LDCT.",
    LungRadsCategory.BENIGN: "12-month screening LDCT.",
    LungRadsCategory.PROBABLY_BENIGN: "6-month LDCT.",
    LungRadsCategory.SUSPICIOUS_4A: "3-month LDCT; PET/CT may be considered if there is a solid nodule or solid "
                                    "component >= 8 mm.",
    LungRadsCategory.VERY_SUSPICIOUS_4B: "Referral for further clinical evaluation. Diagnostic chest CT with or "
                                         "without contrast; PET/CT may be considered if there is a solid nodule or "
                                         "solid component >= 8 mm; tissue sampling; and/or referral for further "
                                         "clinical evaluation, depending on the probability of malignancy and "
                                         "comorbidities.",
}
LUNG_RADS_MANAGEMENT[LungRadsCategory.VERY_SUSPICIOUS_4X] = LUNG_RADS_MANAGEMENT[LungRadsCategory.VERY_SUSPICIOUS_4B]

GROWTH_THRESHOLD_MM = 1.5  # growth: mean diameter up by more than this within 12 months
GROWTH_WINDOW_DAYS = 365.0
_EPS = 1e-9  # sizes are compared at 0.1 mm; this keeps 1.5 mm of float noise from counting as > 1.5


@dataclass(frozen=True)
class PriorMeasurement:
    """The same nodule on the prior screening CT.

    Attributes
    ----------
    mean_diameter_mm : float
        Its mean diameter then.
    solid_component_mm : float or None
        Its solid component then (part-solid nodules; None or 0 when it had none).
    interval_days : float or None
        Days between the prior and the current scan; None when unknown (taken as within 12 months).
    category : LungRadsCategory or None
        Its category then; None to derive it from the prior measurements by the baseline rules.
    """

    mean_diameter_mm: float
    solid_component_mm: float | None = None
    interval_days: float | None = None
    category: LungRadsCategory | None = None


@dataclass(frozen=True)
class LungRadsNodule:
    """One nodule as Lung-RADS reads it.

    Attributes
    ----------
    nodule_type : NoduleType
    mean_diameter_mm : float
        Mean of long- and short-axis diameters, to one decimal (see :func:`lung_rads_mean_diameter`).
    solid_component_mm : float or None
        Mean diameter of the solid component; required for a part-solid nodule.
    volume_mm3 : float or None
        Recorded for the report; categories here are by mean diameter.
    benign_calcification_or_fat : bool
        Complete, central, popcorn or concentric-ring calcification, or fat: category 1.
    juxtapleural_benign_features : bool
        Solid, attached to a pleural surface (costal, mediastinal, diaphragmatic or fissural), smooth
        margins, oval / lentiform / triangular shape: category 2 below 10 mm at baseline or when new.
    suspicious_features : bool
        Features that raise suspicion (e.g. spiculation, lymphadenopathy): category 3 or 4 becomes 4X.
    prior : PriorMeasurement or None
        On a follow-up scan, the matched nodule on the prior; None there means the nodule is new.
    """

    nodule_type: NoduleType
    mean_diameter_mm: float
    solid_component_mm: float | None = None
    volume_mm3: float | None = None
    benign_calcification_or_fat: bool = False
    juxtapleural_benign_features: bool = False
    suspicious_features: bool = False
    prior: PriorMeasurement | None = None


@dataclass(frozen=True)
class LungRadsAssessment:
    """A category, the rule that gave it, and the category's management recommendation."""

    category: LungRadsCategory
    reason: str
    management: str


@dataclass(frozen=True)
class StudyLungRads:
    """The study's category (its most suspicious nodule's) with each nodule's assessment, in input order."""

    category: LungRadsCategory
    management: str
    nodules: tuple[LungRadsAssessment, ...]


def lung_rads_mean_diameter(long_axis_mm: float, short_axis_mm: float) -> float:
    """Mean of long and short axis, rounded half up to one decimal as Lung-RADS reports it."""
    return _round_tenth((long_axis_mm + short_axis_mm) / 2.0)


def _round_tenth(value_mm: float) -> float:
    return math.floor(value_mm * 10.0 + 0.5 + _EPS) / 10.0


_C = LungRadsCategory
_Ladder = tuple[tuple[float, LungRadsCategory], ...]  # (exclusive upper bound in mm, category), rising

# The size rows of the Lung-RADS v2022 table. A part-solid nodule >= 6 mm total is placed by its
# solid component; below 6 mm total it is category 2 at baseline and 3 when new.
SOLID_BASELINE: _Ladder = ((6.0, _C.BENIGN), (8.0, _C.PROBABLY_BENIGN), (15.0, _C.SUSPICIOUS_4A),
                           (math.inf, _C.VERY_SUSPICIOUS_4B))
SOLID_NEW: _Ladder = ((4.0, _C.BENIGN), (6.0, _C.PROBABLY_BENIGN), (8.0, _C.SUSPICIOUS_4A),
                      (math.inf, _C.VERY_SUSPICIOUS_4B))
SOLID_GROWING: _Ladder = ((8.0, _C.SUSPICIOUS_4A), (math.inf, _C.VERY_SUSPICIOUS_4B))
SOLID_COMPONENT_BASELINE: _Ladder = ((6.0, _C.PROBABLY_BENIGN), (8.0, _C.SUSPICIOUS_4A),
                                     (math.inf, _C.VERY_SUSPICIOUS_4B))
SOLID_COMPONENT_NEW_OR_GROWING: _Ladder = ((4.0, _C.SUSPICIOUS_4A), (math.inf, _C.VERY_SUSPICIOUS_4B))
GROUND_GLASS: _Ladder = ((30.0, _C.BENIGN), (math.inf, _C.PROBABLY_BENIGN))
PART_SOLID_MIN_TOTAL_MM = 6.0


def _on_ladder(value_mm: float, ladder: _Ladder, what: str) -> tuple[LungRadsCategory, str]:
    lower = 0.0
    for upper, category in ladder:
        if value_mm < upper:
            if lower == 0:
                return category, f"{what} < {upper:g} mm"
            if math.isinf(upper):
                return category, f"{what} >= {lower:g} mm"
            return category, f"{what} >= {lower:g} to < {upper:g} mm"
        lower = upper
    raise AssertionError("a ladder ends at infinity")


def _size_category(nodule: LungRadsNodule, d: float, solid: float) -> tuple[LungRadsCategory, str]:
    """The baseline rules: a nodule's category from its size alone."""
    if nodule.nodule_type is NoduleType.SOLID:
        return _on_ladder(d, SOLID_BASELINE, "solid")
    if nodule.nodule_type is NoduleType.PART_SOLID:
        if d < PART_SOLID_MIN_TOTAL_MM:
            return _C.BENIGN, "part-solid < 6 mm total"
        return _on_ladder(solid, SOLID_COMPONENT_BASELINE, "part-solid, solid component")
    return _on_ladder(d, GROUND_GLASS, "ground-glass")


def _new_category(nodule: LungRadsNodule, d: float, solid: float) -> tuple[LungRadsCategory, str]:
    if nodule.nodule_type is NoduleType.SOLID:
        return _on_ladder(d, SOLID_NEW, "new solid")
    if nodule.nodule_type is NoduleType.PART_SOLID:
        if d < PART_SOLID_MIN_TOTAL_MM:
            return _C.PROBABLY_BENIGN, "new part-solid < 6 mm total"
        return _on_ladder(solid, SOLID_COMPONENT_NEW_OR_GROWING, "part-solid, new solid component")
    return _on_ladder(d, GROUND_GLASS, "new ground-glass")


def _is_growth(now_mm: float, then_mm: float, interval_days: float | None) -> bool:
    within_window = interval_days is None or interval_days <= GROWTH_WINDOW_DAYS
    return within_window and now_mm - then_mm > GROWTH_THRESHOLD_MM + _EPS


def _stepped_down(prior: LungRadsCategory) -> tuple[LungRadsCategory, str]:
    """v2022 stepped management for a nodule that is stable or smaller: 4A -> 3, 3 -> 2, else kept."""
    if prior is _C.SUSPICIOUS_4A:
        return _C.PROBABLY_BENIGN, "category 4A nodule stable or smaller at follow-up"
    if prior is _C.PROBABLY_BENIGN:
        return _C.BENIGN, "category 3 nodule stable or smaller at follow-up"
    return prior, f"category {prior.value} nodule without growth at follow-up"


def _prior_as_baseline(nodule: LungRadsNodule, prior: PriorMeasurement) -> LungRadsCategory:
    """The prior measurements read by the baseline rules (same type and benign features as now)."""
    as_then = replace(nodule, mean_diameter_mm=prior.mean_diameter_mm,
                      solid_component_mm=prior.solid_component_mm, prior=None)
    return _by_rules(as_then, baseline=True)[0]


def _follow_up_category(nodule: LungRadsNodule, prior: PriorMeasurement, d: float,
                        solid: float) -> tuple[LungRadsCategory, str]:
    """A nodule seen on the prior scan: growth rules, a crossed size threshold, or stepped management."""
    then_d = _round_tenth(prior.mean_diameter_mm)
    then_solid = _round_tenth(prior.solid_component_mm or 0.0)
    if nodule.nodule_type is NoduleType.SOLID and _is_growth(d, then_d, prior.interval_days):
        return _on_ladder(d, SOLID_GROWING, "growing solid")
    if nodule.nodule_type is NoduleType.PART_SOLID and _is_growth(solid, then_solid, prior.interval_days):
        return _on_ladder(solid, SOLID_COMPONENT_NEW_OR_GROWING, "part-solid, growing solid component")
    now_category, now_reason = _by_rules(replace(nodule, prior=None), baseline=True)
    then_category = _prior_as_baseline(nodule, prior)
    if _RANK[now_category] > _RANK[then_category]:
        return now_category, now_reason + " (crossed a size threshold since the prior)"
    return _stepped_down(prior.category if prior.category is not None else then_category)


def _check_sizes(nodule: LungRadsNodule) -> None:
    if not nodule.mean_diameter_mm > 0:
        raise RiskInputError(f"mean diameter must be > 0 mm, got {nodule.mean_diameter_mm}")
    if nodule.nodule_type is NoduleType.PART_SOLID and nodule.solid_component_mm is None:
        # Reading a missing component as 0 mm would call a 4B nodule 3: refuse rather than guess.
        raise RiskInputError("a part-solid nodule needs its solid component's mean diameter")
    if (nodule.solid_component_mm or 0.0) > nodule.mean_diameter_mm:
        raise RiskInputError("the solid component cannot be larger than the nodule")


def _by_rules(nodule: LungRadsNodule, *, baseline: bool) -> tuple[LungRadsCategory, str]:
    _check_sizes(nodule)
    d = _round_tenth(nodule.mean_diameter_mm)
    solid = _round_tenth(nodule.solid_component_mm or 0.0)
    if nodule.benign_calcification_or_fat:
        return _C.NEGATIVE, "benign calcification or fat"
    new = not baseline and nodule.prior is None
    if (nodule.juxtapleural_benign_features and nodule.nodule_type is NoduleType.SOLID and d < 10
            and (baseline or new)):
        return _C.BENIGN, "juxtapleural solid < 10 mm with benign features"
    if baseline:
        return _size_category(nodule, d, solid)
    if nodule.prior is None:
        return _new_category(nodule, d, solid)
    return _follow_up_category(nodule, nodule.prior, d, solid)


def lung_rads_nodule(nodule: LungRadsNodule, *, baseline: bool) -> LungRadsAssessment:
    """Lung-RADS v2022 category of one nodule.

    Size thresholds are on the mean diameter to one decimal; a part-solid nodule's solid component
    decides its category once the nodule is >= 6 mm. On a follow-up scan a nodule without a prior
    is new; growth is a mean diameter (of the solid component, for part-solid nodules) larger by
    more than 1.5 mm within 12 months; a nodule that crosses a size threshold without growing is
    reclassified by size; a stable nodule steps down (4A -> 3 -> 2, v2022 stepped management).
    A category 3 or 4 nodule with suspicious features becomes 4X.

    Parameters
    ----------
    nodule : LungRadsNodule
    baseline : bool
        True for a baseline (first) screening CT, False for a follow-up.

    Returns
    -------
    LungRadsAssessment

    Raises
    ------
    RiskInputError
        A non-positive diameter, or a part-solid nodule without (or with too large) a solid component.
    """
    category, reason = _by_rules(nodule, baseline=baseline)
    if nodule.suspicious_features and _RANK[category] >= _RANK[_C.PROBABLY_BENIGN]:
        category, reason = _C.VERY_SUSPICIOUS_4X, f"{reason}, with additional suspicious features"
    return LungRadsAssessment(category, reason, LUNG_RADS_MANAGEMENT[category])


def lung_rads_study(nodules: Sequence[LungRadsNodule], *, baseline: bool,
                    incomplete: bool = False) -> StudyLungRads:
    """Lung-RADS v2022 category of a screening study: that of its most suspicious nodule.

    Parameters
    ----------
    nodules : sequence of LungRadsNodule
        Every reported nodule; none means category 1.
    baseline : bool
        True for a baseline screening CT, False for a follow-up.
    incomplete : bool
        Part or all of the lungs cannot be evaluated, or a prior is being located: category 0.

    Returns
    -------
    StudyLungRads
    """
    assessments = tuple(lung_rads_nodule(n, baseline=baseline) for n in nodules)
    if incomplete:
        category = _C.INCOMPLETE
    elif not assessments:
        category = _C.NEGATIVE
    else:
        category = max((a.category for a in assessments), key=_RANK.__getitem__)
    return StudyLungRads(category, LUNG_RADS_MANAGEMENT[category], assessments)


# --------------------------------------------------------------------------------------------------
# Growth and volume doubling time
# --------------------------------------------------------------------------------------------------

class GrowthTrend(StrEnum):
    """Direction of a volume change between two scans."""

    GROWING = "growing"
    STABLE = "stable"
    SHRINKING = "shrinking"


@dataclass(frozen=True)
class VolumeDoublingTime:
    """VDT in days while growing; None (not a number) when stable or shrinking."""

    trend: GrowthTrend
    days: float | None


def sphere_volume_mm3(diameter_mm: float) -> float:
    """Volume of a sphere of that diameter: ``pi / 6 * d ** 3``."""
    return math.pi / 6.0 * diameter_mm ** 3


def volume_doubling_time(prior_volume_mm3: float, current_volume_mm3: float, interval_days: float, *,
                         stable_fraction: float = 0.0) -> VolumeDoublingTime:
    """Volume doubling time ``VDT = t ln 2 / ln(V2 / V1)`` (Schwartz), t in days.

    Parameters
    ----------
    prior_volume_mm3, current_volume_mm3 : float
        V1 and V2, both > 0.
    interval_days : float
        t, > 0.
    stable_fraction : float
        Relative volume change at or below which the nodule counts as stable (0: only no change);
        e.g. 0.25 for the 25 % volume change often taken as the limit of measurement repeatability.

    Returns
    -------
    VolumeDoublingTime
        Growing: days > 0. Stable or shrinking: the trend and no number (an infinite or negative
        VDT means nothing to a reader).
    """
    if not (prior_volume_mm3 > 0 and current_volume_mm3 > 0):
        raise RiskInputError(f"volumes must be > 0 mm³, got {prior_volume_mm3} and {current_volume_mm3}")
    if not interval_days > 0:
        raise RiskInputError(f"interval must be > 0 days, got {interval_days}")
    ratio = current_volume_mm3 / prior_volume_mm3
    if abs(ratio - 1.0) <= stable_fraction or ratio == 1.0:
        return VolumeDoublingTime(GrowthTrend.STABLE, None)
    if ratio < 1.0:
        return VolumeDoublingTime(GrowthTrend.SHRINKING, None)
    return VolumeDoublingTime(GrowthTrend.GROWING, interval_days * math.log(2.0) / math.log(ratio))


def volume_doubling_time_from_diameters(prior_diameter_mm: float, current_diameter_mm: float,
                                        interval_days: float, *,
                                        stable_fraction: float = 0.0) -> VolumeDoublingTime:
    """VDT with each volume taken as the sphere of the mean diameter (when no volume was measured)."""
    return volume_doubling_time(sphere_volume_mm3(prior_diameter_mm), sphere_volume_mm3(current_diameter_mm),
                                interval_days, stable_fraction=stable_fraction)


# --------------------------------------------------------------------------------------------------
# Matching nodules against a prior study
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrackedNodule:
    """A nodule of one study, as matching needs it.

    Attributes
    ----------
    nodule_id : str
        Caller's identifier (unique within its study).
    centre_lps_mm : tuple of 3 float
        Centre in patient coordinates (DICOM LPS), mm.
    mean_diameter_mm : float
    volume_mm3 : float or None
        Measured volume. Growth uses measured volumes when both nodules of a pair have one, else the
        spheres of both mean diameters.
    """

    nodule_id: str
    centre_lps_mm: tuple[float, float, float]
    mean_diameter_mm: float
    volume_mm3: float | None = None


@dataclass(frozen=True)
class MatchedNodule:
    """A current nodule matched to its prior, with growth between them.

    Attributes
    ----------
    current, prior : TrackedNodule
    distance_mm : float
        Centre distance after the study offset is applied.
    diameter_change_mm : float
        Current minus prior mean diameter.
    volume_change_percent : float
        ``(V2 / V1 - 1) * 100``.
    doubling_time : VolumeDoublingTime
    """

    current: TrackedNodule
    prior: TrackedNodule
    distance_mm: float
    diameter_change_mm: float
    volume_change_percent: float
    doubling_time: VolumeDoublingTime


@dataclass(frozen=True)
class PriorComparison:
    """Outcome of matching a study against a prior one.

    Attributes
    ----------
    offset_lps_mm : tuple of 3 float
        Added to prior centres to bring them into the current study's frame.
    matched : tuple of MatchedNodule
        In the order of the current nodules.
    new : tuple of TrackedNodule
        Current nodules without a prior.
    resolved : tuple of TrackedNodule
        Prior nodules no longer seen.
    """

    offset_lps_mm: tuple[float, float, float]
    matched: tuple[MatchedNodule, ...]
    new: tuple[TrackedNodule, ...]
    resolved: tuple[TrackedNodule, ...]


MIN_GATE_MM = 10.0


def _centres(nodules: Sequence[TrackedNodule]) -> np.ndarray:
    return np.array([n.centre_lps_mm for n in nodules], dtype=float).reshape(-1, 3)


def _pairwise_mm(current: np.ndarray, prior: np.ndarray) -> np.ndarray:
    return np.linalg.norm(current[:, None, :] - prior[None, :, :], axis=-1)


def _mutual_nearest(current_mm: np.ndarray, prior_mm: np.ndarray) -> list[tuple[int, int]]:
    distances = _pairwise_mm(current_mm, prior_mm)
    nearest_prior, nearest_current = distances.argmin(axis=1), distances.argmin(axis=0)
    return [(i, int(j)) for i, j in enumerate(nearest_prior) if nearest_current[j] == i]


def _best_supported_shift(current_mm: np.ndarray, prior_mm: np.ndarray, tolerance_mm: float) -> np.ndarray | None:
    """The pairwise displacement that brings the most current nodules within ``tolerance_mm`` of a
    prior one (ties: the smaller total residual); None when no shift aligns two nodules or more."""
    best: tuple[int, float] = (1, 0.0)
    best_shift: np.ndarray | None = None
    for shift in (current_mm[:, None, :] - prior_mm[None, :, :]).reshape(-1, 3):
        nearest = _pairwise_mm(current_mm, prior_mm + shift).min(axis=1)
        aligned = nearest <= tolerance_mm
        score = (int(aligned.sum()), -float(nearest[aligned].sum()))
        if score > best:
            best, best_shift = score, shift
    return best_shift


def estimate_study_offset(current_centres_mm: np.ndarray, prior_centres_mm: np.ndarray, *,
                          tolerance_mm: float = MIN_GATE_MM) -> np.ndarray:
    """Rigid shift between two studies' patient frames: the median displacement of mutual nearest neighbours.

    Two studies' LPS coordinates differ by the patient's position on the table, often by more
    than the distance between nodules, so nearest neighbours in raw coordinates can pair the wrong
    nodules. A coarse shift is therefore chosen first: of all current-minus-prior displacements, the
    one that aligns the most nodules within ``tolerance_mm``. Mutual nearest neighbours under that
    shift are then paired and the per-axis median of their displacements is the offset; the median
    ignores the few pairs (a new nodule beside a resolved one) that are not the same nodule.

    Parameters
    ----------
    current_centres_mm, prior_centres_mm : ndarray of shape (N, 3) and (M, 3)
    tolerance_mm : float
        Distance within which a shifted prior nodule supports a shift.

    Returns
    -------
    ndarray of shape (3,)
        ``current - prior``; zeros when no shift aligns at least two nodules (one pair cannot tell a
        shift from a new nodule beside a resolved one). Cost O((N M)^2): fine for tens of nodules.
    """
    if len(current_centres_mm) == 0 or len(prior_centres_mm) == 0:
        return np.zeros(3)
    coarse = _best_supported_shift(current_centres_mm, prior_centres_mm, tolerance_mm)
    if coarse is None:
        return np.zeros(3)
    mutual = _mutual_nearest(current_centres_mm, prior_centres_mm + coarse)
    displacements = np.array([current_centres_mm[i] - prior_centres_mm[j] for i, j in mutual])
    return np.asarray(np.median(displacements, axis=0), dtype=float)


def _gate_mm(current: TrackedNodule, prior: TrackedNodule, min_gate_mm: float) -> float:
    radius = max(current.mean_diameter_mm, prior.mean_diameter_mm) / 2.0
    return max(min_gate_mm, radius)


def _matched(current: TrackedNodule, prior: TrackedNodule, distance_mm: float,
             interval_days: float) -> MatchedNodule:
    # A measured volume against a sphere's would fold the shape difference into the growth.
    if prior.volume_mm3 is not None and current.volume_mm3 is not None:
        v1, v2 = prior.volume_mm3, current.volume_mm3
    else:
        v1, v2 = sphere_volume_mm3(prior.mean_diameter_mm), sphere_volume_mm3(current.mean_diameter_mm)
    return MatchedNodule(current=current, prior=prior, distance_mm=distance_mm,
                         diameter_change_mm=current.mean_diameter_mm - prior.mean_diameter_mm,
                         volume_change_percent=(v2 / v1 - 1.0) * 100.0,
                         doubling_time=volume_doubling_time(v1, v2, interval_days))


def match_to_prior(current: Sequence[TrackedNodule], prior: Sequence[TrackedNodule], interval_days: float,
                   *, offset_lps_mm: tuple[float, float, float] | None = None,
                   min_gate_mm: float = MIN_GATE_MM) -> PriorComparison:
    """Match a study's nodules to a prior study's, one to one, and measure their growth.

    Prior centres are shifted by the study offset (given, e.g. from image registration, or
    estimated by :func:`estimate_study_offset`), then paired by minimum total centre distance
    (Hungarian assignment, ``scipy.optimize.linear_sum_assignment``); a pair farther apart than
    ``max(min_gate_mm, larger radius)`` is no match.

    Parameters
    ----------
    current, prior : sequence of TrackedNodule
    interval_days : float
        Days between the prior and the current scan (> 0), for the doubling times.
    offset_lps_mm : tuple of 3 float, optional
        Known shift (current minus prior); estimated when None.
    min_gate_mm : float
        Smallest matching distance accepted, mm.

    Returns
    -------
    PriorComparison
        Matched pairs (current order) with diameter change, volume change and VDT; new and resolved nodules.
    """
    current_xyz, prior_xyz = _centres(current), _centres(prior)
    offset = (np.asarray(offset_lps_mm, dtype=float) if offset_lps_mm is not None
              else estimate_study_offset(current_xyz, prior_xyz))
    distances = _pairwise_mm(current_xyz, prior_xyz + offset)
    gates = np.array([[_gate_mm(c, p, min_gate_mm) for p in prior] for c in current]).reshape(distances.shape)
    # Gated-out pairs cost more than any accepted set of pairs, so the assignment never trades a
    # real match for one it must then drop.
    forbidden = 1.0 + float(gates.sum()) if gates.size else 1.0
    costs = np.where(distances <= gates, distances, forbidden)
    rows, cols = linear_sum_assignment(costs)
    pairs = sorted((i, j) for i, j in zip(rows, cols, strict=True) if distances[i, j] <= gates[i, j])
    matched = tuple(_matched(current[i], prior[j], float(distances[i, j]), interval_days) for i, j in pairs)
    matched_current, matched_prior = {i for i, _ in pairs}, {j for _, j in pairs}
    return PriorComparison(
        offset_lps_mm=(float(offset[0]), float(offset[1]), float(offset[2])),
        matched=matched,
        new=tuple(n for i, n in enumerate(current) if i not in matched_current),
        resolved=tuple(n for j, n in enumerate(prior) if j not in matched_prior),
    )
