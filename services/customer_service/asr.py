"""Offline speech-to-text of utterances: pocketsphinx (the wheel's en-US acoustic model, by default
adapted to the telephone line: :mod:`.acoustic_model`) with a domain language model built from the
knowledge base and call scripts.

Decoding: telephone audio is upsampled 8 -> 16 kHz (the acoustic model's rate) and decoded in one
forward lexicon-tree pass; the slow second passes (``fwdflat``, ``bestpath``) are off.

The domain language model (:func:`build_domain_lm`) is an interpolated Witten-Bell trigram over
the domain text, whose lowest order backs off to the generic en-US model's unigram distribution
over a vocabulary of the domain's words plus the ``generic_words`` most frequent generic ones. In
ARPA form each history's back-off weight is exactly ``T(h) / (c(h) + T(h))`` (distinct followers
over count plus distinct followers), the Witten-Bell mass left to the lower order. Its bigrams and
trigrams are then interpolated with the generic model's over the same vocabulary
(:data:`GENERIC_BIGRAM_WEIGHT`), so that speech outside the domain text keeps a generic context. The
pronunciation dictionary is cmudict restricted to that vocabulary; a domain word cmudict does
not know (a brand, a name) gets the pronunciation espeak-ng gives it (:func:`guess_pronunciation`:
its US-English IPA mapped to cmudict's phones), listed in :attr:`DomainLm.guessed_words`; one
still without a pronunciation is left out and listed in :attr:`DomainLm.unknown_words`.

A tenant's calls are decoded with a model of the call scripts and its own knowledge base
(:mod:`.tenant_lm`): an :class:`AsrRequest` or a ``begin`` :class:`AsrStep` may carry a
:class:`KeyedLm`, which the :class:`RecognizerPool` ships to a decoder process once per version
and which gets decoders of its own there (a bounded number of models held per process).

pocketsphinx decoders are not thread-safe, and ``process_raw`` holds the GIL while it decodes: a
:class:`Recognizer` belongs to one thread, and served through the shared runtime
(:func:`asr_model_spec`) the recognizers live in worker processes (:class:`RecognizerPool`), one
decoder each, so decoding neither stalls the serving event loop nor races.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
import zlib
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt

from services.customer_service.audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, resample
from shared.derived_cache import DerivedFileCache, digest_of, file_fingerprint
from shared.processes import end_with_parent

logger = logging.getLogger("tessera.cs.asr")

if TYPE_CHECKING:
    from model_runtime import LoadContext, ModelSpec

DECODER_RATE = 16000
GENERIC_BIGRAM_WEIGHT = 0.5
"""Weight of the generic model's bigrams and trigrams in every domain language model, chosen on the
development sentences with the adapted acoustic model (WER in-script / held out): 0 (the domain alone)
7.0 / 30.6 %, 0.2 9.3 / 24.7 %, 0.5 7.0 / 24.7 %."""
SENTENCE_START, SENTENCE_END = "<s>", "</s>"
_LOG10_FLOOR = -99.0
_SENTENCES = re.compile(r"[.!?;:\n]+")
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)*")


def model_dir() -> Path:
    """The en-US model shipped in the pocketsphinx wheel."""
    import pocketsphinx

    return Path(pocketsphinx.get_model_path("en-us"))


# --- text normalisation ---------------------------------------------------------------------------

_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_SCALES = ((1_000_000_000, "billion"), (1_000_000, "million"), (1000, "thousand"), (100, "hundred"))


def spell_number(number: int) -> list[str]:
    """An integer as spoken words (US style, no "and"): 48213 -> forty eight thousand two hundred thirteen."""
    if number < 0:
        return ["minus", *spell_number(-number)]
    if number < 20:
        return [_ONES[number]]
    if number < 100:
        tens, ones = divmod(number, 10)
        return [_TENS[tens]] + ([_ONES[ones]] if ones else [])
    for scale, name in _SCALES:
        if number >= scale:
            high, rest = divmod(number, scale)
            return [*spell_number(high), name] + (spell_number(rest) if rest else [])
    raise AssertionError("unreachable")


def sentence_words(text: str) -> list[list[str]]:
    """Text as sentences of lower-case spoken words: numbers spelled out, punctuation dropped."""
    sentences = []
    for sentence in _SENTENCES.split(text.lower().replace("-", " ")):
        words: list[str] = []
        for token in _TOKEN.findall(sentence):
            words.extend(spell_number(int(token)) if token.isdigit() and len(token) < 10 else [token])
        if words:
            sentences.append(words)
    return sentences


# --- pronunciations and the generic model ---------------------------------------------------------

@functools.cache
def cmudict() -> dict[str, tuple[str, ...]]:
    """cmudict-en-us (from the wheel): word -> its pronunciations (phone strings)."""
    pronunciations: dict[str, list[str]] = defaultdict(list)
    with open(model_dir() / "cmudict-en-us.dict", encoding="utf-8") as lines:
        for line in lines:
            word, _, phones = line.strip().partition(" ")
            if phones:
                pronunciations[word.split("(", 1)[0]].append(phones.strip())
    return {word: tuple(phones) for word, phones in pronunciations.items()}


@functools.cache
def generic_model() -> tuple[Any, float]:
    """The wheel's generic en-US trigram (a ``pocketsphinx.NGramModel``) and the factor that turns its
    log scores into natural logarithms."""
    import pocketsphinx

    config = pocketsphinx.Config(loglevel="FATAL")
    logmath = pocketsphinx.LogMath()
    return (pocketsphinx.NGramModel(config, logmath, str(model_dir() / "en-us.lm.bin")),
            logmath.log_to_ln(-1_000_000) / -1_000_000)


@functools.cache
def generic_unigrams() -> dict[str, float]:
    """log10 unigram probability in the generic en-US model of every cmudict word it knows."""
    generic, to_ln = generic_model()
    unigrams = {}
    for word in (*cmudict(), SENTENCE_END):
        log10_p = generic.prob([word]) * to_ln / math.log(10)
        if log10_p > _LOG10_FLOOR:
            unigrams[word] = log10_p
    return unigrams


# --- the domain language model --------------------------------------------------------------------

@dataclass(frozen=True)
class DomainLm:
    """An ARPA trigram and the dictionary of its vocabulary, built from domain text."""

    arpa: str
    dictionary: str
    vocabulary: frozenset[str]
    domain_words: frozenset[str]
    guessed_words: tuple[str, ...]
    unknown_words: tuple[str, ...]
    sentences: int
    ngram_counts: tuple[int, int, int]

    def to_json(self) -> bytes:
        """The model as JSON (:meth:`from_json` reads it back)."""
        return json.dumps({"arpa": self.arpa, "dictionary": self.dictionary, "vocabulary": sorted(self.vocabulary),
                           "domain_words": sorted(self.domain_words), "guessed_words": list(self.guessed_words),
                           "unknown_words": list(self.unknown_words), "sentences": self.sentences,
                           "ngram_counts": list(self.ngram_counts)}).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> DomainLm:
        """A model written by :meth:`to_json` (``ValueError`` when ``data`` is not one)."""
        try:
            fields = json.loads(data)
            first, second, third = (int(count) for count in fields["ngram_counts"])
            return cls(arpa=str(fields["arpa"]), dictionary=str(fields["dictionary"]),
                       vocabulary=frozenset(fields["vocabulary"]), domain_words=frozenset(fields["domain_words"]),
                       guessed_words=tuple(fields["guessed_words"]), unknown_words=tuple(fields["unknown_words"]),
                       sentences=int(fields["sentences"]), ngram_counts=(first, second, third))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a domain language model: {exc}") from exc

    def write(self, folder: Path) -> tuple[Path, Path]:
        """Write ``domain.lm`` (ARPA) and ``domain.dict`` into ``folder``; return their paths."""
        folder.mkdir(parents=True, exist_ok=True)
        lm_path, dict_path = folder / "domain.lm", folder / "domain.dict"
        lm_path.write_text(self.arpa, encoding="utf-8")
        dict_path.write_text(self.dictionary, encoding="utf-8")
        return lm_path, dict_path


@dataclass
class _Counts:
    unigrams: Counter[str] = field(default_factory=Counter)
    bigrams: Counter[tuple[str, str]] = field(default_factory=Counter)
    trigrams: Counter[tuple[str, str, str]] = field(default_factory=Counter)


def build_domain_lm(texts: Iterable[str], *, generic_words: int = 2000, guess_unknown: bool = True,
                    generic_weight: float = GENERIC_BIGRAM_WEIGHT) -> DomainLm:
    """The domain trigram of ``texts`` (knowledge-base articles, call scripts), backed off to the
    generic model's unigrams over the domain words plus the ``generic_words`` most frequent generic
    words, its bigrams and trigrams interpolated with the generic model's (weight ``generic_weight``;
    0: the domain alone, :func:`_with_generic_context`); domain words cmudict lacks are pronounced
    by espeak-ng when ``guess_unknown`` and it is installed. Raises ``ValueError`` when the texts
    hold no word with a pronunciation."""
    if not 0 <= generic_weight < 1:
        raise ValueError(f"generic_weight must be in [0, 1), got {generic_weight}")
    pronunciations = dict(cmudict())
    sentences = [words for text in texts for words in sentence_words(text)]
    domain_words = {word for words in sentences for word in words}
    missing = sorted(word for word in domain_words if word not in pronunciations)
    guessed = {word: phones for word in (missing if guess_unknown else [])
               if (phones := guess_pronunciation(word)) is not None}
    pronunciations.update({word: (phones,) for word, phones in guessed.items()})
    unknown = [word for word in missing if word not in guessed]
    known_domain = domain_words - set(unknown)
    if not known_domain:
        raise ValueError("the domain text holds no word with a known pronunciation")
    generic = generic_unigrams()
    frequent = sorted(generic, key=generic.__getitem__, reverse=True)[:generic_words]
    vocabulary = (known_domain | set(frequent)) - {SENTENCE_END}
    counts = _count(sentences, vocabulary)
    estimates = _witten_bell_estimates(counts, _base_distribution(vocabulary, generic))
    if generic_weight > 0:
        estimates = _with_generic_context(estimates, generic_weight)
    arpa = _arpa(estimates)
    dictionary = "".join(f"{word if index == 0 else f'{word}({index + 1})'} {phones}\n"
                         for word in sorted(vocabulary)
                         for index, phones in enumerate(pronunciations[word]))
    return DomainLm(arpa=arpa, dictionary=dictionary, vocabulary=frozenset(vocabulary),
                    domain_words=frozenset(known_domain), guessed_words=tuple(sorted(guessed)),
                    unknown_words=tuple(unknown), sentences=len(sentences),
                    ngram_counts=(len(vocabulary) + 2, len(estimates.bigrams), len(estimates.trigrams)))


DOMAIN_LM_CACHE_KEPT = 8
"""Domain language models kept on disk by :func:`cached_domain_lm` (about 11 MB each)."""


def cached_domain_lm(texts: Sequence[str], cache_dir: Path | None) -> DomainLm:
    """:func:`build_domain_lm` of ``texts`` (default settings), kept in ``cache_dir`` (``None``: always built).

    Building takes ~4 s of CPU and is a pure function of the texts, this module's code, the wheel's
    generic model and cmudict, and espeak-ng: the file is named by a digest of all of them
    (:mod:`shared.derived_cache`), so a restart reads the model back in ~0.05 s and any change to an
    input builds it anew.
    """
    if cache_dir is None:
        return build_domain_lm(texts)
    cache, key = _domain_lm_cache(cache_dir), digest_of(_domain_lm_inputs(texts))
    kept = _read_kept(cache, key)
    if kept is not None:
        return kept
    model = build_domain_lm(texts)
    cache.write(key, model.to_json())
    return model


def kept_domain_lm(texts: Sequence[str], cache_dir: Path) -> DomainLm | None:
    """The model :func:`cached_domain_lm` kept for ``texts`` in ``cache_dir``, or ``None`` (nothing is built:
    reading one takes ~0.05 s, where a build is seconds of GIL-holding work for a process of its own)."""
    return _read_kept(_domain_lm_cache(cache_dir), digest_of(_domain_lm_inputs(texts)))


def _domain_lm_cache(cache_dir: Path) -> DerivedFileCache:
    return DerivedFileCache(cache_dir, prefix="domain-lm", suffix=".json", keep=DOMAIN_LM_CACHE_KEPT)


def _read_kept(cache: DerivedFileCache, key: str) -> DomainLm | None:
    kept = cache.read(key)
    if kept is None:
        return None
    try:
        return DomainLm.from_json(kept)
    except ValueError:
        logger.warning("domain language model cache %s: unreadable entry, building anew", cache.directory)
        return None


def _domain_lm_inputs(texts: Sequence[str]) -> list[bytes | str]:
    """Everything :func:`build_domain_lm` (default settings) depends on, for the cache key."""
    espeak = shutil.which("espeak-ng")
    return ["domain-lm/1", Path(__file__).read_bytes(), file_fingerprint(model_dir() / "en-us.lm.bin"),
            file_fingerprint(model_dir() / "cmudict-en-us.dict"),
            file_fingerprint(Path(espeak)) if espeak else "no espeak-ng", str(len(texts)), *texts]


# espeak-ng's US-English IPA to cmudict's phones; longest symbols first when matching
_IPA_TO_CMU = {
    "aɪə": "AY ER", "ɚɹ": "ER", "aʊ": "AW", "aɪ": "AY", "eɪ": "EY", "oʊ": "OW", "ɔɪ": "OY", "tʃ": "CH", "dʒ": "JH",
    "ɑː": "AA", "ɔː": "AO", "iː": "IY", "uː": "UW", "ɜː": "ER", "oː": "AO", "ɪə": "IH R", "eə": "EH R",
    "ʊə": "UH R", "ɑ": "AA", "ɒ": "AA", "a": "AA", "æ": "AE", "ʌ": "AH", "ə": "AH", "ɐ": "AH", "ɔ": "AO",
    "ɛ": "EH", "e": "EH", "ɚ": "ER", "ɝ": "ER", "ɪ": "IH", "ᵻ": "IH", "i": "IY", "o": "OW", "ʊ": "UH",
    "u": "UW", "b": "B", "d": "D", "ð": "DH", "f": "F", "ɡ": "G", "g": "G", "h": "HH", "k": "K", "x": "K",
    "l": "L", "m": "M", "n": "N", "ŋ": "NG", "p": "P", "ɹ": "R", "r": "R", "s": "S", "ʃ": "SH", "t": "T",
    "ɾ": "T", "ʔ": "T", "θ": "TH", "v": "V", "w": "W", "j": "Y", "z": "Z", "ʒ": "ZH",
}
_IPA_SYMBOLS = sorted(_IPA_TO_CMU, key=len, reverse=True)


def ipa_to_cmu(ipa: str) -> str:
    """espeak-ng IPA as cmudict phones (stress marks, lengths and unknown symbols dropped)."""
    phones, position = [], 0
    while position < len(ipa):
        symbol = next((s for s in _IPA_SYMBOLS if ipa.startswith(s, position)), None)
        if symbol is None:
            position += 1
            continue
        phones.append(_IPA_TO_CMU[symbol])
        position += len(symbol)
    return " ".join(phones)


@functools.cache
def guess_pronunciation(word: str) -> str | None:
    """cmudict phones for a word cmudict lacks, from espeak-ng's US-English IPA; ``None`` when
    espeak-ng is not installed or says nothing usable."""
    executable = shutil.which("espeak-ng")
    if executable is None or not word.replace("'", "").isalnum():
        return None
    try:
        done = subprocess.run([executable, "-q", "--ipa", "-v", "en-us", word], capture_output=True, timeout=10,
                              check=False)
    except subprocess.TimeoutExpired:
        return None
    phones = ipa_to_cmu(done.stdout.decode("utf-8", errors="replace").strip()) if done.returncode == 0 else ""
    return phones or None


def _count(sentences: Sequence[Sequence[str]], vocabulary: set[str]) -> _Counts:
    """n-gram counts; an n-gram holding a word out of the vocabulary is not counted."""
    counts = _Counts()
    for words in sentences:
        tokens: list[str | None] = [SENTENCE_START, *(w if w in vocabulary else None for w in words), SENTENCE_END]
        for index in range(1, len(tokens)):
            word, previous = tokens[index], tokens[index - 1]
            if word is None:
                continue
            counts.unigrams[word] += 1
            if previous is None:
                continue
            counts.bigrams[(previous, word)] += 1
            before = tokens[index - 2] if index >= 2 else None
            if before is not None:
                counts.trigrams[(before, previous, word)] += 1
    return counts


def _base_distribution(vocabulary: set[str], generic: dict[str, float]) -> dict[str, float]:
    """The generic unigram distribution renormalised over the vocabulary (and ``</s>``); a domain
    word the generic model lacks gets the least probability of the vocabulary's known words."""
    known = [10 ** generic[w] for w in vocabulary if w in generic]
    floor = min(known) if known else 1e-7
    raw = {word: 10 ** generic[word] if word in generic else floor for word in vocabulary}
    raw[SENTENCE_END] = 10 ** generic.get(SENTENCE_END, -1.5)
    total = sum(raw.values())
    return {word: p / total for word, p in raw.items()}


def _witten_bell(counts: Counter[Any], key_of_history: Any) -> tuple[dict[Any, int], dict[Any, int]]:
    """Per history: total count c(h) and distinct followers T(h)."""
    totals: dict[Any, int] = defaultdict(int)
    types: dict[Any, int] = defaultdict(int)
    for ngram, count in counts.items():
        history = key_of_history(ngram)
        totals[history] += count
        types[history] += 1
    return totals, types


@dataclass(frozen=True)
class _Estimates:
    """A back-off trigram: the probabilities of its explicit n-grams and its histories' back-off
    weights (linear, not log)."""

    unigrams: dict[str, float]
    bigrams: dict[tuple[str, str], float]
    trigrams: dict[tuple[str, str, str], float]
    unigram_backoffs: dict[str, float]
    bigram_backoffs: dict[tuple[str, str], float]

    def bigram(self, history: str, word: str) -> float:
        """P(word | history) as the model serves it: explicit, or backed off to the unigram."""
        explicit = self.bigrams.get((history, word))
        return explicit if explicit is not None else self.unigram_backoffs.get(history, 1.0) * self.unigrams[word]


def _witten_bell_estimates(counts: _Counts, base: dict[str, float]) -> _Estimates:
    """The interpolated Witten-Bell trigram of ``counts`` over ``base``'s vocabulary."""
    tokens = sum(counts.unigrams.values())
    distinct = len(counts.unigrams)
    p1 = {word: (counts.unigrams.get(word, 0) + distinct * p0) / (tokens + distinct) for word, p0 in base.items()}
    bigram_totals, bigram_types = _witten_bell(counts.bigrams, lambda ngram: ngram[0])
    p2 = {(u, w): (count + bigram_types[u] * p1[w]) / (bigram_totals[u] + bigram_types[u])
          for (u, w), count in counts.bigrams.items()}
    trigram_totals, trigram_types = _witten_bell(counts.trigrams, lambda ngram: ngram[:2])
    p3 = {(u, v, w): (count + trigram_types[(u, v)] * p2[(v, w)]) / (trigram_totals[(u, v)] + trigram_types[(u, v)])
          for (u, v, w), count in counts.trigrams.items()}
    return _Estimates(p1, p2, p3,
                      {u: bigram_types[u] / (bigram_totals[u] + bigram_types[u]) for u in bigram_types},
                      {h: trigram_types[h] / (trigram_totals[h] + trigram_types[h]) for h in trigram_types})


def _with_generic_context(domain: _Estimates, generic_weight: float) -> _Estimates:
    """The domain's bigrams and trigrams interpolated with the generic model's, over the domain
    model's vocabulary: P(w | h) = (1 - g) P_domain(w | h) + g P_generic(w | h), the generic one
    renormalised over the vocabulary. Explicit bigrams are the domain's and the generic model's
    (found as the pairs whose generic probability is not its history's back-off times the unigram);
    explicit trigrams are the domain's. Back-off weights are recomputed so every history's
    distribution sums to one.

    Why: with an acoustic model that hears the words (:mod:`.acoustic_model`), a vocabulary that
    backs off to unigrams loses sentences outside the domain text to the generic model (21 % vs
    34 % WER measured); the generic bigram context gets them back and keeps the domain's."""
    generic, to_ln = generic_model()
    vocabulary = sorted(domain.unigrams)  # predicted words, </s> included
    histories = [SENTENCE_START, *(word for word in vocabulary if word != SENTENCE_END)]
    column = {word: index for index, word in enumerate(vocabulary)}
    unigram = np.array([domain.unigrams[word] for word in vocabulary])
    generic_unigram = np.array([generic.prob([word]) for word in vocabulary], dtype=np.float64)
    mixed_bigrams: dict[tuple[str, str], float] = {}
    unigram_backoffs: dict[str, float] = {}
    generic_normalisers: dict[str, float] = {}
    domain_followers: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for (history, word), p in domain.bigrams.items():
        domain_followers[history].append((word, p))
    for history in histories:
        scores = np.array([generic.prob([word, history]) for word in vocabulary], dtype=np.float64)
        generic_row = np.exp(scores * to_ln)
        normaliser = float(generic_row.sum())
        domain_row = domain.unigram_backoffs.get(history, 1.0) * unigram
        explicit = np.zeros(len(vocabulary), bool)
        for word, p in domain_followers[history]:
            domain_row[column[word]] = p
            explicit[column[word]] = True
        explicit |= _explicit_in_generic(scores - generic_unigram)
        row = (1 - generic_weight) * domain_row + generic_weight * generic_row / normaliser
        for index in np.flatnonzero(explicit):
            mixed_bigrams[(history, vocabulary[index])] = float(row[index])
        left, lower = 1 - float(row[explicit].sum()), 1 - float(unigram[explicit].sum())
        unigram_backoffs[history] = max(left, 1e-9) / max(lower, 1e-9)
        generic_normalisers[history] = normaliser
    mixed = _Estimates(domain.unigrams, mixed_bigrams, {}, unigram_backoffs, {})
    for (u, v, w), p in domain.trigrams.items():
        generic_p = math.exp(generic.prob([w, v, u]) * to_ln) / generic_normalisers[v]
        mixed.trigrams[(u, v, w)] = (1 - generic_weight) * p + generic_weight * generic_p
    followers: dict[tuple[str, str], list[str]] = defaultdict(list)
    for u, v, w in mixed.trigrams:
        followers[(u, v)].append(w)
    for (u, v), words in followers.items():
        left = 1 - sum(mixed.trigrams[(u, v, w)] for w in words)
        lower = 1 - sum(mixed.bigram(v, w) for w in words)
        mixed.bigram_backoffs[(u, v)] = max(left, 1e-9) / max(lower, 1e-9)
    return mixed


def _explicit_in_generic(log_ratios: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """Which words of one history's row the generic model holds an explicit bigram for: a backed-off
    pair scores the history's back-off weight plus the unigram, the same ratio for the whole row
    (its most common value), an explicit one anything else."""
    rounded = np.round(log_ratios)
    values, counts = np.unique(rounded, return_counts=True)
    return np.abs(rounded - values[counts.argmax()]) > 2


def _arpa(model: _Estimates) -> str:
    """A back-off trigram as ARPA text (log10 probabilities and back-off weights)."""

    def backoff(weights: dict[Any, float], history: Any) -> str:
        return f"\t{math.log10(weights[history]):.4f}" if history in weights else ""

    lines = ["\\data\\", f"ngram 1={len(model.unigrams) + 1}", f"ngram 2={len(model.bigrams)}",
             f"ngram 3={len(model.trigrams)}", "", "\\1-grams:"]
    lines.append(f"{_LOG10_FLOOR:.4f}\t{SENTENCE_START}{backoff(model.unigram_backoffs, SENTENCE_START)}")
    lines += [f"{math.log10(p):.4f}\t{word}{backoff(model.unigram_backoffs, word)}"
              for word, p in sorted(model.unigrams.items())]
    lines += ["", "\\2-grams:"]
    lines += [f"{math.log10(p):.4f}\t{u} {w}{backoff(model.bigram_backoffs, (u, w))}"
              for (u, w), p in sorted(model.bigrams.items())]
    lines += ["", "\\3-grams:"]
    lines += [f"{math.log10(p):.4f}\t{u} {v} {w}" for (u, v, w), p in sorted(model.trigrams.items())]
    lines += ["", "\\end\\", ""]
    return "\n".join(lines)


# --- the shipped domain text -----------------------------------------------------------------------

SIMULATED_KB_ARTICLES: tuple[str, ...] = (
    "Refunds. A refund goes back to the card you paid with. Refunds appear in three to five working days. "
    "If you were charged twice, we refund the duplicate charge at once.",
    "Delivery. Standard delivery takes three to five days and express delivery takes one day. "
    "You can change the delivery date or the delivery address in your account before the order ships.",
    "Order status. To check the status of an order, give the agent your order number. "
    "The tracking link is in your confirmation email.",
    "Passwords. To reset your password, choose forgot password on the sign in page. "
    "We send a reset link to the email address on your account.",
    "Router troubleshooting. If your router keeps dropping the connection, restart the router and wait two "
    "minutes. Check that the cables are plugged in and the lights are green. If the internet is still slow, "
    "we can send an engineer.",
    "Billing. Your bill shows the charges for this month and any late fee. "
    "You can set up a payment plan if you cannot afford the full payment.",
    "Warranty. Every phone, laptop and television is covered by a two year warranty. "
    "A broken or faulty product is repaired or replaced free of charge.",
    "Cancellation. You can cancel your account or your subscription at any time. "
    "If you cancel within fourteen days you get a full refund.",
    "Complaints. We are sorry when things go wrong. A supervisor or a manager can review your complaint, "
    "and we may add a credit to your account.",
    "Account changes. To update your billing address, your phone number or the name on the account, "
    "we first confirm your identity with a security question.",
    "Invoices. A copy of any invoice can be sent by email. Invoices are also in your account under billing.",
    "Insurance. Pet insurance and phone insurance can be cancelled by phone. "
    "After a bereavement we can transfer the account to another name.",
)
"""The knowledge base the shipped domain language model is built from (simulated, not a customer's:
no tenant's data goes into a model every tenant shares); also the ASR evaluation's."""


def script_texts(seed: int = 7, fills: int = 3) -> list[str]:
    """Every call-script line of :mod:`services.customer_service.simulate`, its slots filled ``fills``
    times: the shipped part of every domain language model (a tenant's adds its knowledge base)."""
    from services.customer_service import simulate

    rng = np.random.default_rng(seed)
    templates = [*(line for lines in simulate.CUSTOMER_LINES.values() for line in lines),
                 *simulate.NEUTRAL_CONTENT_LINES, *(line for lines in simulate.AGENT_LINES.values() for line in lines)]
    return [simulate.fill_slots(template, rng) for template in templates for _ in range(fills)]


def domain_texts(seed: int = 7, fills: int = 3) -> list[str]:
    """The shipped domain language model's text: the simulated knowledge base and the call scripts
    (:func:`script_texts`)."""
    return [*SIMULATED_KB_ARTICLES, *script_texts(seed, fills)]


# --- decoding ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DecoderSettings:
    """Search settings: one forward tree pass (the second passes off), beams tuned for speed.

    Language weight and insertion penalty were checked on the development sentences
    (``bench/cs_asr_settings.py --sets development --grid lw=... wip=...``): these are the best there."""

    beam: float = 1e-40
    wbeam: float = 1e-24
    pbeam: float = 1e-40
    lw: float = 8.0
    wip: float = 0.65
    """Word insertion penalty (pocketsphinx's default 0.65)."""
    maxhmmpf: int = 10000
    topn: int = 4
    """Gaussians scored per mixture (pocketsphinx's default 4)."""
    ds: int = 1
    """Acoustic scores computed every ``ds``-th frame (1: every frame, pocketsphinx's default)."""
    fwdflat: bool = False
    bestpath: bool = False
    acoustic_model: str | None = None
    """The acoustic model's folder; None: the configured one (``TESSERA_CS_ACOUSTIC_MODEL``,
    :func:`~.acoustic_model.acoustic_model_dir`)."""
    dither: bool = True
    """Half a bit of noise on the input: digital silence (a phone line's all-zero μ-law) would
    otherwise drive the log energies and the running cepstral mean to -inf, which spoils every
    later utterance of the decoder (seen: garbage words, then a crash)."""


@dataclass(frozen=True)
class Transcript:
    """What was said (lower-case words), how long the audio was and how long decoding took."""

    text: str
    audio_s: float
    decode_s: float

    @property
    def real_time_factor(self) -> float:
        """Decoding time over audio time."""
        return self.decode_s / self.audio_s if self.audio_s else 0.0


class Recognizer:
    """One pocketsphinx decoder with either the generic en-US model or a domain model; use it from
    one thread only."""

    def __init__(self, lm: DomainLm | None = None, settings: DecoderSettings | None = None) -> None:
        import pocketsphinx

        self.settings = settings or DecoderSettings()
        self.lm = lm
        models = model_dir()
        lm_path, dict_path = (binary_lm_files(lm) if lm is not None
                              else (models / "en-us.lm.bin", models / "cmudict-en-us.dict"))
        config = pocketsphinx.Config(hmm=str(acoustic_model_of(self.settings)), lm=str(lm_path),
                                     dict=str(dict_path), samprate=DECODER_RATE, loglevel="FATAL",
                                     **_as_config(self.settings))
        self.decoder = pocketsphinx.Decoder(config)

    def transcribe(self, samples: npt.NDArray[np.int16], sample_rate: int) -> Transcript:
        """Decode one utterance (int16 at any supported rate; resampled to 16 kHz)."""
        audio = resample(samples, sample_rate, DECODER_RATE) if sample_rate != DECODER_RATE else samples
        started = time.perf_counter()
        self.decoder.start_utt()
        self.decoder.process_raw(np.ascontiguousarray(audio, dtype=np.int16).tobytes(), no_search=False,
                                 full_utt=True)
        self.decoder.end_utt()
        hypothesis = self.decoder.hyp()
        text = hypothesis.hypstr if hypothesis is not None else ""
        return Transcript(text=text, audio_s=len(samples) / sample_rate, decode_s=time.perf_counter() - started)


_LM_FILES: OrderedDict[DomainLm, tuple[Path, Path]] = OrderedDict()
_LM_FILES_KEPT = 16
_LM_FILES_LOCK = threading.Lock()


def binary_lm_files(lm: DomainLm) -> tuple[Path, Path]:
    """``lm`` as pocketsphinx's binary trie, and its dictionary, written once per process and kept for
    the last :data:`_LM_FILES_KEPT` models: a decoder loads an ARPA of ~500k bigrams in ~0.45 s and
    the binary in ~0.02 s, and live decoders are made while calls run."""
    import pocketsphinx

    with _LM_FILES_LOCK:
        if lm in _LM_FILES:
            _LM_FILES.move_to_end(lm)
            return _LM_FILES[lm]
        folder = Path(tempfile.mkdtemp(prefix="tessera-lm-"))
        arpa_path, dict_path = lm.write(folder)
        binary = folder / "domain.lm.bin"
        model = pocketsphinx.NGramModel(pocketsphinx.Config(loglevel="FATAL"), pocketsphinx.LogMath(), str(arpa_path))
        model.write(str(binary), pocketsphinx.NGramModel.str_to_type("bin"))
        arpa_path.unlink()
        _LM_FILES[lm] = (binary, dict_path)
        while len(_LM_FILES) > _LM_FILES_KEPT:
            evicted, _ = _LM_FILES.popitem(last=False)[1]
            shutil.rmtree(evicted.parent, ignore_errors=True)
        return binary, dict_path


@atexit.register
def _remove_lm_files() -> None:
    for binary, _ in _LM_FILES.values():
        shutil.rmtree(binary.parent, ignore_errors=True)


def acoustic_model_of(settings: DecoderSettings) -> Path:
    """The acoustic model folder ``settings`` names, or the configured one."""
    if settings.acoustic_model is not None:
        return Path(settings.acoustic_model)
    from services.customer_service.acoustic_model import acoustic_model_dir

    return acoustic_model_dir()


def _as_config(settings: DecoderSettings) -> dict[str, Any]:
    return {"beam": settings.beam, "wbeam": settings.wbeam, "pbeam": settings.pbeam, "lw": settings.lw,
            "wip": settings.wip,
            "maxhmmpf": settings.maxhmmpf, "topn": settings.topn, "ds": settings.ds, "fwdflat": settings.fwdflat,
            "bestpath": settings.bestpath, "dither": settings.dither}


# --- decoding off the GIL ----------------------------------------------------------------------------

@dataclass(frozen=True)
class KeyedLm:
    """A domain language model the decoder processes know by ``key``: one version of one tenant's
    model (a new version has a new key). A :class:`RecognizerPool` ships it to a decoder process
    the first time an utterance there needs it, not with every utterance."""

    key: str
    lm: DomainLm


class LmNotHeld(LookupError):
    """A decoder process was asked for a language model it does not hold (its pool ships it again
    with the next utterance that needs it)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"the decoder process holds no language model {self.key!r}"


@dataclass(frozen=True)
class AsrRequest:
    """One utterance to transcribe: int16 samples and their rate, decoded with ``lm`` (None: the
    model the pool was made with)."""

    samples: npt.NDArray[np.int16]
    sample_rate: int
    lm: KeyedLm | None = None


class StreamResampler:
    """8 -> 16 kHz (any rate -> :data:`DECODER_RATE`) upsampling of audio that arrives in pieces:
    the same polyphase filter as :func:`~.audio.resample`, with ``margin`` input samples of context
    carried between pieces so piece boundaries leave no edge artefacts."""

    def __init__(self, sample_rate: int, margin: int = 32) -> None:
        self.sample_rate = sample_rate
        self.margin = margin
        self._ratio = DECODER_RATE / sample_rate
        self._tail = np.zeros(0, np.int16)  # input kept for context: 2 x margin once warmed up
        self._started = False

    def push(self, samples: npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
        """Upsampled output for the input so far, less the last ``margin`` samples' worth (kept
        until the following input is known)."""
        if self.sample_rate == DECODER_RATE:
            return samples
        buffer = np.concatenate([self._tail, samples])
        if len(buffer) <= 2 * self.margin:
            self._tail = buffer
            return np.zeros(0, np.int16)
        first = self.margin if self._started else 0
        output = self._emit(buffer, first, len(buffer) - self.margin)
        self._tail, self._started = buffer[len(buffer) - 2 * self.margin:], True
        return output

    def flush(self) -> npt.NDArray[np.int16]:
        """The rest of the output (the input has ended)."""
        if self.sample_rate == DECODER_RATE or not len(self._tail):
            return np.zeros(0, np.int16)
        first = self.margin if self._started else 0
        output = self._emit(self._tail, first, len(self._tail))
        self._tail = np.zeros(0, np.int16)
        return output

    def _emit(self, buffer: npt.NDArray[np.int16], first: int, last: int) -> npt.NDArray[np.int16]:
        upsampled = resample(buffer, self.sample_rate, DECODER_RATE)
        return upsampled[round(first * self._ratio):round(last * self._ratio)]


TELEPHONE_CMN_PRIOR = "53.27,27.10,-39.79,44.40,-24.39,-15.95,0.49,-36.04,-5.71,-10.75,-9.59,-1.89,-10.50"
"""Initial cepstral mean of a live decoder: the mean over 40 lines of the domain text spoken by
espeak-ng through the simulated telephone line (8 kHz μ-law, upsampled), as decoded whole. A live
decode adapts its mean as it goes; from pocketsphinx's default prior the first seconds of an
utterance were lost (garbage words)."""


@dataclass(frozen=True)
class AsrStep:
    """One step of an utterance decoded while it is spoken (``key`` names the utterance):
    ``begin``, ``feed`` (``samples`` at ``sample_rate``), ``end`` (answers its :class:`Transcript`)
    or ``abort``. Steps of one key are applied in the order they are queued."""

    key: str
    kind: str
    samples: npt.NDArray[np.int16] | None = None
    sample_rate: int = 8000
    lm: KeyedLm | None = None
    """``begin`` only: the language model to decode the utterance with (None: the pool's own)."""


class _DecoderSet:
    """The decoders of one language model in a worker process: one for whole utterances and a free
    list for utterances decoded while spoken (made when first needed unless ``eager``)."""

    def __init__(self, lm: DomainLm | None, settings: DecoderSettings | None, *, eager: bool = False) -> None:
        self.lm, self.settings = lm, settings
        self._whole = Recognizer(lm, settings) if eager else None
        self.free: list[Recognizer] = [Recognizer(lm, settings)] if eager else []

    @property
    def whole(self) -> Recognizer:
        """The decoder of whole utterances."""
        if self._whole is None:
            self._whole = Recognizer(self.lm, self.settings)
        return self._whole

    def take(self) -> Recognizer:
        """A live decoder off the free list (a new one when none is free)."""
        return self.free.pop() if self.free else Recognizer(self.lm, self.settings)


@dataclass(frozen=True)
class _Delivery:
    """Language models a worker process drops, then installs, before it decodes what came with them."""

    drop: tuple[str, ...] = ()
    install: tuple[tuple[str, DomainLm], ...] = ()


@dataclass
class _OpenUtterance:
    recognizer: Recognizer
    resampler: StreamResampler
    owner: _DecoderSet
    audio_samples: int = 0
    decode_s: float = 0.0


class _WorkerDecoders:
    """The decoders of one worker process, per language model (the pool's own, and each
    :class:`KeyedLm` shipped here): one for whole utterances, and for utterances decoded while
    spoken a free list plus those open. The two uses never share a decoder: after a whole
    utterance (``full_utt``) a decoder crashed in its next live ``process_raw`` (pocketsphinx
    5.1.1), and a live decoder keeps its running cepstral mean from one caller to the next.

    Each language model has decoders of its own, not a named search in a shared decoder: a
    decoder has one dictionary, and ``Decoder.add_word`` puts the word into the LM of every
    n-gram search the decoder holds (measured with pocketsphinx 5.1.1: after adding tenant A's
    word, tenant B's LM gave it log-probability -5.7), which would carry one tenant's words into
    another's transcripts. A decoder costs about 7.5 MB and 22 ms to make.
    """

    def __init__(self, lm: DomainLm | None, settings: DecoderSettings | None) -> None:
        self.settings = settings
        self.default = _DecoderSet(lm, settings, eager=True)
        self.keyed: dict[str, _DecoderSet] = {}
        self.open: dict[str, _OpenUtterance] = {}

    def receive(self, delivery: _Delivery) -> None:
        """Drop and install language models as the pool says (it bounds how many are held)."""
        for key in delivery.drop:
            self.keyed.pop(key, None)  # open utterances keep their decoders until they end
        for key, lm in delivery.install:
            self.keyed[key] = _DecoderSet(lm, self.settings)

    def decoders(self, lm_key: str | None) -> _DecoderSet:
        """The decoders of the language model ``lm_key`` (None: the pool's own)."""
        if lm_key is None:
            return self.default
        decoders = self.keyed.get(lm_key)
        if decoders is None:
            raise LmNotHeld(lm_key)
        return decoders

    def step(self, step: AsrStep, lm_key: str | None = None) -> Transcript | None:
        if step.kind == "begin":
            self.abort(step.key)
            owner = self.decoders(lm_key)
            recognizer = owner.take()
            # Every utterance starts from the same prior: nothing of one caller (one tenant) carries
            # over to the next through the decoder's running mean.
            recognizer.decoder.set_cmn(TELEPHONE_CMN_PRIOR)
            recognizer.decoder.start_utt()
            self.open[step.key] = _OpenUtterance(recognizer, StreamResampler(step.sample_rate), owner)
            return None
        utterance = self.open.get(step.key)
        if utterance is None:
            raise KeyError(f"no utterance {step.key!r} is being decoded (begin it first)")
        if step.kind == "feed" and step.samples is not None:
            self._decode(utterance, utterance.resampler.push(step.samples), full=False)
            utterance.audio_samples += len(step.samples)
            return None
        if step.kind == "end":
            del self.open[step.key]
            self._decode(utterance, utterance.resampler.flush(), full=False)
            started = time.perf_counter()
            utterance.recognizer.decoder.end_utt()
            hypothesis = utterance.recognizer.decoder.hyp()
            utterance.decode_s += time.perf_counter() - started
            utterance.owner.free.append(utterance.recognizer)
            return Transcript(text=hypothesis.hypstr if hypothesis is not None else "",
                              audio_s=utterance.audio_samples / step.sample_rate, decode_s=utterance.decode_s)
        if step.kind == "abort":
            self.abort(step.key)
            return None
        raise ValueError(f"unknown ASR step {step.kind!r}")

    def abort(self, key: str) -> None:
        utterance = self.open.pop(key, None)
        if utterance is not None:
            utterance.recognizer.decoder.end_utt()
            utterance.owner.free.append(utterance.recognizer)

    @staticmethod
    def _decode(utterance: _OpenUtterance, audio: npt.NDArray[np.int16], *, full: bool) -> None:
        if not len(audio):
            return
        started = time.perf_counter()
        utterance.recognizer.decoder.process_raw(np.ascontiguousarray(audio, dtype=np.int16).tobytes(),
                                                 no_search=False, full_utt=full)
        utterance.decode_s += time.perf_counter() - started


_worker_decoders: _WorkerDecoders | None = None


def _start_worker(lm: DomainLm | None, settings: DecoderSettings | None, parent_pid: int) -> None:
    global _worker_decoders
    end_with_parent(parent_pid, signal.SIGKILL)  # a decoder never outlives the server that spawned it
    _worker_decoders = _WorkerDecoders(lm, settings)


def _in_worker() -> _WorkerDecoders:
    if _worker_decoders is None:
        raise RuntimeError("this worker process has no decoders")
    return _worker_decoders


def _transcribe_in_worker(samples: npt.NDArray[np.int16], sample_rate: int, lm_key: str | None,
                          delivery: _Delivery) -> Transcript:
    decoders = _in_worker()
    decoders.receive(delivery)
    return decoders.decoders(lm_key).whole.transcribe(samples, sample_rate)


def _steps_in_worker(steps: list[AsrStep], lm_keys: list[str | None],
                     delivery: _Delivery) -> list[Transcript | None | BaseException]:
    decoders = _in_worker()
    decoders.receive(delivery)
    answers: list[Transcript | None | BaseException] = []
    for step, lm_key in zip(steps, lm_keys, strict=True):
        try:
            answers.append(decoders.step(step, lm_key))
        except Exception as exc:  # this step fails alone; the utterances of the others go on
            answers.append(exc)
    return answers


def _worker_pid() -> int:
    return multiprocessing.current_process().pid or 0


class RecognizerPool:
    """Decoders in ``processes`` worker processes (spawned), each process with its own decoders.

    pocketsphinx holds the GIL for the whole of ``process_raw`` (measured: a Python thread got ~1 %
    of its speed while another thread decoded), so a decoder in a thread of the serving process
    would stall its event loop for the length of every decode. In worker processes the loop keeps
    running, and ``processes`` utterances decode at once on as many cores.

    Whole utterances go to the processes in turn; the steps of an utterance decoded while it is
    spoken (:class:`AsrStep`) all go to the process its key hashes to, which keeps its decoder.

    An item may name a :class:`KeyedLm` (a tenant's model). The pool ships it with the first work
    that needs it in a process, and keeps per process the keys it holds, least recently used
    first: past ``max_lms`` the oldest is dropped there (with the same work), so a process holds at
    most ``max_lms`` of them besides its own (more only while one batch needs more at once).
    """

    backend_name = "pocketsphinx-processes"

    def __init__(self, lm: DomainLm | None = None, settings: DecoderSettings | None = None, *,
                 processes: int = 1, max_lms: int = 8) -> None:
        if processes < 1 or max_lms < 1:
            raise ValueError("processes and max_lms must be >= 1")
        context = multiprocessing.get_context("spawn")
        self._executors = [ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_start_worker,
                                               initargs=(lm, settings, os.getpid())) for _ in range(processes)]
        self._finalizer = weakref.finalize(self, _shutdown, list(self._executors))
        self.worker_pids = sorted(executor.submit(_worker_pid).result() for executor in self._executors)
        self.max_lms = max_lms
        self._held: list[OrderedDict[str, None]] = [OrderedDict() for _ in self._executors]
        self._lock = threading.Lock()
        self._turn = 0
        self.shipped = 0
        """How many times a language model was shipped to a process (once per version and process,
        again only after it was dropped there)."""

    @property
    def processes(self) -> int:
        """How many decoder processes there are."""
        return len(self._executors)

    def held(self, process: int) -> list[str]:
        """The keys of the language models process number ``process`` holds, least recently used first."""
        with self._lock:
            return list(self._held[process])

    def _slot_for(self, key: str) -> int:
        return zlib.crc32(key.encode()) % len(self._executors)

    def _deliver(self, slot: int, lms: Sequence[KeyedLm | None]) -> _Delivery:
        """What process ``slot`` must drop and install before work using ``lms``; notes it as held."""
        held = self._held[slot]
        used = {lm.key for lm in lms if lm is not None}
        install: dict[str, DomainLm] = {}
        for lm in lms:
            if lm is None:
                continue
            if lm.key not in held:
                install[lm.key] = lm.lm
            held[lm.key] = None
            held.move_to_end(lm.key)
        drop = [key for key in held if key not in used][:max(0, len(held) - self.max_lms)]
        for key in drop:
            del held[key]
        self.shipped += len(install)
        return _Delivery(tuple(drop), tuple(install.items()))

    def _forget(self, slot: int, answer: Any) -> None:
        """A process that lost a language model gets it again with the next work that needs it."""
        if isinstance(answer, LmNotHeld):
            self._held[slot].pop(answer.key, None)

    def run(self, items: Sequence[AsrRequest | AsrStep]) -> list[Transcript | None | BaseException]:
        """Decode whole utterances and apply streaming steps in the worker processes, in parallel
        across processes and in order within one; answers in order (an exception for an item that
        failed)."""
        steps: dict[int, list[int]] = defaultdict(list)
        futures: dict[int, tuple[int, Future[Any]]] = {}
        batches: dict[int, Future[Any]] = {}
        with self._lock:  # the held-models bookkeeping follows the order work is queued in
            for index, item in enumerate(items):
                if isinstance(item, AsrStep):
                    steps[self._slot_for(item.key)].append(index)
                    continue
                slot = self._turn % len(self._executors)
                self._turn += 1
                futures[index] = (slot, self._executors[slot].submit(
                    _transcribe_in_worker, item.samples, item.sample_rate, item.lm.key if item.lm else None,
                    self._deliver(slot, [item.lm])))
            for slot, indices in steps.items():
                batch = [cast(AsrStep, items[i]) for i in indices]
                lms = [step.lm if step.kind == "begin" else None for step in batch]
                batches[slot] = self._executors[slot].submit(
                    _steps_in_worker, [dataclasses.replace(step, lm=None) for step in batch],
                    [lm.key if lm is not None else None for lm in lms], self._deliver(slot, lms))
        answers: list[Transcript | None | BaseException] = [None] * len(items)
        for index, (_, future) in futures.items():
            try:
                answers[index] = future.result()
            except Exception as exc:  # this utterance fails alone
                answers[index] = exc
        for slot, indices in steps.items():
            for index, answer in zip(indices, batches[slot].result(), strict=True):
                answers[index] = answer
        with self._lock:
            for index, answer in enumerate(answers):
                item = items[index]
                self._forget(self._slot_for(item.key) if isinstance(item, AsrStep) else futures[index][0], answer)
        return answers

    def close(self) -> None:
        """Stop the worker processes."""
        self._finalizer()


def _shutdown(executors: list[ProcessPoolExecutor]) -> None:
    # Waiting lets each executor drop its queues here and now, so their semaphores are unlinked: uvicorn
    # ends on SIGTERM by raising the signal again once the app has shut down, and that skips atexit
    # (the resource tracker then reported 10 leaked semaphores).
    for executor in executors:
        executor.shutdown(wait=True, cancel_futures=True)


# --- serving through the runtime ------------------------------------------------------------------

STEP_KINDS = ("begin", "feed", "end", "abort")


def check_request(request: Any) -> AsrRequest | AsrStep:
    """Validate one runtime item (raises the runtime's ``BadInput``, a 422 at the edge)."""
    from model_runtime import BadInput

    if isinstance(request, AsrStep):
        if request.kind not in STEP_KINDS or not request.key:
            raise BadInput(f"an ASR step is one of {', '.join(STEP_KINDS)} with a key, got {request.kind!r}")
    elif not isinstance(request, AsrRequest):
        raise BadInput(f"expected an AsrRequest or AsrStep, got {type(request).__name__}")
    if request.lm is not None and not isinstance(request.lm, KeyedLm):
        raise BadInput(f"an ASR item's language model is a KeyedLm, got {type(request.lm).__name__}")
    if request.samples is None:
        if isinstance(request, AsrRequest):
            raise BadInput("the utterance has no samples")
        return request
    if not MIN_SAMPLE_RATE <= request.sample_rate <= MAX_SAMPLE_RATE:
        raise BadInput(f"sample rate {request.sample_rate} Hz is outside {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz")
    if request.samples.ndim != 1 or request.samples.dtype != np.int16:
        raise BadInput(f"expected mono int16 samples, got {request.samples.dtype} of shape {request.samples.shape}")
    if isinstance(request, AsrRequest) and not len(request.samples):
        raise BadInput("the utterance has no samples")
    return request


def _raise_failed(answer: Any) -> Any:
    """A step the worker could not apply fails alone (``finalize``: per item)."""
    if isinstance(answer, BaseException):
        raise answer
    return answer


def asr_model_spec(name: str = "cs-asr", lm: DomainLm | None = None, settings: DecoderSettings | None = None,
                   *, processes: int = 1, max_lms: int = 8, max_queue: int = 1024,
                   timeout_s: float | None = 30.0) -> ModelSpec:
    """ASR as a model of the shared runtime. Items: :class:`AsrRequest` (a whole utterance, answered
    with its :class:`Transcript`) or :class:`AsrStep` (an utterance decoded while it is spoken:
    ``begin`` / ``feed`` answer ``None``, ``end`` its :class:`Transcript`). An item's
    :class:`KeyedLm` (a tenant's model) replaces ``lm`` for that utterance; each decoder process
    holds at most ``max_lms`` of them (:class:`RecognizerPool`).

    The model object is a :class:`RecognizerPool`: the runtime's worker thread hands each batch to
    ``processes`` decoder processes and waits without holding the GIL. Steps change a decoder's
    state, so a failed batch is not rerun item by item (``isolate_failures`` off); a step that
    fails in its worker fails alone.
    """
    from model_runtime import ModelSpec

    # resolved here, once: a missing or mismatched acoustic model fails the start, not each decoder
    acoustic = acoustic_model_of(settings or DecoderSettings())
    settings = dataclasses.replace(settings or DecoderSettings(), acoustic_model=str(acoustic))

    def load(_: LoadContext) -> RecognizerPool:
        return RecognizerPool(lm, settings, processes=processes, max_lms=max_lms)

    warmup = AsrRequest(np.zeros(DECODER_RATE // 4, np.int16), DECODER_RATE)
    version = f"pocketsphinx-5.1.1+{acoustic.name}" + ("+domain" if lm is not None else "")
    return ModelSpec(name=name, version=version,
                     loader=load, run_batch=RecognizerPool.run, prepare=check_request, prepare_in="loop",
                     finalize=_raise_failed, isolate_failures=False, max_batch_size=64, max_queue=max_queue,
                     timeout_s=timeout_s, uses_torch=False, warmup_items=[warmup], release=RecognizerPool.close)
