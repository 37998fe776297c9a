"""The emotion model's data: the real acted speech read and checked against its file names,
speaker-independent splits (no speaker in two splits, deterministic, stratified by gender), the
simulated corpus split by voice, and the log-mel features training and serving share.

The acted speech lives beside the repo (``../shared/datasets/emotion_speech``); its tests skip,
saying so, when it is absent. The simulated corpus needs espeak-ng (skipped likewise).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from services.customer_service.datasets import (
    DatasetError,
    EmotionClip,
    SpeakerSplit,
    acted_speech_dir,
    apply_split,
    describe,
    load_acted_speech,
    load_simulated,
    load_simulated_dir,
    parse_ravdess_name,
    read_acted_speech_index,
    speaker_folds,
    speaker_split,
    split_for,
)
from services.customer_service.features import DEFAULT_FEATURES, frame_count, log_mel
from services.customer_service.labels import EMOTIONS, REAL_EMOTIONS, fold_label, fold_to_real
from services.customer_service.simulate import VOICES, espeak_path, simulate_corpus, write_corpus

ACTORS = {f"actor_{n:02d}": "male" if n % 2 else "female" for n in range(1, 25)}


@pytest.fixture(scope="module")
def acted() -> list[EmotionClip]:
    folder = acted_speech_dir()
    if not (folder / "labels.csv").is_file():
        pytest.skip(f"the acted speech is absent: {folder} (see ../shared/datasets/emotion_speech/ravdess/README.md)")
    return load_acted_speech()


# --- labels ---------------------------------------------------------------------------------------

def test_frustrated_is_scored_as_angry_on_the_real_set() -> None:
    assert fold_label("frustrated") == "angry" and fold_label("sad") == "sad"
    folded = fold_to_real({"neutral": 0.1, "happy": 0.1, "sad": 0.1, "angry": 0.3, "frustrated": 0.4})
    assert folded == pytest.approx({"neutral": 0.1, "happy": 0.1, "sad": 0.1, "angry": 0.7})
    assert set(REAL_EMOTIONS) < set(EMOTIONS)
    with pytest.raises(ValueError, match="unknown emotion label 'bored'"):
        fold_label("bored")


# --- file names -----------------------------------------------------------------------------------

def test_a_ravdess_name_gives_emotion_speaker_gender_and_sentence() -> None:
    name = parse_ravdess_name("wav/03-01-05-02-02-01-07.wav")
    assert (name.emotion, name.speaker, name.gender, name.text) == ("angry", "actor_07", "male",
                                                                     "Dogs are sitting by the door")
    assert parse_ravdess_name("03-01-02-01-01-01-12.wav").emotion is None  # calm: not in our label set


@pytest.mark.parametrize(("name", "complaint"), [
    ("03-01-05-01-01.wav", "seven two-digit fields"),
    ("03-01-09-01-01-01-01.wav", "emotion code 09"),
    ("03-01-05-01-03-01-01.wav", "statement code 03"),
    ("03-01-05-01-01-01-25.wav", "actor 25"),
    ("03-01-05-01-01-01-0x.wav", "seven two-digit fields"),
])
def test_a_malformed_name_is_refused_saying_which_field(name: str, complaint: str) -> None:
    with pytest.raises(DatasetError, match=complaint):
        parse_ravdess_name(name)


# --- splits ---------------------------------------------------------------------------------------

def test_a_speaker_split_is_disjoint_deterministic_and_balanced_by_gender() -> None:
    split = speaker_split(ACTORS, seed=0, groups=ACTORS)
    assert (len(split.train), len(split.validation), len(split.test)) == (16, 4, 4)
    assert set(split.train) | set(split.validation) | set(split.test) == set(ACTORS)
    assert not set(split.train) & set(split.test) and not set(split.validation) & set(split.test)
    for part in (split.validation, split.test):
        assert sorted(ACTORS[s] for s in part) == ["female", "female", "male", "male"]
    assert speaker_split(ACTORS, seed=0, groups=ACTORS) == split
    assert speaker_split(ACTORS, seed=1, groups=ACTORS).test != split.test
    voices = {voice.name: voice.gender for voice in VOICES}
    by_voice = speaker_split(voices, groups=voices)
    assert (len(by_voice.train), len(by_voice.validation), len(by_voice.test)) == (6, 2, 2)


def test_folds_test_every_speaker_once_and_never_train_on_it() -> None:
    folds = speaker_folds(ACTORS, 6, groups=ACTORS)
    assert sorted(s for fold in folds for s in fold.test) == sorted(ACTORS)
    for fold in folds:
        assert len(fold.test) == 4 and not set(fold.test) & (set(fold.train) | set(fold.validation))
    with pytest.raises(ValueError, match="at least 3 folds"):
        speaker_folds(ACTORS, 2)


def test_a_split_that_shares_a_speaker_is_refused() -> None:
    with pytest.raises(ValueError, match="actor_01"):
        SpeakerSplit(("actor_01", "actor_02"), ("actor_03",), ("actor_01",))
    with pytest.raises(KeyError, match="actor_09"):
        SpeakerSplit(("actor_01",), (), ()).split_of("actor_09")


# --- the real acted speech ------------------------------------------------------------------------

def test_the_acted_speech_is_read_at_16_khz_with_its_labels(acted: list[EmotionClip]) -> None:
    assert len(acted) == 140
    assert {clip.emotion for clip in acted} == set(REAL_EMOTIONS)
    assert len({clip.speaker for clip in acted}) == 24
    assert all(clip.sample_rate == 16000 and clip.source == "ravdess" for clip in acted)
    assert all(3.0 < clip.duration_s < 5.0 and np.abs(clip.samples).max() <= 1.0 for clip in acted)
    assert {clip.text for clip in acted} == {"Kids are talking by the door", "Dogs are sitting by the door"}


def test_no_acted_speaker_is_in_two_splits(acted: list[EmotionClip]) -> None:
    split = split_for(acted, seed=0)
    parts = apply_split(acted, split)
    speakers = {name: {clip.speaker for clip in clips} for name, clips in parts.items()}
    assert not speakers["train"] & speakers["test"] and not speakers["validation"] & speakers["test"]
    assert not speakers["train"] & speakers["validation"]
    summary = describe(parts)
    assert sum(part["clips"] for part in summary.values()) == 140
    assert all(set(part["per_label"]) == set(REAL_EMOTIONS) for part in summary.values())


def test_the_telephone_version_has_nothing_above_the_band(acted: list[EmotionClip]) -> None:
    phone = load_acted_speech(telephone=True)
    assert [clip.clip_id for clip in phone] == [clip.clip_id for clip in acted]
    spectrum = np.abs(np.fft.rfft(phone[0].samples)) ** 2
    frequencies = np.fft.rfftfreq(phone[0].samples.size, 1 / 16000)
    above = spectrum[frequencies > 4100].sum() / spectrum.sum()
    assert above < 1e-4 and phone[0].telephone


def test_a_label_that_disagrees_with_its_file_name_is_refused(tmp_path: Path, acted: list[EmotionClip]) -> None:
    source = acted_speech_dir()
    folder = tmp_path / "emotion_speech" / "ravdess"
    (folder / "wav").mkdir(parents=True)
    rows = (source / "labels.csv").read_text().splitlines()[:3]
    for row in rows[1:]:
        shutil.copy(source / row.split(",")[0], folder / row.split(",")[0])
    rows[2] = rows[2].replace(",angry,", ",happy,")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DatasetError, match=r"labels.csv:3: emotion 'happy' disagrees with the file name"):
        read_acted_speech_index(tmp_path)
    (folder / "labels.csv").write_text("path,emotion\n")
    with pytest.raises(DatasetError, match="missing column"):
        read_acted_speech_index(tmp_path)
    with pytest.raises(DatasetError, match="is missing"):
        read_acted_speech_index(tmp_path / "nowhere")


# --- the simulated speech -------------------------------------------------------------------------

@pytest.mark.skipif(espeak_path() is None, reason="espeak-ng is not installed (Debian package espeak-ng; "
                    "scripts/ensure_services.sh installs it): no simulated speech")
def test_the_simulated_corpus_splits_by_voice_and_reads_back_from_disk(tmp_path: Path) -> None:
    clips = load_simulated(4, 1, emotions=("angry", "neutral"))
    assert len(clips) == 2 * len(VOICES) and all(clip.sample_rate == 16000 and clip.telephone for clip in clips)
    parts = apply_split(clips, split_for(clips, seed=0))
    voices = {name: {clip.speaker for clip in part} for name, part in parts.items()}
    assert [len(voices[name]) for name in ("train", "validation", "test")] == [6, 2, 2]
    assert not voices["train"] & voices["test"]

    write_corpus(simulate_corpus(4, 1, voices=VOICES[:2], emotions=("angry", "neutral")), tmp_path, seed=4)
    from_disk = load_simulated_dir(tmp_path)
    assert [(c.clip_id, c.emotion, c.speaker) for c in from_disk] == [(c.clip_id, c.emotion, c.speaker)
                                                                       for c in clips[:4]]
    np.testing.assert_allclose(from_disk[0].samples, clips[0].samples, atol=1e-6)
    with pytest.raises(DatasetError, match="not a simulated corpus manifest"):
        load_simulated_dir(tmp_path / "clips")


# --- features -------------------------------------------------------------------------------------

def test_log_mel_matches_a_torch_stft_reference() -> None:
    rng = np.random.default_rng(0)
    audio = (rng.normal(0, 0.1, 16000) * np.hanning(16000)).astype(np.float32)
    features = log_mel(audio)
    assert features.shape == (frame_count(audio.size), DEFAULT_FEATURES.n_mels) == (101, 64)
    spectrum = torch.stft(torch.from_numpy(audio), n_fft=400, hop_length=160, window=torch.hann_window(400),
                          center=True, pad_mode="reflect", return_complex=True)
    from transformers.audio_utils import mel_filter_bank

    bank = mel_filter_bank(num_frequency_bins=201, num_mel_filters=64, min_frequency=50.0, max_frequency=4000.0,
                           sampling_rate=16000, mel_scale="htk")
    reference = np.log(np.maximum(spectrum.abs().pow(2).numpy().T @ bank, 1e-10))
    np.testing.assert_allclose(features, reference, atol=2e-3)


def test_log_mel_keeps_the_level_and_reads_int16_as_full_scale() -> None:
    audio = np.random.default_rng(1).normal(0, 0.05, 8000).astype(np.float32)
    louder = log_mel(audio * 4)
    np.testing.assert_allclose(louder - log_mel(audio), np.log(16), atol=1e-3)  # power x16, not normalised
    quantised = log_mel(np.round(audio * 32768).astype(np.int16))
    assert np.abs(quantised - log_mel(audio)).mean() < 1e-2  # int16 is full scale / 32768
    assert log_mel(np.zeros(100, dtype=np.float32)).shape == (1, 64)
    with pytest.raises(ValueError, match="no samples"):
        log_mel(np.zeros(0, dtype=np.float32))
    with pytest.raises(ValueError, match="mono"):
        log_mel(np.zeros((2, 100), dtype=np.float32))
