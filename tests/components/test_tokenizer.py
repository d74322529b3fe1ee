"""The trained vocabulary: fixed special ids, deterministic across runs, words before pieces."""

import random

from components.config import TokenizerConfig
from components.tokenizer import SPECIAL_TOKENS, load_tokenizer, save_tokenizer, train_tokenizer

WORDS = ["red", "blue", "green", "ring", "cross", "square", "left", "right", "top", "bottom"]


def _captions(seed: int, n: int = 400) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) for _ in range(n)]


def test_special_tokens_have_fixed_ids():
    tok = train_tokenizer(_captions(0), TokenizerConfig(vocab_size=100))
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))


def test_special_tokens_are_special():
    tok = train_tokenizer(_captions(0), TokenizerConfig(vocab_size=100))
    ids = tok.encode("red ring").ids
    with_specials = [tok.token_to_id("[DEC]"), *ids, tok.token_to_id("[PAD]")]
    assert tok.decode(with_specials, skip_special_tokens=True) == "red ring"
    assert tok.encode("[ENC] red").tokens[1] == "[ENC]"  # never split into characters


def test_vocabulary_is_deterministic_with_frequency_ties():
    # Every word equally frequent: the worst case for tie-breaking.
    captions = [" ".join(WORDS)] * 10
    vocabs = [train_tokenizer(captions, TokenizerConfig(vocab_size=100)).get_vocab() for _ in range(5)]
    assert all(v == vocabs[0] for v in vocabs)
    # Ties break alphabetically after the characters.
    words = sorted((i, w) for w, i in vocabs[0].items() if w in WORDS)
    assert [w for _, w in words] == sorted(WORDS)


def test_frequent_words_are_single_tokens_and_rare_ones_split():
    captions = ["red ring"] * 50 + ["purple ring"]
    tok = train_tokenizer(captions, TokenizerConfig(vocab_size=40, min_frequency=2))
    assert tok.encode("red ring").tokens == ["[CLS]", "red", "ring", "[SEP]"]
    pieces = tok.encode("purple").tokens[1:-1]
    assert len(pieces) > 1 and pieces[1].startswith("##")
    assert tok.get_vocab_size() <= 40
    assert "[UNK]" in tok.encode("zzz").tokens  # 'z' never seen


def test_round_trip_through_file(tmp_path):
    tok = train_tokenizer(_captions(1), TokenizerConfig(vocab_size=100))
    save_tokenizer(tok, tmp_path)
    again = load_tokenizer(tmp_path)
    text = "red cross at the top left"
    assert again.encode(text).ids == tok.encode(text).ids
