"""The emotion model's data: the real acted speech and the simulated calls, with speaker-independent splits.

- **Real acted speech** (:func:`load_acted_speech`): the RAVDESS subset in
  ``<datasets>/emotion_speech/ravdess`` (140 clips, 24 actors, neutral/happy/sad/angry, 48 kHz).
  Labels come from ``labels.csv`` and are checked against the RAVDESS file-name convention
  (:func:`parse_ravdess_name`); a disagreement is an error. Licence **CC BY-NC-SA 4.0**: research
  and evaluation only; a model trained on it must not ship in a commercial product and its card
  must say so (:data:`ACTED_SPEECH_LICENCE`). Its text is one of two fixed sentences: it tests the
  audio branch and the uninformative-text path, not fusion.
- **Simulated speech** (:func:`load_simulated`, :func:`load_simulated_dir`): espeak-ng utterances
  from :mod:`services.customer_service.simulate`, the voice standing in for the speaker.
- **Splits** (:func:`speaker_split`, :func:`speaker_folds`): by speaker, never by clip, so no
  speaker is in two of train / validation / test; deterministic from a seed; stratified by gender
  when genders are given. Validation is for model selection, test is looked at once.

Every clip comes out as :class:`EmotionClip`: mono float32 at 16 kHz (the rate of
:mod:`services.customer_service.features`), optionally through the simulated telephone line first
(8 kHz, 300-3400 Hz, μ-law, back up to 16 kHz), as the serving path sees call audio.

Where the data sets are: ``datasets_dir`` from the settings (``TESSERA_DATASETS_DIR``) when the
platform's settings have it, else ``<repo>/../shared/datasets``.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from services.customer_service.audio import AudioError, read_wav, resample
from services.customer_service.features import FEATURE_RATE
from services.customer_service.labels import RAVDESS_EMOTIONS
from services.customer_service.simulate import (
    CORPUS_MANIFEST,
    VOICES,
    SimulatedClip,
    Voice,
    simulate_corpus,
    telephone_band,
)

ACTED_SPEECH = "emotion_speech"
RAVDESS_FOLDER = "ravdess"
ACTED_SPEECH_LICENCE = ("RAVDESS (Livingstone & Russo 2018, doi:10.1371/journal.pone.0196391), CC BY-NC-SA 4.0: "
                        "non-commercial research and evaluation only; derivatives under the same licence")
SPLITS = ("train", "validation", "test")
RAVDESS_STATEMENTS = {"01": "Kids are talking by the door", "02": "Dogs are sitting by the door"}
RAVDESS_INTENSITIES = {"01": "normal", "02": "strong"}
ACTED_SPEECH_COLUMNS = ("path", "emotion", "speaker", "gender", "intensity", "transcript", "sha256")


class DatasetError(ValueError):
    """A data set that is missing, malformed or inconsistent; the message names the file and why."""


@dataclass(frozen=True)
class EmotionClip:
    """One labelled utterance, ready for features: mono float32 in [-1, 1] at ``sample_rate``."""

    clip_id: str
    samples: npt.NDArray[np.float32] = field(repr=False)
    sample_rate: int
    emotion: str
    speaker: str
    text: str
    source: str
    """``ravdess`` or ``simulated``."""
    gender: str | None = None
    telephone: bool = False

    @property
    def duration_s(self) -> float:
        """Length in seconds."""
        return self.samples.size / self.sample_rate


# --- where the data is ----------------------------------------------------------------------------

def datasets_dir() -> Path:
    """The shared data-set folder: the settings' ``datasets_dir`` when the platform has that
    setting, else ``<repo>/../shared/datasets`` (which may not exist)."""
    from shared.config import get_settings

    configured = getattr(get_settings(), "datasets_dir", None)
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


def acted_speech_dir(root: Path | None = None) -> Path:
    """The RAVDESS subset's folder (``<datasets>/emotion_speech/ravdess``), whether or not it exists."""
    return (root or datasets_dir()) / ACTED_SPEECH / RAVDESS_FOLDER


# --- the real acted speech ------------------------------------------------------------------------

@dataclass(frozen=True)
class RavdessName:
    """The fields of a RAVDESS file name ``MM-VV-EE-II-SS-RR-AA.wav``."""

    modality: str
    vocal_channel: str
    emotion_code: str
    intensity: str
    statement: str
    repetition: str
    actor: int

    @property
    def emotion(self) -> str | None:
        """Our label for the emotion code, ``None`` for codes we do not use."""
        return RAVDESS_EMOTIONS[self.emotion_code]

    @property
    def speaker(self) -> str:
        """``actor_NN``."""
        return f"actor_{self.actor:02d}"

    @property
    def gender(self) -> str:
        """Odd actors are male, even female."""
        return "male" if self.actor % 2 else "female"

    @property
    def text(self) -> str:
        """The sentence spoken."""
        return RAVDESS_STATEMENTS[self.statement]


def parse_ravdess_name(name: str) -> RavdessName:
    """Parse ``03-01-05-02-01-02-07.wav`` (modality, vocal channel, emotion, intensity, statement,
    repetition, actor); :class:`DatasetError` saying which field is wrong otherwise."""
    stem = Path(name).name.removesuffix(".wav")
    fields = stem.split("-")
    if len(fields) != 7 or not all(len(f) == 2 and f.isdigit() for f in fields):
        raise DatasetError(f"{name!r} is not a RAVDESS name (seven two-digit fields MM-VV-EE-II-SS-RR-AA.wav)")
    modality, channel, emotion, intensity, statement, repetition, actor = fields
    checks = (("modality", modality, {"01", "02", "03"}), ("vocal channel", channel, {"01", "02"}),
              ("emotion", emotion, set(RAVDESS_EMOTIONS)), ("intensity", intensity, set(RAVDESS_INTENSITIES)),
              ("statement", statement, set(RAVDESS_STATEMENTS)), ("repetition", repetition, {"01", "02"}))
    for label, value, allowed in checks:
        if value not in allowed:
            raise DatasetError(f"{name!r}: {label} code {value} is not one of {', '.join(sorted(allowed))}")
    if not 1 <= int(actor) <= 24:
        raise DatasetError(f"{name!r}: actor {actor} is outside 01-24")
    return RavdessName(modality, channel, emotion, intensity, statement, repetition, int(actor))


@dataclass(frozen=True)
class ActedSpeechEntry:
    """One row of the subset's ``labels.csv``, checked against its file name."""

    path: Path
    name: RavdessName
    emotion: str
    intensity: str
    sha256: str


def read_acted_speech_index(root: Path | None = None) -> list[ActedSpeechEntry]:
    """The rows of ``labels.csv``, each checked against the file name (emotion, speaker, gender,
    intensity, transcript); :class:`DatasetError` on the first disagreement or missing column."""
    folder = acted_speech_dir(root)
    index = folder / "labels.csv"
    if not index.is_file():
        raise DatasetError(f"the acted speech is not there: {index} is missing")
    entries = []
    with index.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = set(ACTED_SPEECH_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"{index}: missing column(s) {', '.join(sorted(missing))}")
        for line, row in enumerate(reader, start=2):
            entries.append(_checked_entry(folder, index, line, row))
    if not entries:
        raise DatasetError(f"{index} lists no clips")
    return entries


def _checked_entry(folder: Path, index: Path, line: int, row: Mapping[str, str]) -> ActedSpeechEntry:
    name = parse_ravdess_name(row["path"])
    if name.emotion is None:
        raise DatasetError(f"{index}:{line}: {row['path']} has RAVDESS emotion code {name.emotion_code}, "
                           "which our label set does not use")
    expected = {"emotion": name.emotion, "speaker": name.speaker, "gender": name.gender,
                "intensity": RAVDESS_INTENSITIES[name.intensity], "transcript": name.text}
    for column, value in expected.items():
        if row[column] != value:
            raise DatasetError(f"{index}:{line}: {column} {row[column]!r} disagrees with the file name "
                               f"{row['path']} ({value!r})")
    return ActedSpeechEntry(folder / row["path"], name, name.emotion, row["intensity"], row["sha256"])


def load_acted_speech(root: Path | None = None, *, telephone: bool = False, verify: bool = False,
                      sample_rate: int = FEATURE_RATE) -> list[EmotionClip]:
    """The real acted speech as clips at ``sample_rate`` (16 kHz), through the simulated telephone
    line first when ``telephone`` (no line noise: the clips are studio-clean, the line is the
    codec and band). ``verify`` checks each file's sha256 against ``labels.csv``."""
    clips = []
    for entry in read_acted_speech_index(root):
        data = _read_file(entry.path)
        if verify and hashlib.sha256(data).hexdigest() != entry.sha256:
            raise DatasetError(f"{entry.path}: sha256 differs from labels.csv (file changed or corrupt)")
        try:
            audio = read_wav(data)
        except AudioError as error:
            raise DatasetError(f"{entry.path}: {error.detail}") from error
        clips.append(EmotionClip(clip_id=entry.path.stem,
                                 samples=prepare_samples(audio.samples, audio.sample_rate, telephone, sample_rate),
                                 sample_rate=sample_rate, emotion=entry.emotion, speaker=entry.name.speaker,
                                 text=entry.name.text, source="ravdess", gender=entry.name.gender,
                                 telephone=telephone))
    return clips


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise DatasetError(f"{path}: cannot read: {error.strerror}") from error


def prepare_samples(samples: npt.NDArray[np.int16], rate: int, telephone: bool,
                    sample_rate: int = FEATURE_RATE) -> npt.NDArray[np.float32]:
    """int16 audio at ``rate`` as float32 in [-1, 1] at ``sample_rate``, optionally through the
    telephone line (8 kHz, band, μ-law) on the way."""
    if telephone:
        samples = telephone_band(samples, rate)
        rate = 8000
    return resample(samples.astype(np.float32) / np.float32(32768.0), rate, sample_rate)


# --- the simulated speech -------------------------------------------------------------------------

def from_simulated(clip: SimulatedClip, sample_rate: int = FEATURE_RATE) -> EmotionClip:
    """A simulated clip (already through the line, or clean) as an :class:`EmotionClip`."""
    samples = prepare_samples(clip.samples, clip.sample_rate, False, sample_rate)
    return EmotionClip(clip_id=clip.clip_id, samples=samples, sample_rate=sample_rate, emotion=clip.emotion,
                       speaker=clip.voice, text=clip.text, source="simulated", gender=clip.gender,
                       telephone=clip.sample_rate == 8000)


def load_simulated(seed: int, per_voice_emotion: int, *, voices: Sequence[Voice] = VOICES, telephone: bool = True,
                   workers: int = 1, **options: Any) -> list[EmotionClip]:
    """Synthesise a simulated corpus (:func:`~services.customer_service.simulate.simulate_corpus`)
    and return it as clips at 16 kHz, the voice as speaker."""
    corpus = simulate_corpus(seed, per_voice_emotion, voices=voices, telephone=telephone, workers=workers, **options)
    return [from_simulated(clip) for clip in corpus]


def load_simulated_dir(folder: Path, sample_rate: int = FEATURE_RATE) -> list[EmotionClip]:
    """A corpus written by ``tessera simulate cs utterances`` (``manifest.json`` and ``clips/``)."""
    manifest_path = folder / CORPUS_MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        entries = manifest["clips"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DatasetError(f"{manifest_path}: not a simulated corpus manifest ({error})") from error
    clips = []
    for entry in entries:
        path = folder / entry["path"]
        try:
            audio = read_wav(_read_file(path))
        except AudioError as error:
            raise DatasetError(f"{path}: {error.detail}") from error
        clips.append(EmotionClip(clip_id=entry["clip_id"],
                                 samples=prepare_samples(audio.samples, audio.sample_rate, False, sample_rate),
                                 sample_rate=sample_rate, emotion=entry["emotion"], speaker=entry["voice"],
                                 text=entry["text"], source="simulated", gender=entry.get("gender"),
                                 telephone=audio.sample_rate == 8000))
    return clips


# --- speaker-independent splits -------------------------------------------------------------------

@dataclass(frozen=True)
class SpeakerSplit:
    """Disjoint sets of speakers for training, validation (model selection) and test."""

    train: tuple[str, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...]

    def __post_init__(self) -> None:
        seen: Counter[str] = Counter([*self.train, *self.validation, *self.test])
        shared = sorted(speaker for speaker, count in seen.items() if count > 1)
        if shared:
            raise ValueError(f"speaker(s) in more than one split: {', '.join(shared)}")

    def split_of(self, speaker: str) -> str:
        """``train``, ``validation`` or ``test``; ``KeyError`` for a speaker in none."""
        for name in SPLITS:
            if speaker in getattr(self, name):
                return name
        raise KeyError(f"speaker {speaker!r} is in no split")

    def as_dict(self) -> dict[str, list[str]]:
        """The split as JSON values (for a model card)."""
        return {name: list(getattr(self, name)) for name in SPLITS}


def speaker_split(speakers: Iterable[str], *, seed: int = 0, validation: float = 1 / 6, test: float = 1 / 6,
                  groups: Mapping[str, str] | None = None) -> SpeakerSplit:
    """Assign each speaker to one split, deterministically from ``seed``: within each group (e.g.
    gender, from ``groups``) the sorted speakers are shuffled and ``round(n * test)`` go to test,
    ``round(n * validation)`` to validation (at least one each when the group has three or more),
    the rest to train. 24 actors in two genders give 16 / 4 / 4; ten voices give 6 / 2 / 2."""
    if validation < 0 or test < 0 or validation + test >= 1:
        raise ValueError(f"validation ({validation}) and test ({test}) must be >= 0 and leave some training speakers")
    chosen: dict[str, list[str]] = {name: [] for name in SPLITS}
    rng = np.random.default_rng(seed)
    for _, members in sorted(_grouped(speakers, groups).items()):
        order = [members[i] for i in rng.permutation(len(members))]
        n_test, n_val = _share(len(order), test), _share(len(order), validation)
        chosen["test"] += order[:n_test]
        chosen["validation"] += order[n_test:n_test + n_val]
        chosen["train"] += order[n_test + n_val:]
    return SpeakerSplit(*(tuple(sorted(chosen[name])) for name in SPLITS))


def speaker_folds(speakers: Iterable[str], folds: int, *, seed: int = 0,
                  groups: Mapping[str, str] | None = None) -> list[SpeakerSplit]:
    """Cross-validation by speaker: the speakers dealt into ``folds`` folds (balanced per group);
    fold ``i`` is the test set of split ``i``, fold ``i + 1`` its validation set, the rest train.
    Every speaker is tested exactly once, so small data sets give figures over all speakers."""
    if folds < 3:
        raise ValueError(f"speaker_folds needs at least 3 folds (test, validation, train), got {folds}")
    dealt: list[list[str]] = [[] for _ in range(folds)]
    rng = np.random.default_rng(seed)
    position = 0
    for _, members in sorted(_grouped(speakers, groups).items()):
        for i in rng.permutation(len(members)):
            dealt[position % folds].append(members[i])
            position += 1
    if any(not fold for fold in dealt):
        raise ValueError(f"{position} speakers cannot fill {folds} folds")
    splits = []
    for i in range(folds):
        validation = (i + 1) % folds
        train = [s for j, fold in enumerate(dealt) if j not in (i, validation) for s in fold]
        splits.append(SpeakerSplit(tuple(sorted(train)), tuple(sorted(dealt[validation])), tuple(sorted(dealt[i]))))
    return splits


def _grouped(speakers: Iterable[str], groups: Mapping[str, str] | None) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for speaker in sorted(set(speakers)):
        grouped.setdefault(groups.get(speaker, "") if groups else "", []).append(speaker)
    return grouped


def _share(count: int, fraction: float) -> int:
    wanted = int(round(count * fraction))
    return max(wanted, 1) if fraction > 0 and count >= 3 else wanted


def split_for(clips: Sequence[EmotionClip], *, seed: int = 0, validation: float = 1 / 6,
              test: float = 1 / 6) -> SpeakerSplit:
    """:func:`speaker_split` of the clips' speakers, stratified by their gender."""
    genders = {clip.speaker: clip.gender or "" for clip in clips}
    return speaker_split(genders, seed=seed, validation=validation, test=test, groups=genders)


def apply_split(clips: Sequence[EmotionClip], split: SpeakerSplit) -> dict[str, list[EmotionClip]]:
    """The clips of each split (a clip whose speaker is in no split is an error)."""
    parts: dict[str, list[EmotionClip]] = {name: [] for name in SPLITS}
    for clip in clips:
        parts[split.split_of(clip.speaker)].append(clip)
    return parts


def describe(parts: Mapping[str, Sequence[EmotionClip]]) -> dict[str, Any]:
    """Sizes per split: clips, seconds, speakers, and clips per label and per speaker (for the
    report and the model card)."""
    summary: dict[str, Any] = {}
    for name, clips in parts.items():
        summary[name] = {
            "clips": len(clips),
            "seconds": round(sum(clip.duration_s for clip in clips), 1),
            "speakers": len({clip.speaker for clip in clips}),
            "per_label": dict(sorted(Counter(clip.emotion for clip in clips).items())),
            "per_speaker": dict(sorted(Counter(clip.speaker for clip in clips).items())),
        }
    return summary
