"""Hand-crafted features of a nodule candidate, and the gradient-boosted model over them that stage 2 blends
with the crop CNN (v10).

The CNN of :mod:`services.nodule.classifier` ranks candidates well, but its confident mistakes (airways seen
end-on, vessel ends, the rim of a large nodule) and its misses in noisy scans are things a few measured
quantities describe directly. :func:`candidate_features` measures, on the same ``32^3`` crop (1 mm voxels,
HU, centred on the candidate):

- mean HU in balls of 1.5 / 2.5 / 3.5 / 5 / 8 / 12 mm, and per shell (1.5-3.5, 3.5-6, 6-10, 10-15 mm) the mean,
  the 90th percentile and the share of voxels above -500 HU (a nodule is dense in the middle and falls off; an
  airway is dark in the middle with a ring; a vessel carries density out to the crop's edge);
- the spread of the lung's own voxels (below -700 HU): the scan's noise, so the model can discount it;
- the share of the crop above -500 HU;
- at Gaussian scales of 1, 2 and 3 mm, the Hessian's sorted eigenvalues (scale-normalised) and the smoothed value
  at the centre: a ball has three negative eigenvalues, a tube two, a wall one;
- the component above -500 HU that holds the centre: its size (log), whether it reaches the crop's edge, and the
  ratios of its second and third principal spreads to the first (round vs elongated).

Everything but the components is linear algebra over the batch of crops (precomputed masks and Gaussian
derivative kernels). A scan's 64 candidates cost ~65 ms on a 2-core Xeon VM (2026-12-05): ~25 ms the 64
connected-component labellings, ~14 ms the shells' percentiles, ~11 ms the lung noise, a few ms the rest.

:class:`FeatureModel` is a LightGBM binary classifier over these features, trained on the crop bank by
:func:`train_feature_model`; its raw score (a logit) is averaged with the CNN's logit in
:class:`~services.nodule.classifier.BlendedCropProbability`. All training data is simulated.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

CROP = 32
CENTRE = CROP // 2
BALL_RADII_MM = (1.5, 2.5, 3.5, 5.0, 8.0, 12.0)
SHELLS_MM = ((1.5, 3.5), (3.5, 6.0), (6.0, 10.0), (10.0, 15.0))
HESSIAN_SCALES_MM = (1.0, 2.0, 3.0)
DENSE_HU = -500.0
LUNG_HU = -700.0
_DERIVATIVES = ((0, 0, 0), (2, 0, 0), (0, 2, 0), (0, 0, 2), (1, 1, 0), (1, 0, 1), (0, 1, 1))

FEATURE_NAMES: tuple[str, ...] = (
    *(f"ball_mean_{r:g}mm" for r in BALL_RADII_MM),
    *(f"shell_{a:g}_{b:g}mm_{stat}" for a, b in SHELLS_MM for stat in ("mean", "p90", "dense_share")),
    "lung_noise_sd", "dense_share",
    *(f"hessian_{s:g}mm_{name}" for s in HESSIAN_SCALES_MM for name in ("eig1", "eig2", "eig3", "smoothed")),
    "component_log_size", "component_touches_edge", "component_spread_2_1", "component_spread_3_1",
)


@lru_cache(maxsize=1)
def _geometry() -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Ball masks normalised to means ``(V, balls)``, derivative kernels ``(V, scales * 7)`` and shell indices."""
    grids = np.meshgrid(*[np.arange(CROP) - CENTRE] * 3, indexing="ij")
    radius = np.sqrt(sum(g.astype(float) ** 2 for g in grids)).reshape(-1)
    balls = np.stack([(radius <= r) / (radius <= r).sum() for r in BALL_RADII_MM], axis=1)
    shells = [np.nonzero((radius > a) & (radius <= b))[0] for a, b in SHELLS_MM]
    delta = np.zeros((CROP,) * 3)
    delta[CENTRE, CENTRE, CENTRE] = 1.0
    kernels = []
    for scale in HESSIAN_SCALES_MM:
        for order in _DERIVATIVES:
            # the filter's value at the centre is a dot product with its impulse response mirrored through the
            # centre (odd orders change sign under the mirror, which the flip carries)
            response = ndimage.gaussian_filter(delta, scale, order=order, mode="constant")
            kernels.append(np.roll(np.flip(response), 1, axis=(0, 1, 2)).reshape(-1))
    return balls, np.stack(kernels, axis=1), shells


def candidate_features(crops_hu: np.ndarray) -> np.ndarray:
    """``(n, len(FEATURE_NAMES))`` float32 features of ``(n, 32, 32, 32)`` HU crops (see the module docstring)."""
    crops = np.asarray(crops_hu, dtype=np.float32)
    if crops.ndim != 4 or crops.shape[1:] != (CROP,) * 3:
        raise ValueError(f"expected (n, {CROP}, {CROP}, {CROP}) crops, got {crops.shape}")
    flat = crops.reshape(len(crops), -1).astype(np.float64)
    balls, kernels, shells = _geometry()
    columns = [flat @ balls]
    for index in shells:
        values = flat[:, index]
        columns += [values.mean(axis=1, keepdims=True), np.percentile(values, 90, axis=1, keepdims=True),
                    (values > DENSE_HU).mean(axis=1, keepdims=True)]
    columns += [_lung_noise(flat)[:, None], (flat > DENSE_HU).mean(axis=1, keepdims=True)]
    responses = (flat @ kernels).reshape(len(crops), len(HESSIAN_SCALES_MM), len(_DERIVATIVES))
    for position, scale in enumerate(HESSIAN_SCALES_MM):
        smoothed, dzz, dyy, dxx, dzy, dzx, dyx = (responses[:, position, k] for k in range(len(_DERIVATIVES)))
        hessian = np.stack([np.stack([dzz, dzy, dzx], -1), np.stack([dzy, dyy, dyx], -1),
                            np.stack([dzx, dyx, dxx], -1)], -2) * scale ** 2
        columns += [np.linalg.eigvalsh(hessian), smoothed[:, None]]
    columns.append(np.array([_component(crop) for crop in crops]).reshape(len(crops), 4))
    return np.concatenate(columns, axis=1).astype(np.float32)


def _lung_noise(flat: np.ndarray) -> np.ndarray:
    lung = flat < LUNG_HU
    count = lung.sum(axis=1)
    mean = np.where(lung, flat, 0.0).sum(axis=1) / np.maximum(count, 1)
    variance = np.where(lung, (flat - mean[:, None]) ** 2, 0.0).sum(axis=1) / np.maximum(count, 1)
    return np.where(count > 50, np.sqrt(variance), 0.0)  # type: ignore[no-any-return]


def _component(crop: np.ndarray) -> tuple[float, float, float, float]:
    """Log size, edge contact and spread ratios of the dense component holding the centre (zeros if none)."""
    labelled, _ = ndimage.label(crop > DENSE_HU)
    label = labelled[CENTRE, CENTRE, CENTRE]
    if not label:
        return 0.0, 0.0, 0.0, 0.0
    voxels = np.argwhere(labelled == label)
    touches = float(voxels.min() == 0 or voxels.max() == CROP - 1)
    if len(voxels) < 4:
        return float(np.log1p(len(voxels))), touches, 1.0, 1.0
    spreads = np.sort(np.linalg.eigvalsh(np.cov(voxels.T)))[::-1] + 1e-6
    return float(np.log1p(len(voxels))), touches, float(spreads[1] / spreads[0]), float(spreads[2] / spreads[0])


class FeatureModel:
    """A LightGBM booster over :data:`FEATURE_NAMES`; :meth:`logits` gives its raw scores."""

    FILE = "feature_model.txt"

    def __init__(self, booster: Any) -> None:
        self.booster = booster

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Raw scores (logits of P(nodule)) of ``(n, F)`` features."""
        if len(features) == 0:
            return np.zeros(0, np.float64)
        return np.asarray(self.booster.predict(np.asarray(features, np.float64), raw_score=True), np.float64)

    def save(self, directory: Path) -> Path:
        """Write the booster as text into ``directory``."""
        path = directory / self.FILE
        self.booster.save_model(str(path))
        return path

    @classmethod
    def load(cls, directory: Path) -> FeatureModel:
        """Read the booster written by :meth:`save`."""
        import lightgbm

        return cls(lightgbm.Booster(model_file=str(directory / cls.FILE)))


def train_feature_model(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> FeatureModel:
    """Fit the booster on a crop bank's features (settings fixed beforehand, not tuned on any evaluation set)."""
    import lightgbm

    classifier = lightgbm.LGBMClassifier(
        n_estimators=400, learning_rate=0.03, num_leaves=15, min_child_samples=20, subsample=0.8, subsample_freq=1,
        colsample_bytree=0.8, random_state=seed, n_jobs=1, deterministic=True, force_row_wise=True, verbose=-1)
    classifier.fit(np.asarray(features, np.float64), np.asarray(labels) > 0.5)
    return FeatureModel(classifier.booster_)
