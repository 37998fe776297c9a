"""The emotion model's architecture (untrained): audio, text or both per utterance in one batch, the
same answer for an utterance alone or batched with longer ones, a model that can learn, a saved
model that reads back the same, and pretrained encoders taken from a local directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from services.customer_service.labels import EMOTIONS
from services.customer_service.model import (
    EmotionModel,
    EmotionModelConfig,
    ModelConfigError,
    PreparedUtterance,
    load_emotion_model,
    save_emotion_model,
    train_tokenizer,
)

SMALL = EmotionModelConfig(d_model=32, audio_layers=1, text_layers=1, audio_ff=64, text_ff=64, conv_channels=32,
                           fusion_heads=2, audio_heads=2, text_heads=2)


@pytest.fixture(scope="module")
def model() -> EmotionModel:
    torch.manual_seed(0)
    return EmotionModel.create(SMALL)


def probabilities(answers: list[dict[str, float]]) -> np.ndarray:
    return np.array([[answer[label] for label in EMOTIONS] for answer in answers])


def utterances(model: EmotionModel) -> list[PreparedUtterance]:
    rng = np.random.default_rng(0)
    return [model.prepare(rng.normal(0, 0.1, 24000).astype(np.float32), "This is absolutely unacceptable!"),
            model.prepare(rng.normal(0, 0.05, 7000).astype(np.float32), None),
            model.prepare(None, "Thank you so much, that's wonderful."),
            model.prepare(rng.normal(0, 0.2, 16000).astype(np.float32), "   ")]


def test_a_batch_may_mix_audio_only_text_only_and_both(model: EmotionModel) -> None:
    items = utterances(model)
    assert [(i.audio is not None, i.token_ids is not None) for i in items] == [
        (True, True), (True, False), (False, True), (True, False)]
    batch = model.batch(items)
    assert batch.audio is not None and batch.audio.shape == (4, 151, 64)
    model.net.eval()
    with torch.inference_mode():
        logits = model.net(batch)
    assert logits.shape == (4, len(EMOTIONS)) and torch.isfinite(logits).all()
    answers = model.predict(items)
    assert all(set(a) == set(EMOTIONS) and sum(a.values()) == pytest.approx(1.0) for a in answers)


def test_an_utterance_gets_the_same_answer_alone_and_in_a_padded_batch(model: EmotionModel) -> None:
    items = utterances(model)
    together = model.predict(items)
    for item, batched in zip(items, together, strict=True):
        alone = model.predict([item])[0]
        assert alone == pytest.approx(batched, abs=1e-5)


def test_a_batch_without_any_text_or_any_audio_runs(model: EmotionModel) -> None:
    items = utterances(model)
    audio_only = model.batch([items[1], items[3]])
    assert audio_only.input_ids is None
    text_only = model.batch([items[2]])
    assert text_only.audio is None
    np.testing.assert_allclose(probabilities(model.predict([items[1], items[3]])),
                               probabilities(model.predict([items[1]]) + model.predict([items[3]])), atol=1e-5)
    assert len(model.predict([items[2]])) == 1


def test_an_utterance_with_neither_audio_nor_text_is_refused(model: EmotionModel) -> None:
    with pytest.raises(ValueError, match="audio or text"):
        model.prepare(np.zeros(0, dtype=np.float32), " ")
    with pytest.raises(ValueError, match="mono"):
        model.prepare(np.zeros((2, 100), dtype=np.float32), "hi")


def test_a_few_steps_fit_a_tiny_batch(model: EmotionModel) -> None:
    torch.manual_seed(1)
    fresh = EmotionModel.create(SMALL, tokenizer=model.tokenizer)
    items = utterances(fresh)
    labels = torch.tensor([EMOTIONS.index(e) for e in ("angry", "sad", "happy", "neutral")])
    optimiser = torch.optim.Adam(fresh.net.parameters(), lr=5e-3)
    fresh.net.train()
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(fresh.net(fresh.batch(items)), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_a_saved_model_reads_back_the_same(model: EmotionModel, tmp_path: Path) -> None:
    save_emotion_model(model, tmp_path / "emotion")
    loaded = load_emotion_model(tmp_path / "emotion")
    assert loaded.config == model.config
    assert loaded.tokenizer("order 12345")["input_ids"] == model.tokenizer("order 12345")["input_ids"]
    np.testing.assert_allclose(probabilities(loaded.predict(utterances(loaded))),
                               probabilities(model.predict(utterances(model))), atol=1e-6)


def test_a_config_with_an_unknown_key_or_bad_sizes_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="unknown model config key"):
        EmotionModelConfig.from_dict({"layers": 3})
    with pytest.raises(ModelConfigError, match="must divide"):
        EmotionModelConfig(d_model=30, fusion_heads=4)
    with pytest.raises(ModelConfigError, match="cannot read"):
        load_emotion_model(tmp_path / "nothing")


def test_the_tokenizer_encodes_any_text_with_roberta_ids() -> None:
    tokenizer = train_tokenizer(["my order is late", "thank you so much"] * 20, vocab_size=300)
    ids = tokenizer("Zürich ☎ 555")["input_ids"]  # bytes never seen in training still encode
    assert ids[0] == tokenizer.bos_token_id == 0 and ids[-1] == tokenizer.eos_token_id == 2
    assert tokenizer.pad_token_id == 1 and tokenizer.unk_token_id not in ids


def test_wav2vec2_audio_and_a_pretrained_text_encoder_from_a_local_directory(model: EmotionModel,
                                                                            tmp_path: Path) -> None:
    from transformers import RobertaConfig, RobertaModel

    pretrained = RobertaModel(RobertaConfig(vocab_size=len(model.tokenizer), hidden_size=48, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=96, max_position_embeddings=70,
                                            pad_token_id=1), add_pooling_layer=False)
    pretrained.save_pretrained(tmp_path / "roberta")
    model.tokenizer.save_pretrained(tmp_path / "roberta")
    config = EmotionModelConfig(d_model=32, fusion_heads=2, audio_heads=2, audio_kind="wav2vec2",
                                text_pretrained=str(tmp_path / "roberta"))
    built = EmotionModel.create(config)
    word_embeddings = built.net.text_encoder.roberta.embeddings.word_embeddings.weight
    assert torch.equal(word_embeddings, pretrained.embeddings.word_embeddings.weight)
    assert built.config.roberta is not None and built.config.roberta["hidden_size"] == 48
    rng = np.random.default_rng(2)
    items = [built.prepare(rng.normal(0, 0.1, 16000).astype(np.float32), "hello"),
             built.prepare(rng.normal(0, 0.1, 4000).astype(np.float32), None)]
    assert items[0].audio is not None and items[0].audio.shape == (16000,)  # raw waveform for wav2vec2
    answers = built.predict(items)
    assert all(np.isfinite(list(a.values())).all() for a in answers)
    save_emotion_model(built, tmp_path / "saved")
    (tmp_path / "roberta" / "model.safetensors").unlink()  # the saved model no longer needs its source
    np.testing.assert_allclose(probabilities(load_emotion_model(tmp_path / "saved").predict(items)),
                               probabilities(answers), atol=1e-5)
