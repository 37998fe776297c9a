"""The telephone-adapted acoustic model: the wheel's quantised mixture weights expanded for
sphinxtrain, the adaptation corpus kept apart from the WER measurement, the shipped artifact
assembled with (and only with) the wheel it was built from, a real sphinxtrain run, and the adapted
model decoding simulated telephone speech better than the stock one."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from services.customer_service import simulate
from services.customer_service.acoustic_model import (
    ADAPTED_FILES,
    BASE_FILES,
    STOCK,
    AcousticModelError,
    AdaptationPlan,
    acoustic_model_dir,
    adapt,
    adaptation_phrases,
    read_sendump,
    write_s3_array,
)
from services.customer_service.asr import (
    DecoderSettings,
    Recognizer,
    build_domain_lm,
    cmudict,
    model_dir,
    sentence_words,
)
from services.customer_service.evaluation import (
    development_sets,
    domain_texts,
    measurement_sets,
    telephone_speech,
    word_errors,
)

STOCK_MODEL = model_dir() / "en-us"


def _read_s3_array(path: Path) -> np.ndarray:
    data = path.read_bytes()
    start = data.index(b"endhdr\n") + len(b"endhdr\n")
    magic, first, second, third, count = struct.unpack_from("<iIIII", data, start)
    assert magic == 0x11223344 and count == first * second * third
    return np.frombuffer(data, "<f4", count, start + 20).reshape(first, second, third)


def test_sendump_expands_to_normalised_mixture_weights(tmp_path: Path) -> None:
    weights = read_sendump(STOCK_MODEL / "sendump")
    assert weights.shape == (5126, 3, 128)  # senones, streams (1s_c_d_dd in three), Gaussians
    assert np.allclose(weights.sum(axis=2), 1.0)
    assert (weights > 0).all()
    write_s3_array(tmp_path / "mixture_weights", weights)
    assert np.allclose(_read_s3_array(tmp_path / "mixture_weights"), weights, rtol=1e-6)


def test_the_adaptation_never_speaks_what_wer_is_measured_on() -> None:
    with pytest.raises(ValueError, match="speak the WER measurement"):
        AdaptationPlan(voices=("us_m3", "rp_f5"))
    with pytest.raises(ValueError, match="unknown"):
        AdaptationPlan(voices=("nobody",))
    phrases = adaptation_phrases()
    measured = {tuple(words) for sets in (measurement_sets(), development_sets()) for sentences in sets.values()
                for sentence in sentences for words in sentence_words(sentence)}
    known = cmudict()
    assert len(phrases) > 50
    assert not measured & {tuple(words) for words in phrases}
    assert all(word in known for words in phrases for word in words)


def test_the_shipped_model_is_assembled_from_the_wheel_it_was_built_from(tmp_path: Path) -> None:
    assert acoustic_model_dir(STOCK) == STOCK_MODEL
    folder = acoustic_model_dir("v1", cache_dir=tmp_path / "cache")
    assert sorted(path.name for path in folder.iterdir()) == sorted([*BASE_FILES, *ADAPTED_FILES])
    assert (folder / "means").read_bytes() == (Path("models/cs/asr/v1") / "means").read_bytes()
    assert (folder / "means").read_bytes() != (STOCK_MODEL / "means").read_bytes()
    assert acoustic_model_dir("v1", cache_dir=tmp_path / "cache") == folder  # assembled once

    other_wheel = tmp_path / "other"
    shutil.copytree(STOCK_MODEL, other_wheel)
    (other_wheel / "mdef").write_bytes((other_wheel / "mdef").read_bytes() + b"\0")
    with pytest.raises(AcousticModelError, match="mdef differs"):
        acoustic_model_dir("v1", cache_dir=tmp_path / "cache2", stock_dir=other_wheel)
    with pytest.raises(AcousticModelError, match="TESSERA_CS_ACOUSTIC_MODEL=stock"):
        acoustic_model_dir("v404", cache_dir=tmp_path / "cache3")


def _speech_tools_or_skip() -> None:
    if simulate.espeak_path() is None:
        pytest.skip("espeak-ng is not installed (scripts/ensure_services.sh installs it)")


def test_a_small_adaptation_runs_through_sphinxtrain(tmp_path: Path) -> None:
    _speech_tools_or_skip()
    if shutil.which("sphinx_fe") is None or not Path("/usr/lib/sphinxtrain/bw").exists():
        pytest.skip("sphinxtrain / sphinxbase-utils are not installed (scripts/ensure_services.sh installs them)")
    result = adapt(AdaptationPlan(voices=("rp_f5",), passes=1, phrases=8), tmp_path)
    assert result.utterances == 8 and 0 < result.aligned <= 8
    for name in ADAPTED_FILES:
        adapted = (result.folder / name).read_bytes()
        assert len(adapted) == (STOCK_MODEL / name).stat().st_size
        assert adapted != (STOCK_MODEL / name).read_bytes()


def test_the_adapted_model_hears_simulated_calls_better_than_the_stock_one() -> None:
    _speech_tools_or_skip()
    sentences = list(development_sets()["in_script"])[:4]
    speech = [telephone_speech(sentence, index) for index, sentence in enumerate(sentences)]
    references = [" ".join(words) for _, words in speech]
    lm = build_domain_lm(domain_texts())
    errors = {}
    for name in (STOCK, "v1"):
        recognizer = Recognizer(lm, DecoderSettings(acoustic_model=str(acoustic_model_dir(name))))
        errors[name] = word_errors(references, [recognizer.transcribe(samples, 8000).text for samples, _ in speech])
    assert errors["v1"].errors < errors[STOCK].errors, errors
