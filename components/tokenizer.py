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
    """Train a WordPiece `tokenizers.Tokenizer` on captions (seen through `pre_caption`)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = WordPieceTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    texts = (pre_caption(c, cfg.max_words) for c in captions)
    tok.train_from_iterator(texts, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )  # fmt: skip
    tok.decoder = decoders.WordPiece(prefix="##")
    for i, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != i:
            raise CapfiltError(f"tokenizer: special token {token} did not get id {i}")
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
