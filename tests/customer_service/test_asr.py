"""ASR: word error rate arithmetic, the domain language model (a normalised ARPA trigram), and
pocketsphinx on espeak-ng telephone speech, directly and served by the runtime from worker
processes (keywords checked, not exact text)."""

from __future__ import annotations

import asyncio
import math
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from model_runtime import BadInput, ModelRuntime
from services.customer_service.asr import (
    AsrRequest,
    AsrStep,
    DomainLm,
    Recognizer,
    StreamResampler,
    asr_model_spec,
    build_domain_lm,
    cached_domain_lm,
    ipa_to_cmu,
    kept_domain_lm,
    sentence_words,
    spell_number,
)
from services.customer_service.audio import resample
from services.customer_service.evaluation import domain_texts, edit_distance, normalize_words, word_errors


def test_edit_distance_and_word_error_rate() -> None:
    assert edit_distance(["a", "b", "c"], ["a", "x", "c", "d"]) == 2
    assert edit_distance([], ["a", "b"]) == 2
    errors = word_errors(["Check my order, please!", "hello"], ["check order please", "hello there"])
    assert (errors.errors, errors.reference_words, errors.utterances) == (2, 5, 2)
    assert errors.wer == pytest.approx(0.4)
    assert normalize_words("Don't STOP.") == ["don't", "stop"]
    with pytest.raises(ValueError):
        word_errors(["a"], [])


def test_numbers_are_spelled_as_spoken() -> None:
    assert spell_number(48213) == ["forty", "eight", "thousand", "two", "hundred", "thirteen"]
    assert spell_number(1_000_015) == ["one", "million", "fifteen"]
    assert sentence_words("I paid 120 dollars. Is it on-time?") == [
        ["i", "paid", "one", "hundred", "twenty", "dollars"], ["is", "it", "on", "time"]]


def _parse_arpa(arpa: str) -> dict[int, dict[tuple[str, ...], tuple[float, float]]]:
    grams: dict[int, dict[tuple[str, ...], tuple[float, float]]] = defaultdict(dict)
    order = 0
    for line in arpa.splitlines():
        if line.endswith("-grams:"):
            order = int(line[1])
        elif order and line and not line.startswith("\\"):
            fields = line.split("\t")
            grams[order][tuple(fields[1].split())] = (float(fields[0]), float(fields[2]) if len(fields) > 2 else 0.0)
    return grams


def _log10_p(grams: dict[int, dict[tuple[str, ...], tuple[float, float]]], ngram: tuple[str, ...]) -> float:
    if ngram in grams[len(ngram)]:
        return grams[len(ngram)][ngram][0]
    history = ngram[:-1]
    backoff = grams[len(history)].get(history, (0.0, 0.0))[1]
    return backoff + _log10_p(grams, ngram[1:])


@pytest.fixture(scope="module")
def domain_lm() -> DomainLm:
    return build_domain_lm(domain_texts(), generic_words=300)


def test_domain_lm_is_a_normalised_trigram_over_its_vocabulary(domain_lm: DomainLm) -> None:
    grams = _parse_arpa(domain_lm.arpa)
    assert len(grams[1]) == domain_lm.ngram_counts[0] and len(grams[3]) == domain_lm.ngram_counts[2]
    assert {"refund", "router", "warranty", "invoice"} <= domain_lm.domain_words
    # not in cmudict: pronounced by espeak-ng when it is installed, else left out (and said so)
    assert "tessera" in (domain_lm.guessed_words if shutil.which("espeak-ng") else domain_lm.unknown_words)
    words = [w for (w,) in grams[1] if w != "<s>"]
    for history in [("<s>",), ("my",), ("check", "the"), ("the", "zebra")]:
        total = sum(10 ** _log10_p(grams, (*history, word)) for word in words)
        assert math.isclose(total, 1.0, rel_tol=1e-3), (history, total)
    # the domain makes its phrases likelier than what the generic words alone would say
    assert _log10_p(grams, ("my", "order")) > _log10_p(grams, ("my", "the"))
    dictionary_words = {line.split()[0].split("(")[0] for line in domain_lm.dictionary.splitlines()}
    assert dictionary_words == domain_lm.vocabulary


def test_the_generic_context_adds_generic_bigrams_and_keeps_the_domain_phrases(domain_lm: DomainLm) -> None:
    alone = build_domain_lm(domain_texts(), generic_words=300, generic_weight=0.0)
    mixed, domain_only = _parse_arpa(domain_lm.arpa), _parse_arpa(alone.arpa)
    assert domain_lm.vocabulary == alone.vocabulary
    assert len(mixed[2]) > 10 * len(domain_only[2])
    assert set(domain_only[2]) <= set(mixed[2]) and set(domain_only[3]) == set(mixed[3])
    # the pairs the generic model finds likeliest, which the domain text never says, gain its context ...
    generic_only = sorted((pair for pair in mixed[2] if pair not in domain_only[2] and pair[0] != "<s>"),
                          key=lambda pair: mixed[2][pair][0], reverse=True)[:1000]
    gains = sorted(_log10_p(mixed, pair) - _log10_p(domain_only, pair) for pair in generic_only)
    assert gains[len(gains) // 2] > 0.3, gains[::100]
    # ... and a domain phrase stays much likelier than a generic non-phrase
    assert _log10_p(mixed, ("my", "order")) > _log10_p(mixed, ("my", "the")) + 0.5
    with pytest.raises(ValueError, match="generic_weight"):
        build_domain_lm(domain_texts(), generic_weight=1.0)


def test_ipa_maps_to_cmudict_phones() -> None:
    assert ipa_to_cmu("tˈɛsɚɹə") == "T EH S ER AH"
    assert ipa_to_cmu("ɹˈaʊɾɚ") == "R AW T ER"
    assert ipa_to_cmu("tʃˈɛn") == "CH EH N"
    assert ipa_to_cmu("ˈ?!") == ""


def test_a_domain_lm_survives_its_json_form(domain_lm: DomainLm) -> None:
    assert DomainLm.from_json(domain_lm.to_json()) == domain_lm
    with pytest.raises(ValueError):
        DomainLm.from_json(b'{"arpa": "x"}')


def test_a_kept_domain_lm_is_read_back_and_any_change_of_text_builds_anew(
        domain_lm: DomainLm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.customer_service import asr

    built: list[list[str]] = []

    def build(texts: list[str]) -> DomainLm:
        built.append(list(texts))
        return domain_lm

    monkeypatch.setattr(asr, "build_domain_lm", build)
    texts = ["Where is my refund?", "Your order ships today."]
    assert cached_domain_lm(texts, tmp_path) == domain_lm
    assert cached_domain_lm(texts, tmp_path) == domain_lm  # read back, not built
    assert len(built) == 1
    assert kept_domain_lm(texts, tmp_path) == domain_lm and kept_domain_lm(["Other text."], tmp_path) is None
    cached_domain_lm([*texts, "A new article."], tmp_path)
    assert len(built) == 2
    for kept in tmp_path.glob("domain-lm-*.json"):
        kept.write_bytes(b"not json")  # a damaged entry is built again, never an error
    assert cached_domain_lm(texts, tmp_path) == domain_lm
    assert len(built) == 3
    assert cached_domain_lm(texts, None) == domain_lm and len(built) == 4  # no cache: always built


def test_empty_domain_text_is_refused() -> None:
    with pytest.raises(ValueError):
        build_domain_lm(["!!! ???"])
    with pytest.raises(ValueError):
        build_domain_lm(["zzqx"], guess_unknown=False)


SENTENCE = "You said someone would call me back, and nobody did."
KEYWORDS = {"call", "back", "nobody"}


@pytest.fixture(scope="module")
def telephone_sentence() -> np.ndarray:
    simulate = pytest.importorskip("services.customer_service.simulate")
    if simulate.espeak_path() is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng): no speech to test with")
    from services.customer_service.evaluation import telephone_speech

    samples, _ = telephone_speech(SENTENCE, 0)
    return samples


def test_domain_lm_recognises_keywords_in_telephone_speech(domain_lm: DomainLm,
                                                           telephone_sentence: np.ndarray) -> None:
    transcript = Recognizer(domain_lm).transcribe(telephone_sentence, 8000)
    assert set(transcript.text.split()) >= KEYWORDS, transcript.text
    assert transcript.audio_s == pytest.approx(len(telephone_sentence) / 8000)
    assert 0 < transcript.real_time_factor < 5


def test_asr_served_from_a_worker_process_keeps_the_event_loop_free(domain_lm: DomainLm,
                                                                     telephone_sentence: np.ndarray) -> None:
    runtime = ModelRuntime()

    async def scenario() -> tuple[str, float]:
        await runtime.load(asr_model_spec("cs-asr-test", domain_lm, processes=1))
        lags: list[float] = []
        decoding = asyncio.ensure_future(runtime.predict("cs-asr-test", AsrRequest(telephone_sentence, 8000)))
        while not decoding.done():
            tick = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - tick - 0.005)
        with pytest.raises(BadInput):
            await runtime.predict("cs-asr-test", AsrRequest(np.zeros(10, np.float32), 8000))  # type: ignore[arg-type]
        await runtime.unload("cs-asr-test")
        return (await decoding).text, max(lags)

    text, worst_lag = asyncio.run(scenario())
    assert set(text.split()) >= KEYWORDS, text
    # pocketsphinx holds the GIL while decoding: in-process it would stall the loop for the whole decode
    assert worst_lag < 0.1


def test_the_stream_resampler_equals_resampling_the_whole() -> None:
    samples = (np.random.default_rng(3).standard_normal(8000) * 3000).astype(np.int16)
    resampler = StreamResampler(8000)
    pieces = [resampler.push(samples[start:start + 160]) for start in range(0, len(samples), 160)]
    np.testing.assert_array_equal(np.concatenate([*pieces, resampler.flush()]), resample(samples, 8000, 16000))


def test_an_utterance_decoded_while_spoken_leaves_little_to_do_at_its_end(domain_lm: DomainLm,
                                                                          telephone_sentence: np.ndarray) -> None:
    runtime = ModelRuntime()

    async def scenario() -> tuple[list[str], float, str]:
        await runtime.load(asr_model_spec("cs-asr-stream", domain_lm, processes=1))
        texts = []
        for n in range(2):  # each utterance starts from the same prior: the same words twice
            key = f"CA1/customer/{n}"
            await runtime.predict("cs-asr-stream", AsrStep(key, "begin"))
            for start in range(0, len(telephone_sentence), 1600):
                await runtime.predict("cs-asr-stream", AsrStep(key, "feed", telephone_sentence[start:start + 1600]))
            started = time.perf_counter()
            texts.append((await runtime.predict("cs-asr-stream", AsrStep(key, "end"))).text)
            end_s = time.perf_counter() - started
        with pytest.raises(KeyError):  # an end without its begin fails alone
            await runtime.predict("cs-asr-stream", AsrStep("CA1/customer/never", "end"))
        with pytest.raises(BadInput):
            await runtime.predict("cs-asr-stream", AsrStep("CA1/customer/1", "rewind"))
        whole = (await runtime.predict("cs-asr-stream", AsrRequest(telephone_sentence, 8000))).text
        await runtime.unload("cs-asr-stream")
        return texts, end_s, whole

    texts, end_s, whole = asyncio.run(scenario())
    assert texts[0] == texts[1] and len(set(texts[0].split()) & KEYWORDS) >= 2, texts
    assert set(whole.split()) >= KEYWORDS, whole  # whole utterances still decode beside live ones
    assert end_s < 2.0  # only the tail was left (a whole decode of this sentence takes about a second)
