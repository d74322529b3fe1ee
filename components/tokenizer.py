"""A WordPiece vocabulary trained on the ingested training captions (the `tokenizers` library).

BLIP uses bert-base-uncased plus two tokens; no hub is reachable here, and the embedded corpus
has a vocabulary of a few dozen words, so capfilt trains its own: BERT normalisation (lower case,
accents stripped) and pre-tokenisation, WordPiece with `##` continuations, captions seen through
`pre_caption` as training will see them. Special tokens have fixed ids, in this order: `[PAD]`=0
(BLIP's pad id), `[UNK]`, `[CLS]`, `[SEP]`, `[MASK]`, `[DEC]` (the decoder's bos) and `[ENC]` (the
image-grounded encoder's first token). Encoding adds `[CLS] ... [SEP]`, as BERT does; models
overwrite position 0 with `[DEC]`/`[ENC]` themselves. The file is `tokenizer.json`, loadable
with `tokenizers.Tokenizer.from_file` or `transformers.PreTrainedTokenizerFast(tokenizer_file=)`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from components.config import TokenizerConfig
from components.errors import CapfiltError
from components.text import pre_caption

if TYPE_CHECKING:
    from tokenizers import Tokenizer

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]")
TOKENIZER_FILE = "tokenizer.json"


def train_tokenizer(captions: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    """A WordPiece `tokenizers.Tokenizer` whose vocabulary is learned from captions (seen through
    `pre_caption`), deterministically.

    The vocabulary is: the special tokens, every character seen (alone and as a `##` continuation,
    so any seen text encodes without `[UNK]`), then whole words by descending frequency, ties
    broken alphabetically, up to `vocab_size`. `tokenizers`' own WordPieceTrainer breaks ties in
    hash order, which gave a different vocabulary on every run and so a different model for the
    same data; a pipeline whose outputs are versioned cannot have that.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for caption in captions:
        text = normalizer.normalize_str(pre_caption(caption, cfg.max_words))
        words.update(w for w, _ in splitter.pre_tokenize_str(text))
    chars = sorted({ch for w in words for ch in w})
    vocab: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS, *chars, *(f"##{ch}" for ch in chars)]:
        vocab.setdefault(token, len(vocab))
    ranked = sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))
    for word, count in ranked:
        if len(vocab) >= cfg.vocab_size or count < cfg.min_frequency:
            break
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = splitter
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )  # fmt: skip
    tok.decoder = decoders.WordPiece(prefix="##")
    # Mark them special (already in the vocabulary, so their ids stay): never split, and dropped
    # by decode(skip_special_tokens=True).
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def save_tokenizer(tok: Tokenizer, folder: Path) -> Path:
    """Write `folder/tokenizer.json` atomically; return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / TOKENIZER_FILE
    tmp = folder / f".{TOKENIZER_FILE}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tok.save(str(tmp), pretty=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_tokenizer(folder: Path) -> Tokenizer:
    """The `tokenizers.Tokenizer` saved by `save_tokenizer`."""
    from tokenizers import Tokenizer

    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        raise CapfiltError(f"{path}: tokenizer not found; run `capfilt stage ingest` first")
    return Tokenizer.from_file(str(path))
