"""pocketsphinx's en-US acoustic model adapted to the simulated telephone line (MAP adaptation).

The wheel's model was trained on wide-band read speech; calls arrive as 8 kHz μ-law. Adaptation
re-estimates the model's Gaussian means and variances by maximum a posteriori from speech heard
through the line, as CMU Sphinx's own tutorial ("Adapting the default acoustic model") does:

1. **Speech**: :data:`ADAPTATION_VOICES`, the six espeak-ng voices that the WER measurement does
   not use (it speaks with ``VOICES[0:4]``), say the knowledge-base articles and the agents' script
   lines (:func:`adaptation_phrases`: templates the measurement's sentences are never drawn from)
   with every emotion's prosody, through :func:`~.simulate.telephone_band`, upsampled to 16 kHz
   as the decoder is fed.
2. **Features**: sphinxbase's ``sphinx_fe`` with the model's own front-end parameters.
3. **Statistics**: sphinxtrain's ``bw`` (forward-backward over each transcript). The wheel ships
   the mixture weights only in pocketsphinx's quantised ``sendump``; :func:`sendump_to_mixture_weights`
   expands them into the ``mixture_weights`` file ``bw`` reads.
4. **MAP**: ``map_adapt`` writes new ``means`` and ``variances``; the artifact
   (``models/cs/asr/<version>``) holds only those two files and the digests of the wheel files
   they go with. :func:`acoustic_model_dir` assembles a decodable model from both at run time.

The speech is SIMULATED, so the adaptation is to espeak-ng through the simulated line: it is what
the WER measurement on simulated calls gains from, and the model card says so. A check on real
speech (RAVDESS actors through the same line, none used here) shows whether real callers lose.

sphinxtrain, sphinx_fe and pocketsphinx_mdef_convert (Debian ``sphinxtrain``, ``sphinxbase-utils``,
``pocketsphinx``) are needed only to rebuild the artifact (``tessera train cs acoustic``); serving
needs the pocketsphinx wheel alone.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from model_runtime.artifacts import sha256_file
from services.customer_service import simulate
from services.customer_service.asr import DECODER_RATE, SIMULATED_KB_ARTICLES, cmudict, model_dir, sentence_words
from services.customer_service.audio import resample

LOGGER = logging.getLogger(__name__)

ARTIFACT_NAME = "asr"
MODELS_SUBDIR = "cs"
STOCK = "stock"
"""The setting that decodes with the wheel's model as it is."""
ADAPTED_FILES = ("means", "variances")
"""What MAP changes and the artifact holds."""
BASE_FILES = ("mdef", "sendump", "transition_matrices", "noisedict", "feat.params")
"""The wheel's files an adapted model is assembled with (their digests are in the manifest)."""
ADAPTATION_VOICES = tuple(voice.name for voice in simulate.VOICES[4:])
"""Voices the WER measurement and development sets never speak with (they use ``VOICES[0:4]``)."""
SPHINXTRAIN_DIR = Path("/usr/lib/sphinxtrain")
_FRONT_END_KEYS = ("-lowerf", "-upperf", "-nfilt", "-transform", "-lifter", "-remove_noise")
_FEATURE_KEYS = ("-feat", "-svspec", "-agc", "-cmn")
"""What ``bw`` needs to compute the model's dynamic features from the cepstra."""
_S3_BYTE_ORDER_MAGIC = 0x11223344


class AcousticModelError(RuntimeError):
    """An acoustic model that cannot be built or assembled; the message says why and what to do."""


# --- the wheel's mixture weights ------------------------------------------------------------------

def read_sendump(path: Path) -> npt.NDArray[np.float64]:
    """Mixture weights from pocketsphinx's quantised ``sendump``: ``(senones, streams, densities)``,
    each senone's weights normalised to sum to 1.

    The file holds length-prefixed header strings (ending with an empty one), then, with
    ``cluster_count 0``, the densities and senones as two int32, then one byte per weight laid out
    ``[stream][density][senone]``: ``-log_1.0001(weight) >> mixw_shift``.
    """
    data = path.read_bytes()
    order = "<" if 0 < struct.unpack_from("<I", data, 0)[0] <= 65536 else ">"
    position, header = 0, {}
    while True:
        (length,) = struct.unpack_from(f"{order}I", data, position)
        position += 4
        if length == 0:
            break
        text = data[position:position + length].rstrip(b"\0").decode("ascii", "replace")
        position += length
        key, _, value = text.partition(" ")
        header[key] = value
    if int(header.get("cluster_count", "0") or 0) != 0:
        raise AcousticModelError(f"{path}: clustered sendump files are not supported")
    densities, senones = struct.unpack_from(f"{order}II", data, position)
    position += 8
    streams, shift = int(header.get("feature_count", "1")), int(header.get("mixw_shift", "10"))
    quantised = np.frombuffer(data, np.uint8, streams * densities * senones, position)
    weights = np.power(1.0001, -(quantised.astype(np.float64) * (1 << shift)))
    weights = weights.reshape(streams, densities, senones).transpose(2, 0, 1)
    return weights / weights.sum(axis=2, keepdims=True)


def write_s3_array(path: Path, array: npt.NDArray[Any]) -> None:
    """A 3-D float32 array in Sphinx-III's binary parameter format (``s3`` header, byte-order
    magic, dimensions, count, data), as ``bw`` reads ``mixture_weights``."""
    head = b"s3\nversion 1.0\n"
    padding = b" " * ((4 - (len(head) + len(b"endhdr\n")) % 4) % 4)
    first, second, third = array.shape
    with path.open("wb") as out:
        out.write(head + padding + b"endhdr\n")
        out.write(struct.pack("<iIIII", _S3_BYTE_ORDER_MAGIC, first, second, third, array.size))
        out.write(np.ascontiguousarray(array, dtype="<f4").tobytes())


def sendump_to_mixture_weights(sendump: Path, output: Path) -> tuple[int, int, int]:
    """Write the ``mixture_weights`` file ``bw`` needs from a ``sendump``; returns its shape."""
    weights = read_sendump(sendump)
    write_s3_array(output, weights)
    return weights.shape  # type: ignore[return-value]


# --- the adaptation corpus -------------------------------------------------------------------------

@dataclass(frozen=True)
class AdaptationPlan:
    """What the adaptation speaks and how."""

    voices: tuple[str, ...] = ADAPTATION_VOICES
    passes: int = 6
    """Each pass speaks every phrase once, the voice rotating by phrase and pass (6 passes with 6
    voices: every voice says every phrase)."""
    seed: int = 3
    phrases: int | None = None
    """Only the first this many phrases (tests); None: all."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.voices) - set(simulate.VOICES_BY_NAME))
        if unknown or not self.voices:
            raise ValueError(f"unknown or no voices: {unknown or 'none given'}")
        measured = {voice.name for voice in simulate.VOICES[:4]}
        if measured & set(self.voices):
            raise ValueError(f"voices {sorted(measured & set(self.voices))} speak the WER measurement")
        if self.passes < 1:
            raise ValueError(f"passes must be >= 1, got {self.passes}")


def adaptation_phrases(seed: int = 3) -> list[list[str]]:
    """The knowledge-base articles and agent script lines (slots filled from ``seed``) as phrases of
    words cmudict knows: split at sentence ends and commas (``bw`` aligns a transcript without
    optional pauses, so long sentences with pauses fail to align). Phrases equal to a sentence of
    the WER measurement or development sets are left out."""
    from services.customer_service.evaluation import development_sets, measurement_sets

    rng = np.random.default_rng(seed)
    texts = [*SIMULATED_KB_ARTICLES, *(line for lines in simulate.AGENT_LINES.values() for line in lines)]
    excluded = {tuple(words) for sets in (measurement_sets(), development_sets()) for sentences in sets.values()
                for sentence in sentences for words in sentence_words(sentence)}
    known = cmudict()
    phrases: list[list[str]] = []
    for text in texts:
        for part in simulate.fill_slots(text, rng).split(","):
            for words in sentence_words(part):
                if tuple(words) not in excluded and all(word in known for word in words):
                    phrases.append(words)
    return phrases


@dataclass
class Corpus:
    """Utterances written for sphinxtrain: ``<folder>/wav/<id>.wav`` and their transcripts."""

    folder: Path
    ids: list[str] = field(default_factory=list)
    transcripts: list[list[str]] = field(default_factory=list)
    audio_s: float = 0.0

    def write_lists(self) -> tuple[Path, Path]:
        """The control file (ids) and transcription file sphinxtrain reads."""
        control, transcription = self.folder / "adapt.fileids", self.folder / "adapt.transcription"
        control.write_text("".join(f"{utterance}\n" for utterance in self.ids))
        transcription.write_text("".join(f"<s> {' '.join(words)} </s> ({utterance})\n"
                                         for utterance, words in zip(self.ids, self.transcripts, strict=True)))
        return control, transcription


def synthesize_corpus(plan: AdaptationPlan, folder: Path) -> Corpus:
    """Speak the plan's phrases through the simulated telephone line into ``folder`` (16 kHz WAV)."""
    phrases = adaptation_phrases(plan.seed)[:plan.phrases]
    rng = np.random.default_rng(plan.seed)
    voices = [simulate.VOICES_BY_NAME[name] for name in plan.voices]
    corpus = Corpus(folder)
    (folder / "wav").mkdir(parents=True, exist_ok=True)
    for repeat in range(plan.passes):
        for index, words in enumerate(phrases):
            voice = voices[(index + repeat) % len(voices)]
            emotion = simulate.EMOTIONS[int(rng.integers(len(simulate.EMOTIONS)))]
            samples, rate = simulate.synthesize(" ".join(words), voice, simulate.draw_prosody(emotion, voice, rng))
            line = resample(simulate.telephone_band(samples, rate), 8000, DECODER_RATE)
            utterance = f"u{len(corpus.ids):05d}"
            _write_wav(folder / "wav" / f"{utterance}.wav", line)
            corpus.ids.append(utterance)
            corpus.transcripts.append(words)
            corpus.audio_s += len(line) / DECODER_RATE
    return corpus


def _write_wav(path: Path, samples: npt.NDArray[np.int16]) -> None:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(DECODER_RATE)
        out.writeframes(np.ascontiguousarray(samples, dtype="<i2").tobytes())


# --- sphinxtrain ------------------------------------------------------------------------------------

def _tool(name: str) -> str:
    path = shutil.which(name) or (str(SPHINXTRAIN_DIR / name) if (SPHINXTRAIN_DIR / name).exists() else None)
    if path is None:
        raise AcousticModelError(f"{name} is not installed (Debian packages sphinxtrain, sphinxbase-utils and "
                                 "pocketsphinx; scripts/ensure_services.sh installs them)")
    return path


def _run(name: str, *arguments: str | Path, log: Path) -> str:
    command = [_tool(name), *map(str, arguments)]
    with log.open("w") as out:
        completed = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    text = log.read_text(errors="replace")
    if completed.returncode != 0:
        tail = "\n".join(text.splitlines()[-5:])
        raise AcousticModelError(f"{name} failed (exit {completed.returncode}); the end of {log}:\n{tail}")
    return text


def front_end_arguments(base: Path) -> list[str]:
    """The feature-extraction parameters of the model's ``feat.params`` that ``sphinx_fe`` takes."""
    return _model_parameters(base, _FRONT_END_KEYS)


def _model_parameters(base: Path, keys: Sequence[str]) -> list[str]:
    """``key value`` pairs of the model's ``feat.params`` whose key is in ``keys``, as arguments."""
    arguments: list[str] = []
    for line in (base / "feat.params").read_text().splitlines():
        key, _, value = line.strip().partition(" ")
        if key in keys:
            arguments += [key, value.strip()]
    return arguments


@dataclass(frozen=True)
class AdaptationResult:
    """Where MAP's means and variances are, and how much speech they were estimated from."""

    folder: Path
    utterances: int
    aligned: int
    audio_s: float
    seconds: float


def adapt(plan: AdaptationPlan, work: Path) -> AdaptationResult:
    """Run the whole adaptation in ``work``; the adapted ``means`` and ``variances`` land in
    ``work/adapted``."""
    started = time.perf_counter()
    base = _prepare_base(work / "base")
    corpus = synthesize_corpus(plan, work / "corpus")
    control, transcription = corpus.write_lists()
    features = work / "mfc"
    features.mkdir(exist_ok=True)
    _run("sphinx_fe", *front_end_arguments(base), "-samprate", str(DECODER_RATE), "-c", control,
         "-di", corpus.folder / "wav", "-do", features, "-ei", "wav", "-eo", "mfc", "-mswav", "yes",
         log=work / "sphinx_fe.log")
    accumulators = work / "accumulators"
    accumulators.mkdir(exist_ok=True)
    log = _run("bw", "-hmmdir", base, "-moddeffn", base / "mdef.txt", "-ts2cbfn", ".ptm.",
               *_model_parameters(base, _FEATURE_KEYS), "-dictfn", model_dir() / "cmudict-en-us.dict",
               "-fdictfn", base / "noisedict", "-ctlfn", control, "-lsnfn", transcription, "-cepdir", features,
               "-accumdir", accumulators, log=work / "bw.log")
    ignored = log.count(" ignored")
    adapted = work / "adapted"
    adapted.mkdir(exist_ok=True)
    _run("map_adapt", "-moddeffn", base / "mdef.txt", "-ts2cbfn", ".ptm.", "-meanfn", base / "means",
         "-varfn", base / "variances", "-mixwfn", base / "mixture_weights", "-tmatfn", base / "transition_matrices",
         "-accumdir", accumulators, "-mapmeanfn", adapted / "means", "-mapvarfn", adapted / "variances",
         "-mapmixwfn", work / "unused_mixture_weights", "-maptmatfn", work / "unused_transition_matrices",
         log=work / "map_adapt.log")
    return AdaptationResult(adapted, len(corpus.ids), len(corpus.ids) - ignored, corpus.audio_s,
                            time.perf_counter() - started)


def _prepare_base(folder: Path) -> Path:
    """The wheel's model with what sphinxtrain reads beside it: a text ``mdef.txt`` and the
    ``mixture_weights`` expanded from ``sendump``."""
    stock = model_dir() / "en-us"
    folder.mkdir(parents=True, exist_ok=True)
    for name in (*BASE_FILES, *ADAPTED_FILES):
        shutil.copyfile(stock / name, folder / name)
    _run("pocketsphinx_mdef_convert", "-text", folder / "mdef", folder / "mdef.txt", log=folder / "mdef.log")
    sendump_to_mixture_weights(folder / "sendump", folder / "mixture_weights")
    return folder


# --- serving: the adapted model assembled from the wheel and the artifact ----------------------

def artifact_dir(version: str, models_dir: Path | None = None) -> Path:
    """``<models>/cs/asr/<version>``."""
    if models_dir is None:
        from shared.config import get_settings

        models_dir = get_settings().models_dir
    return models_dir / MODELS_SUBDIR / ARTIFACT_NAME / version


def acoustic_model_dir(version: str | None = None, *, models_dir: Path | None = None,
                       cache_dir: Path | None = None, stock_dir: Path | None = None) -> Path:
    """The folder pocketsphinx's ``hmm`` should name for the configured acoustic model
    (``TESSERA_CS_ACOUSTIC_MODEL``; ``stock``: the wheel's own).

    An adapted version is assembled once under ``<data>/cache/cs-asr``: the wheel's files,
    checked against the digests the artifact was built with (another pocketsphinx model would not
    fit its means), and the artifact's own files, checked by its manifest."""
    from model_runtime.artifacts import ArtifactError, load_manifest
    from shared.config import get_settings

    settings = get_settings()
    version = version or settings.cs_acoustic_model
    stock = stock_dir or model_dir() / "en-us"
    if version == STOCK:
        return stock
    source = artifact_dir(version, models_dir)
    try:
        manifest = load_manifest(source)
    except (ArtifactError, OSError) as error:
        raise AcousticModelError(f"acoustic model {version!r}: {error} (TESSERA_CS_ACOUSTIC_MODEL=stock decodes "
                                 "with pocketsphinx's own)") from error
    base_digests: dict[str, str] = manifest.extra["base_files"]
    for name, digest in base_digests.items():
        if sha256_file(stock / name) != digest:
            raise AcousticModelError(f"acoustic model {version!r} was adapted from another pocketsphinx model "
                                     f"({name} differs from {stock / name}); rebuild it with `tessera train cs "
                                     "acoustic` or set TESSERA_CS_ACOUSTIC_MODEL=stock")
    key = hashlib.sha256(json.dumps(manifest.files, sort_keys=True).encode()).hexdigest()[:16]
    target = (cache_dir or settings.data_dir / "cache" / "cs-asr") / f"{version}-{key}"
    if not target.is_dir():
        _assemble(target, stock, source)
    return target


def _assemble(target: Path, stock: Path, source: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    for name in BASE_FILES:
        shutil.copyfile(stock / name, staging / name)
    for name in ADAPTED_FILES:
        shutil.copyfile(source / name, staging / name)
    try:
        os.rename(staging, target)
    except OSError:  # another process assembled it first: same content
        shutil.rmtree(staging, ignore_errors=True)
        if not target.is_dir():
            raise


# --- measurement and the artifact -------------------------------------------------------------------

def measure(models: dict[str, Path], *, sets: dict[str, Sequence[str]] | None = None,
            real: bool = True) -> list[dict[str, Any]]:
    """WER of each acoustic model (name -> model folder) with the generic and the domain language
    model on simulated telephone speech (default: the measurement sets), and with the generic one on
    the real RAVDESS clips through the same line when ``real`` and the data set is present."""
    from services.customer_service.evaluation import measure_asr

    rows = []
    for name, folder in models.items():
        for score in measure_asr(sets, acoustic_model=folder):
            rows.append({"acoustic_model": name, **score.as_dict()})
        if real:
            row = measure_real_speech(folder)
            if row is not None:
                rows.append({"acoustic_model": name, **row})
    return rows


def measure_real_speech(folder: Path) -> dict[str, Any] | None:
    """WER on the RAVDESS subset (24 actors, two sentences) through the simulated telephone line with
    the generic language model; None when the data set is absent."""
    from services.customer_service.asr import DecoderSettings, Recognizer
    from services.customer_service.datasets import DatasetError, load_acted_speech
    from services.customer_service.evaluation import word_errors

    try:
        clips = load_acted_speech(telephone=True, sample_rate=DECODER_RATE)
    except DatasetError:
        return None
    recognizer = Recognizer(None, DecoderSettings(lw=6.5, acoustic_model=str(folder)))
    texts = []
    for clip in clips:
        samples = np.clip(np.round(clip.samples * 32768.0), -32768, 32767).astype(np.int16)
        texts.append(recognizer.transcribe(samples, DECODER_RATE).text)
    errors = word_errors([clip.text for clip in clips], texts)
    return {"set": "ravdess_real", "lm": "generic", "sentences": errors.utterances,
            "reference_words": errors.reference_words, "wer": round(errors.wer, 3)}


def write_artifact(result: AdaptationResult, plan: AdaptationPlan, directory: Path, rebuild: str,
                   measured: list[dict[str, Any]], *, force: bool = False) -> Path:
    """Seal ``means`` and ``variances`` with a manifest (the wheel files' digests, the plan, the
    measured WER) and a model card."""
    from model_runtime.artifacts import save_artifact

    if directory.exists():
        if not force:
            raise FileExistsError(f"{directory} exists (pass --force to replace it)")
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    for name in ADAPTED_FILES:
        shutil.copyfile(result.folder / name, directory / name)
    stock = model_dir() / "en-us"
    metrics = {f"wer_{row['set']}_{row['lm']}_{row['acoustic_model']}": row["wer"] for row in measured}
    extra = {"base_files": {name: sha256_file(stock / name) for name in BASE_FILES},
             "pocketsphinx": importlib.metadata.version("pocketsphinx"), "plan": asdict(plan),
             "corpus": {"utterances": result.utterances, "aligned": result.aligned,
                        "audio_s": round(result.audio_s, 1)},
             "seconds": round(result.seconds, 1), "measured": measured}
    manifest = save_artifact(directory, name="cs-asr-acoustic", version=directory.name, framework="pocketsphinx",
                             metrics=metrics, data=DATA_TEXT, rebuild_command=rebuild, extra=extra)
    (directory / "MODEL_CARD.md").write_text(model_card(manifest.version, extra, rebuild))
    return directory


DATA_TEXT = ("SIMULATED speech: espeak-ng voices " + ", ".join(ADAPTATION_VOICES) + " (none of them speaks the WER "
             "measurement) saying the simulated knowledge base and the agents' script lines, through the simulated "
             "telephone line (8 kHz μ-law), upsampled to 16 kHz")


def model_card(version: str, extra: dict[str, Any], rebuild: str) -> str:
    """The card: what was adapted from what, the measured WER beside the stock model, the caveats."""
    rows = "\n".join(f"| {row['set']} | {row['lm']} | {row['acoustic_model']} | {row['sentences']} | "
                     f"{100 * row['wer']:.1f} |" for row in extra["measured"])
    corpus = extra["corpus"]
    return f"""# cs-asr-acoustic {version}

pocketsphinx {extra['pocketsphinx']}'s en-US acoustic model (the wheel's, `model/en-us/en-us`) with its Gaussian
means and variances re-estimated by MAP (sphinxtrain `bw` + `map_adapt`) from SIMULATED telephone speech.
Mixture weights, transition matrices and the model definition are the wheel's, unchanged; this artifact holds
`means` and `variances` only and is assembled with the wheel's files at run time (their sha256 are in the
manifest: another pocketsphinx model is refused).

## Data
{DATA_TEXT}. {corpus['utterances']} utterances ({corpus['audio_s'] / 60:.1f} min), {corpus['aligned']} aligned by `bw`
(the others are skipped by it). No real speech, no tenant's data.

## Measured WER (%)
Sets: `in_script`/`held_out` are the WER measurement's SIMULATED sentences spoken by the four voices the
adaptation never heard; `ravdess_real` is real acted speech (RAVDESS, 24 actors, two sentences) through the same
simulated line, a check that real speakers do not lose.

| set | language model | acoustic model | utterances | WER |
|---|---|---|---|---|
{rows}

## Limits
The adaptation is to espeak-ng's voices and the simulated line: the gains on the simulated sets say little
about real callers, whose speech the `ravdess_real` row samples narrowly (two sentences, and pocketsphinx hears
it badly with either model). Differences of about 2 points are within the decoder's dither.

## Rebuild
`{rebuild}` (needs Debian's `sphinxtrain`, `sphinxbase-utils` and `pocketsphinx`; the adaptation takes about
{max(1, round(extra['seconds'] / 60))} min, the WER measurement after it about 5 min)
"""


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``tessera train cs acoustic``."""
    parser = argparse.ArgumentParser(prog="tessera train cs acoustic", description=__doc__.splitlines()[0])
    parser.add_argument("--version", default="v1")
    parser.add_argument("--passes", type=int, default=AdaptationPlan.passes)
    parser.add_argument("--seed", type=int, default=AdaptationPlan.seed)
    parser.add_argument("--work-dir", type=Path, help="keep the corpus and sphinxtrain's files here")
    parser.add_argument("--output", type=Path, help="models folder (default: settings' models_dir)")
    parser.add_argument("--sets", choices=["development", "measurement"], default="measurement",
                        help="the sentence sets the artifact's WER is measured on")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--card-only", action="store_true", help="rewrite the model card from the manifest")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Adapt, measure against the stock model, seal ``<models>/cs/asr/<version>``."""
    from services.customer_service.evaluation import development_sets, measurement_sets

    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(arguments)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.card_only:
        return rewrite_card(artifact_dir(args.version, args.output))
    plan = AdaptationPlan(passes=args.passes, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="tessera-acoustic-") as scratch:
        work = args.work_dir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        result = adapt(plan, work)
        LOGGER.info("adapted on %d utterances (%d aligned, %.1f min) in %.0f s", result.utterances, result.aligned,
                    result.audio_s / 60, result.seconds)
        sets = development_sets() if args.sets == "development" else measurement_sets()
        candidate = _staged_model(result.folder, work / "staged")
        measured = measure({STOCK: model_dir() / "en-us", "adapted": candidate}, sets=sets)
        directory = artifact_dir(args.version, args.output)
        rebuild = "tessera train cs acoustic " + " ".join(arguments)
        write_artifact(result, plan, directory, rebuild.strip(), measured, force=args.force)
    print(directory)
    for row in measured:
        print(f"{row['set']:>13} {row['lm']:>8} {row['acoustic_model']:>8} WER {100 * row['wer']:.1f}")
    return 0


def rewrite_card(directory: Path) -> int:
    """Write the model card again from the sealed manifest (after a change to the card's text)."""
    from model_runtime.artifacts import MODEL_CARD_NAME, load_manifest

    manifest = load_manifest(directory, verify=False)
    (directory / MODEL_CARD_NAME).write_text(model_card(manifest.version, manifest.extra, manifest.rebuild_command))
    print(directory / MODEL_CARD_NAME)
    return 0


def _staged_model(adapted: Path, folder: Path) -> Path:
    """A decodable model from the wheel's files and freshly adapted means and variances."""
    shutil.rmtree(folder, ignore_errors=True)
    _assemble(folder, model_dir() / "en-us", adapted)
    return folder
