"""Decoder settings are chosen on development sentences that the WER measurement never uses."""

from __future__ import annotations

import pytest

from bench.cs_asr_settings import BASE, grid_variants
from services.customer_service.asr import domain_texts, sentence_words
from services.customer_service.evaluation import development_sets, measurement_sets


def test_the_development_sentences_are_not_the_measured_ones() -> None:
    development, measured = development_sets(), measurement_sets()
    for set_name in ("in_script", "held_out"):
        assert development[set_name] and not set(development[set_name]) & set(measured[set_name])
    domain = {" ".join(words) for text in domain_texts() for words in sentence_words(text)}
    for sentence in development["held_out"]:  # held out: not in the language model's text
        assert not {" ".join(words) for words in sentence_words(sentence)} & domain


def test_a_grid_names_every_combination_over_the_shipped_settings() -> None:
    grid = grid_variants(["lw=6,8", "wip=0.2"])
    assert set(grid) == {"lw6/wip0.2", "lw8/wip0.2"}
    assert grid["lw6/wip0.2"].lw == 6.0 and grid["lw6/wip0.2"].wip == 0.2 and grid["lw6/wip0.2"].topn == BASE.topn
    with pytest.raises(ValueError, match="grid axis"):
        grid_variants(["dither=0"])
