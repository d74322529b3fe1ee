"""The phrases no human caption uses, by how many more of their web texts the filter removed."""

from __future__ import annotations

import pytest

from components.config import PhrasesConfig
from components.phrases import phrases, unseen_phrases, words

HUMAN = ["A red ring at the top left.", "a blue square in the bottom right"]


def test_words_and_phrases_ignore_case_and_punctuation():
    assert words("IMG_0042.jpg: Red-Ring!") == ["img", "0042", "jpg", "red", "ring"]
    assert phrases("a red ring", 2) == {"a", "red", "ring", "a red", "red ring"}
    assert phrases("a red ring", 1) == {"a", "red", "ring"}
    assert phrases("", 2) == set()


def test_a_concept_the_human_captions_lack_is_reported_with_its_loss():
    # 40 texts of each kind; the filter keeps half of all texts overall
    web = (["a green ring"] * 40 + ["a red ring"] * 40 + ["product image jpg"] * 40 + ["a blue square"] * 40)
    kept = ([True] * 4 + [False] * 36) + [True] * 40 + [False] * 40 + ([True] * 36 + [False] * 4)
    table = unseen_phrases(web, kept, HUMAN, PhrasesConfig(min_texts=10, top=50))
    assert table["texts"] == 160 and table["kept_fraction"] == pytest.approx(80 / 160)
    rows = {r["phrase"]: r for r in table["top"]}
    # every phrase of the human captions is known, however the web texts use it
    assert not {"a", "red", "ring", "red ring", "a red", "blue square", "square"} & set(rows)
    assert rows["green"] == {"phrase": "green", "texts": 40, "kept": 4, "kept_fraction": 0.1,
                             "lost": pytest.approx(40 * 0.5 - 4)}
    assert rows["green ring"]["lost"] == pytest.approx(16.0) and rows["product image"]["lost"] == pytest.approx(20.0)
    losses = [r["lost"] for r in table["top"]]
    assert losses == sorted(losses, reverse=True) and all(x > 0 for x in losses)
    assert table["phrases"] == 8
    assert {r["phrase"] for r in table["top"]} == {"green", "a green", "green ring", "product", "image",
                                                   "jpg", "product image", "image jpg"}
    assert table["texts_with_one"] == 80 and table["their_kept_fraction"] == pytest.approx(4 / 80)


def test_rare_phrases_and_phrases_kept_above_average_are_left_out():
    web = ["a green ring"] * 5 + ["a purple cross"] * 30 + ["a red ring"] * 30
    kept = [False] * 5 + [True] * 30 + [False] * 30
    table = unseen_phrases(web, kept, HUMAN, PhrasesConfig(min_texts=10, top=50))
    assert table["top"] == []  # the purple cross is kept more often than average; the green ring is rare
    assert table["phrases"] == 4  # purple, cross, a purple, purple cross
    assert table["texts_with_one"] == 30 and table["their_kept_fraction"] == 1.0


def test_top_limits_the_rows_and_a_sample_bounds_the_texts_read():
    web = [f"photo {i % 7}" for i in range(700)]
    kept = [i % 7 != 0 for i in range(700)]
    table = unseen_phrases(web, kept, HUMAN, PhrasesConfig(min_texts=10, top=1))
    assert [r["phrase"] for r in table["top"]] == ["0"]  # ties "photo 0"; the phrase breaks the tie
    sampled = unseen_phrases(web, kept, HUMAN, PhrasesConfig(min_texts=10, sample=350), seed=3)
    assert sampled["texts"] == 350
    assert sampled == unseen_phrases(web, kept, HUMAN, PhrasesConfig(min_texts=10, sample=350), seed=3)


def test_no_web_texts_give_an_empty_table_and_mismatched_lengths_are_named():
    table = unseen_phrases([], [], HUMAN, PhrasesConfig())
    assert table["texts"] == 0 and table["top"] == [] and table["their_kept_fraction"] is None
    with pytest.raises(ValueError, match="2 web captions but 1 kept flags"):
        unseen_phrases(["a", "b"], [True], HUMAN, PhrasesConfig())
