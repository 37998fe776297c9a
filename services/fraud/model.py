"""Fraud models: the card-sequence transformer, the calibrator, and the serving adapter.

The score is a LightGBM booster over the tabular features (``features.FEATURE_NAMES``),
optionally stacked with one extra input: the logit of a small transformer that reads the card's
recent transactions (``features.sequence_matrix``). A Platt calibrator (strictly monotone, so the
ranking and therefore AP and Card Precision@k are untouched) maps the booster margin to a
probability. :class:`FraudScorer` loads all of it from a sealed artifact directory.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model_runtime.artifacts import ArtifactManifest, load_manifest
from model_runtime.backends import (
    CPU_CANDIDATES,
    Backend,
    BackendChoice,
    OnnxRuntimeBackend,
    TorchBackend,
    compare_backends,
    onnx_session,
    recorded_backend,
)
from services.fraud.features import FEATURE_NAMES, sequence_tensor

SEQUENCE_FEATURE = "CARD_SEQUENCE_LOGIT"
"""Name of the stacked sequence-model input (and of its contribution in ``reasons``)."""
BOOSTER_FILE = "booster.txt"
TREES_FILE = "trees.npz"
SEQUENCE_STATE_FILE = "sequence.pt"
SEQUENCE_ONNX_FILE = "sequence.onnx"
SEQUENCE_INT8_FILE = "sequence_int8.onnx"
CONFIG_FILE = "scorer.json"
SEQUENCE_COMPONENT = "sequence"
"""Name of the card-sequence transformer in the card's measured backend record."""
SEQUENCE_BACKENDS = CPU_CANDIDATES
"""``eager`` (torch), ``onnx`` (ONNX Runtime fp32), ``onnx-int8`` (dynamically quantized ONNX)."""
FALLBACK_SEQUENCE_BACKEND = "onnx"
"""Served when the card predates the measured record: the backend every measurement so far chose."""
SEQUENCE_MAX_ABS_ERROR = 1e-3
"""Largest logit difference from eager torch a sequence backend may have to be chosen."""
SEQUENCE_THREADS = 1
"""Intra-op threads of the served sequence model (one request's model pass runs on one core)."""

RawTransaction = tuple[float, float, str, tuple[tuple[float, float, str], ...]]
"""(amount, tx_time_seconds, terminal_id, card_history) - what ``sequence_matrix`` takes."""


@dataclass(frozen=True)
class SequenceConfig:
    """Shape of the card-sequence transformer."""

    d_model: int = 32
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 64
    dropout: float = 0.1


def platt_probability(margin: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Calibrated probability sigmoid(slope * margin + intercept); (B,) -> (B,) float64."""
    return 1.0 / (1.0 + np.exp(-(slope * np.asarray(margin, dtype=np.float64) + intercept)))


# --------------------------------------------------------------------------- compact trees

@dataclass(frozen=True)
class CompactTrees:
    """A LightGBM booster flattened into arrays, evaluated level by level in NumPy.

    Leaves are encoded as negative child indices ``~leaf``. Missing values follow LightGBM's
    default direction per node. All arrays are (T, M) over T trees and M internal nodes.
    """

    feature: np.ndarray       # int32 split feature
    threshold: np.ndarray     # float64, go left when value <= threshold
    left: np.ndarray          # int32 child (>= 0 internal node, < 0 leaf as ~leaf)
    right: np.ndarray
    default_left: np.ndarray  # bool, where NaN goes
    leaf_value: np.ndarray    # (T, L) float64
    depth: int

    @classmethod
    def from_booster(cls, booster: Any) -> CompactTrees:
        """Flatten ``booster.dump_model()`` (numerical splits only)."""
        trees = booster.dump_model()["tree_info"]
        n_nodes = max(max(t["num_leaves"] - 1, 1) for t in trees)
        n_leaves = max(t["num_leaves"] for t in trees)
        shape = (len(trees), n_nodes)
        arrays = {"feature": np.zeros(shape, np.int32), "threshold": np.zeros(shape),
                  "left": np.full(shape, -1, np.int32), "right": np.full(shape, -1, np.int32),
                  "default_left": np.ones(shape, bool)}
        leaf_value = np.zeros((len(trees), n_leaves))
        depth = 1
        for t, tree in enumerate(trees):
            depth = max(depth, _flatten_node(tree["tree_structure"], t, arrays, leaf_value, 1))
        return cls(leaf_value=leaf_value, depth=depth, **arrays)

    def margin(self, features: np.ndarray) -> np.ndarray:
        """Raw score (sum of leaf values) for (B, F) features -> (B,) float64."""
        x = np.asarray(features, dtype=np.float64)
        n_trees = self.feature.shape[0]
        tree_index = np.arange(n_trees)[None, :]
        node = np.zeros((x.shape[0], n_trees), dtype=np.int32)
        rows = np.arange(x.shape[0])[:, None]
        for _ in range(self.depth):
            internal = node >= 0
            safe = np.where(internal, node, 0)
            value = x[rows, self.feature[tree_index, safe]]
            go_left = np.where(np.isnan(value), self.default_left[tree_index, safe],
                               value <= self.threshold[tree_index, safe])
            child = np.where(go_left, self.left[tree_index, safe], self.right[tree_index, safe])
            node = np.where(internal, child, node)
        return self.leaf_value[tree_index, ~node].sum(axis=1)

    def save(self, path: Path) -> None:
        """Write as an uncompressed .npz."""
        np.savez(path, feature=self.feature, threshold=self.threshold, left=self.left,
                 right=self.right, default_left=self.default_left, leaf_value=self.leaf_value,
                 depth=np.array(self.depth))

    @classmethod
    def load(cls, path: Path) -> CompactTrees:
        """Read what :meth:`save` wrote."""
        data = np.load(path)
        return cls(**{k: data[k] for k in ("feature", "threshold", "left", "right", "default_left",
                                            "leaf_value")}, depth=int(data["depth"]))


def _flatten_node(node: dict, tree: int, arrays: dict[str, np.ndarray], leaf_value: np.ndarray,
                  depth: int) -> int:
    """Fill one tree's arrays; returns the tree depth below ``node``. Returns encoded index."""
    if "leaf_index" in node:  # a single-leaf tree: route everything to leaf 0
        leaf_value[tree, node["leaf_index"]] = node["leaf_value"]
        return depth
    index = node["split_index"]
    if node.get("decision_type", "<=") != "<=":
        raise ValueError("only numerical '<=' splits are supported")
    arrays["feature"][tree, index] = node["split_feature"]
    arrays["threshold"][tree, index] = node["threshold"]
    arrays["default_left"][tree, index] = bool(node["default_left"])
    deepest = depth
    for side in ("left", "right"):
        child = node[f"{side}_child"]
        if "leaf_index" in child:
            arrays[side][tree, index] = ~child["leaf_index"]
            leaf_value[tree, child["leaf_index"]] = child["leaf_value"]
        else:
            arrays[side][tree, index] = child["split_index"]
            deepest = max(deepest, _flatten_node(child, tree, arrays, leaf_value, depth + 1))
    return deepest


@dataclass(frozen=True)
class PathAttribution:
    """Per-leaf feature attributions along each tree path (Saabas / "tree interpreter").

    For every tree and leaf, the change of the node's expected margin at each split on the way
    down is credited to the split feature. Summed over trees, attributions plus ``bias`` equal
    the margin exactly; unlike TreeSHAP they depend on split order, but they cost one
    ``pred_leaf`` pass plus a gather instead of LightGBM's ``pred_contrib`` (measured ~18 ms per
    row for the shipped 500-tree booster on one core).
    """

    table: np.ndarray  # (T * L, F + 1) float64: attributions of reaching leaf l of tree t, then its value
    n_leaves: int      # L, the largest leaf count of any tree
    bias: float        # sum of root expected values

    @classmethod
    def from_booster(cls, booster: Any) -> PathAttribution:
        """Precompute the table from ``booster.dump_model()`` (about a second at load)."""
        trees = booster.dump_model()["tree_info"]
        n_leaves = max(t["num_leaves"] for t in trees)
        n_features = booster.num_feature()
        table = np.zeros((len(trees), n_leaves, n_features + 1))
        bias = 0.0
        for t, tree in enumerate(trees):
            root = tree["tree_structure"]
            root_value = root.get("internal_value", root.get("leaf_value", 0.0))
            bias += root_value
            stack = [(root, np.zeros(n_features), root_value)]
            while stack:
                node, path, value = stack.pop()
                if "leaf_index" in node:
                    table[t, node["leaf_index"], :-1] = path
                    table[t, node["leaf_index"], -1] = node["leaf_value"]
                    continue
                for side in ("left_child", "right_child"):
                    child = node[side]
                    child_value = child.get("internal_value", child.get("leaf_value"))
                    step = path.copy()
                    step[node["split_feature"]] += child_value - value
                    stack.append((child, step, child_value))
        return cls(table=table.reshape(-1, n_features + 1), n_leaves=n_leaves, bias=bias)

    def margin(self, leaf_index: np.ndarray) -> np.ndarray:
        """(B, T) leaf indices from ``pred_leaf`` -> margins (B,): the sum of the reached leaves' values."""
        return self.table[self._rows(leaf_index), -1].sum(axis=1)

    def _rows(self, leaf_index: np.ndarray) -> np.ndarray:
        """(B, T) leaf indices -> (B, T) rows of :attr:`table`."""
        leaf_index = np.asarray(leaf_index, dtype=np.int64)
        return np.arange(leaf_index.shape[1])[None, :] * self.n_leaves + leaf_index

    def explain(self, leaf_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, T) leaf indices from ``pred_leaf`` -> margins (B,) and attributions (B, F).

        One sparse (B, T*L) x (T*L, F+1) product: about B*T*F multiply-adds.
        """
        from scipy.sparse import csr_matrix

        rows = self._rows(leaf_index)
        batch, n_trees = rows.shape
        columns = rows.ravel()
        selector = csr_matrix((np.ones(columns.size), columns, np.arange(0, columns.size + 1, n_trees)),
                              shape=(batch, self.table.shape[0]))
        summed = np.asarray(selector @ self.table)
        return summed[:, -1], summed[:, :-1]


class LeafIndexer:
    """LightGBM leaf indices (``pred_leaf``) through its C API, without the per-call Python wrapper.

    ``Booster.predict`` re-validates and converts its input every call: 78 us for one row of the
    shipped booster here against 44 us for the same ``LGBM_BoosterPredictForMat`` call made
    directly. Results are identical (the same C function). If the installed LightGBM does not
    expose its library handle as expected, it falls back to ``Booster.predict``.
    """

    _PREDICT_LEAF_INDEX = 2  # C_API_PREDICT_LEAF_INDEX in LightGBM's c_api.h
    _DTYPE_FLOAT64 = 1       # C_API_DTYPE_FLOAT64

    def __init__(self, booster: Any) -> None:
        self.booster = booster
        self.n_trees = booster.num_trees()
        self.num_iteration = booster.best_iteration if booster.best_iteration > 0 else -1
        self._parameters = ctypes.c_char_p(b"num_threads=1")
        self._predict: Any = None
        try:
            from lightgbm.basic import _LIB, _safe_call

            self._predict = _LIB.LGBM_BoosterPredictForMat
            self._safe_call = _safe_call
        except (ImportError, AttributeError):
            pass  # Booster.predict serves

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        """(B, F) model inputs -> (B, T) leaf indices (float64, as LightGBM returns them)."""
        if self._predict is None:
            return self.booster.predict(inputs, pred_leaf=True, num_threads=1).reshape(len(inputs), -1)
        rows = np.ascontiguousarray(inputs, dtype=np.float64)
        out = np.empty(rows.shape[0] * self.n_trees, dtype=np.float64)
        written = ctypes.c_int64(0)
        # c_void_p of the raw addresses, not ndarray.ctypes.data_as: that pointer keeps its array in a
        # reference cycle (two objects of cyclic garbage a call, left to the garbage collector)
        self._safe_call(self._predict(
            self.booster._handle, ctypes.c_void_p(rows.ctypes.data), ctypes.c_int(self._DTYPE_FLOAT64),
            ctypes.c_int32(rows.shape[0]), ctypes.c_int32(rows.shape[1]), ctypes.c_int(1),  # row-major
            ctypes.c_int(self._PREDICT_LEAF_INDEX), ctypes.c_int(0), ctypes.c_int(self.num_iteration),
            self._parameters, ctypes.byref(written), ctypes.c_void_p(out.ctypes.data)))
        return out[:written.value].reshape(rows.shape[0], -1)


# --------------------------------------------------------------------------- serving adapter

class FraudScorer:
    """Calibrated fraud probability and reasons, loaded from a sealed artifact directory.

    Parameters
    ----------
    directory : artifact folder (``manifest.json`` + payload), verified by sha256 on load.
    sequence_backend : one of :data:`SEQUENCE_BACKENDS` for the card-sequence transformer; by
        default the one the artifact's card records as measured fastest and accurate at training
        time (:func:`measure_sequence_backends`), :data:`FALLBACK_SEQUENCE_BACKEND` for a card
        without that record.
    tree_backend : "lightgbm" (default; fastest as measured) or "numpy" (the booster flattened into
        arrays, :class:`CompactTrees`: no LightGBM needed at serving time, but 3-5x slower for a
        500-tree, 63-leaf booster on 2 CPU cores - see bench/fraud_eval.py --latency).
    """

    def __init__(self, directory: Path, *, sequence_backend: str | None = None, tree_backend: str = "lightgbm",
                 verify: bool = True) -> None:
        self.manifest = load_manifest(Path(directory), verify=verify)
        directory = Path(directory)
        self.config = json.loads((directory / CONFIG_FILE).read_text())
        self.feature_names: tuple[str, ...] = tuple(self.config["model_features"])
        self.uses_sequence = SEQUENCE_FEATURE in self.feature_names
        self._columns = _tabular_columns(self.feature_names)
        self.slope, self.intercept = self.config["platt"]
        import lightgbm as lgb
        self.booster = lgb.Booster(model_file=str(directory / BOOSTER_FILE))
        self.trees = CompactTrees.load(directory / TREES_FILE)
        self.paths = PathAttribution.from_booster(self.booster)
        self.leaf_index = LeafIndexer(self.booster)
        self.tree_backend = tree_backend
        self.sequence_backend = sequence_backend or served_sequence_backend(self.manifest)
        self._sequence = _load_sequence_backend(directory, self.sequence_backend) if self.uses_sequence else None

    def model_inputs(self, features: np.ndarray,
                     sequences: np.ndarray | Sequence[RawTransaction] | None = None) -> np.ndarray:
        """Booster inputs (B, F [+ 1]) float64: tabular features plus the sequence logit if used."""
        features = np.asarray(features, dtype=np.float32).reshape(-1, len(FEATURE_NAMES))
        if self._columns is not None:
            features = features[:, self._columns]
        if not self.uses_sequence:
            return features.astype(np.float64)
        if sequences is None:
            raise ValueError("this model stacks the card-sequence transformer: pass sequences")
        batch = _as_sequence_array(sequences)
        if batch.shape[0] != features.shape[0]:
            raise ValueError(f"{features.shape[0]} feature rows but {batch.shape[0]} sequences")
        assert self._sequence is not None  # uses_sequence
        logits = self._sequence(batch)
        return np.column_stack([features.astype(np.float64), logits.astype(np.float64)])

    def predict_batch(self, features: np.ndarray,
                      sequences: np.ndarray | Sequence[RawTransaction] | None = None) -> np.ndarray:
        """Calibrated fraud probabilities.

        Parameters
        ----------
        features : (B, F) float32 from ``features.feature_vector`` (F = len(FEATURE_NAMES)).
        sequences : (B, K, S) float32 from ``features.sequence_matrix``, or B raw tuples
            ``(amount, tx_time_seconds, terminal_id, card_history)``; required when the model
            stacks the sequence transformer (``uses_sequence``), ignored otherwise.

        Returns
        -------
        (B,) float64 probabilities in [0, 1].
        """
        inputs = self.model_inputs(features, sequences)
        if self.tree_backend == "numpy":
            margin = self.trees.margin(inputs)
        else:
            margin = np.asarray(self.booster.predict(inputs, raw_score=True, num_threads=1))
        return platt_probability(margin, self.slope, self.intercept)

    def score_with_reasons(self, features: np.ndarray,
                           sequences: np.ndarray | Sequence[RawTransaction] | None = None, k: int = 3,
                           explain_from: float | np.ndarray = 0.0
                           ) -> tuple[np.ndarray, list[list[tuple[str, float]]]]:
        """Scores, and reasons for the rows scoring at least ``explain_from``, from one tree pass.

        The sequence model runs once and the trees once (``pred_leaf``): the margin is the sum of
        the reached leaves' values (equal to LightGBM's raw score up to float rounding), and the
        path attributions of the explained rows come from the same leaves.

        Returns
        -------
        (B,) calibrated probabilities and B lists of k ``(feature_name, contribution)`` pairs
        (margin units, largest first); empty for rows below ``explain_from``.
        """
        inputs = self.model_inputs(features, sequences)
        leaves = self.leaf_index(inputs)
        scores = platt_probability(self.paths.margin(leaves), self.slope, self.intercept)
        reasons: list[list[tuple[str, float]]] = [[] for _ in range(len(inputs))]
        explained = np.flatnonzero(scores >= explain_from)
        if explained.size:
            top = self._top(self.paths.explain(leaves[explained])[1], k)
            for position, pairs in zip(explained, top, strict=True):
                reasons[position] = pairs
        return scores, reasons

    def top_contributions(self, features: np.ndarray, k: int = 3,
                          sequences: np.ndarray | Sequence[RawTransaction] | None = None,
                          method: str = "path") -> list[list[tuple[str, float]]]:
        """The k features that pushed each score up the most, in margin (log-odds) units.

        ``method="path"`` (default): :class:`PathAttribution`, ~0.1 ms per row. ``method="shap"``:
        exact TreeSHAP via LightGBM ``pred_contrib`` (~18 ms per row for the shipped booster:
        too slow for the online path; use it offline or for audits). Ranked by signed value.

        Returns
        -------
        B lists of k ``(feature_name, contribution)`` pairs.
        """
        inputs = self.model_inputs(features, sequences)
        if method == "shap":
            contrib = np.asarray(self.booster.predict(inputs, pred_contrib=True, num_threads=1))[:, :-1]
        else:
            contrib = self._explain(inputs)[1]
        return self._top(contrib, k)

    def _explain(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.paths.explain(self.leaf_index(inputs))

    def _top(self, contrib: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        top = np.argsort(-contrib, axis=1, kind="stable")[:, :k]
        return [[(self.feature_names[j], float(row[j])) for j in idx]
                for row, idx in zip(contrib, top, strict=True)]


def _tabular_columns(model_features: tuple[str, ...]) -> np.ndarray | None:
    """Which FEATURE_NAMES columns the booster reads, in its order (None: all, as they are).

    An artifact trained before a feature was added keeps serving on the columns it knows.
    """
    tabular = tuple(name for name in model_features if name != SEQUENCE_FEATURE)
    if tabular == FEATURE_NAMES:
        return None
    missing = sorted(set(tabular) - set(FEATURE_NAMES))
    if missing:
        raise ValueError(f"the artifact needs features this build does not compute: {', '.join(missing)}")
    return np.array([FEATURE_NAMES.index(name) for name in tabular])


def _as_sequence_array(sequences: np.ndarray | Sequence[RawTransaction]) -> np.ndarray:
    if isinstance(sequences, np.ndarray):
        return sequences.astype(np.float32, copy=False)
    amounts, times, terminals, histories = zip(*sequences, strict=True) if sequences else ((), (), (), ())
    return sequence_tensor(amounts, times, terminals, histories)


def served_sequence_backend(manifest: ArtifactManifest) -> str:
    """The sequence backend an artifact's card records as chosen by measurement, else the fallback."""
    chosen = recorded_backend(manifest, SEQUENCE_COMPONENT)
    return chosen if chosen in SEQUENCE_BACKENDS else FALLBACK_SEQUENCE_BACKEND


def measure_sequence_backends(directory: Path, example_sequences: np.ndarray, *,
                              repeats: int = 30) -> BackendChoice:
    """Time eager torch, the artifact's ONNX graph and its int8 graph as served; choose one.

    The runtime's measurement (:func:`model_runtime.backends.compare_backends`): one thread, batch
    sizes 1, 8 and 64, accuracy as the largest logit difference from eager on ``example_sequences``
    ((N, K, S) float32 from ``features.sequence_matrix``), at most :data:`SEQUENCE_MAX_ABS_ERROR`.
    """
    import torch

    from services.fraud.sequence_net import load_sequence_ensemble

    eager = TorchBackend(load_sequence_ensemble(directory))
    candidates: dict[str, Backend] = {
        "eager": eager,
        "onnx": OnnxRuntimeBackend(directory / SEQUENCE_ONNX_FILE, threads=SEQUENCE_THREADS, name="onnx"),
        "onnx-int8": OnnxRuntimeBackend(directory / SEQUENCE_INT8_FILE, threads=SEQUENCE_THREADS,
                                        name="onnx-int8"),
    }
    example = torch.from_numpy(np.ascontiguousarray(example_sequences, dtype=np.float32))
    return compare_backends(eager, candidates, example, SEQUENCE_MAX_ABS_ERROR, batch_sizes=(1, 8, 64),
                            repeats=repeats, threads=SEQUENCE_THREADS)


SequenceRunner = Callable[[np.ndarray], np.ndarray]


def _load_sequence_backend(directory: Path, backend: str) -> SequenceRunner:
    """A callable (B, K, S) float32 -> (B,) float32 logits for one of :data:`SEQUENCE_BACKENDS`."""
    if backend not in SEQUENCE_BACKENDS:
        raise ValueError(f"unknown sequence backend {backend!r}; expected one of {', '.join(SEQUENCE_BACKENDS)}")
    if backend == "eager":
        import torch

        from services.fraud.sequence_net import load_sequence_ensemble

        model = load_sequence_ensemble(directory)

        def run_torch(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(np.ascontiguousarray(batch))).numpy()
        return run_torch
    session = onnx_session(directory / (SEQUENCE_INT8_FILE if backend == "onnx-int8" else SEQUENCE_ONNX_FILE),
                           threads=SEQUENCE_THREADS)
    input_name = session.get_inputs()[0].name  # "sequences" in older artifacts, the runtime's "input" since

    def run_onnx(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
    return run_onnx
