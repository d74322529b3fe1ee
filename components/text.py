"""Caption text: the normalisation `capfilt ingest` applies, and BLIP's `pre_caption` for training.

`normalize_caption` turns whatever a source holds in its caption field into either clean text or
a reject reason. It is deliberately conservative, because the manifest is the corpus of record:
markup is removed (tags that look like HTML, then entities unescaped, so an encoded `&lt;b&gt;`
survives as the literal text `<b>`), the text is put in Unicode NFC, control characters become
spaces, whitespace runs collapse to one space, and text longer than `max_chars` is truncated (never
dropped). Case and punctuation are kept; `pre_caption` is the lossy, model-side view (lower case,
BLIP's punctuation list removed, first `max_words` words) that training and the tokenizer use.
"""

from __future__ import annotations

import html
import math
import re
import unicodedata

import numpy as np

from components.reasons import EMPTY_CAPTION, INVALID_UTF8, NON_STRING_CAPTION


# Only things shaped like tags: "<b>", "</a>", "<br/>", "<img src=...>"; "a < b > c" is left alone.
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]*)?/?>")
_SPACE = re.compile(r"\s+")
# BLIP data/utils.py: these characters become spaces; commas, ?, ' and - are kept.
_BLIP_PUNCT = re.compile(r"[.!\"()*#:;~]")


def _is_null(raw: object) -> bool:
    return raw is None or (isinstance(raw, float) and math.isnan(raw))


def _controls_to_space(text: str) -> str:
    # Cc = C0/C1 controls (tab and newline included, they are whitespace anyway); Cf (format chars
    # such as zero-width joiners) are kept: some scripts and emoji sequences need them.
    return "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text)


def normalize_caption(raw: object, max_chars: int = 1000) -> tuple[str | None, str | None, str]:
    """Normalise one raw caption value.

    Returns `(text, None, "")` for a usable caption, or `(None, reason, detail)` where reason is
    `empty_caption` (null, empty or only whitespace/markup), `non_string_caption` (a number, list,
    mapping...) or `invalid_utf8` (lone surrogates that cannot be stored as UTF-8).
    """
    if _is_null(raw):
        return None, EMPTY_CAPTION, "caption is null"
    if isinstance(raw, bytes):
        return None, NON_STRING_CAPTION, "caption is bytes, not text"
    if not isinstance(raw, str):
        return None, NON_STRING_CAPTION, f"caption is a {type(raw).__name__}, not a string"
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        return None, INVALID_UTF8, "caption holds lone surrogates (not valid UTF-8)"
    text = _TAG.sub(" ", raw)
    text = html.unescape(text)
    text = unicodedata.normalize("NFC", text)
    text = _controls_to_space(text)
    text = _SPACE.sub(" ", text).strip()
    if not text:
        return None, EMPTY_CAPTION, "caption is empty after normalisation"
    if len(text) > max_chars:
        text = text[:max_chars].rstrip()
    return text, None, ""


def pre_caption(caption: str, max_words: int = 50) -> str:
    """BLIP's training-time text view: lower case, `. ! " ( ) * # : ; ~` → space, whitespace
    collapsed and stripped, first `max_words` space-separated words kept."""
    text = _BLIP_PUNCT.sub(" ", caption.lower())
    text = _SPACE.sub(" ", text).strip()
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


_CLAUSE_BREAK = re.compile(r"\s*,\s*|\s+and\s+|\s+with\s+")


def partial_caption(caption: str, rng: np.random.Generator, word_drop: float) -> str:
    """A random non-empty subset of the caption's clauses (split at commas, "and", "with"), in
    order, then each word dropped with probability `word_drop`; never empty."""
    clauses = [c for c in _CLAUSE_BREAK.split(caption.strip()) if c]
    if not clauses:
        return caption
    keep = [c for c in clauses if rng.random() < 0.5] or [clauses[int(rng.integers(len(clauses)))]]
    words = " ".join(keep).split()
    kept = [w for w in words if rng.random() >= word_drop]
    return " ".join(kept or [words[int(rng.integers(len(words)))]])


_EDGE = ("\x02", "\x03")  # sentence-start / -end markers in the context keys (never a word)
_KEPT_PUNCT = ",?'-"  # punctuation `pre_caption` keeps; a swap must change more than that
# English function words and framing nouns ("image", "picture"): exchanging two of them ("in the
# upper left ... at the top" -> "at the upper left ... in the top") rewords a caption without
# making it false, so no exchange uses them.
_FUNCTION_WORDS = frozenset(
    "a an the this that these those of in on at to by from with without into onto over under above "
    "below near beside next and or but its it it's their there here is are was were be has have "
    "shows showing shown image picture photo".split())


class SwapTable:
    """Context-substitution table for word-swap ITM negatives.

    Built from training captions (their `pre_caption` view): for every word position, the pair
    (previous word, next word) is its context, and the words seen between the same pair are its
    substitutes ("a red ring" and "a blue ring" make red and blue substitutes in ("a", "ring")).
    A negative is the caption with one word replaced by a different substitute, chosen in
    proportion to how often it filled that context. Such a text differs from a true one in one
    visual detail (a colour, a shape, a count, a position) — the hardest noise for an ITM head
    that only ever saw other images' captions as negatives. Language-agnostic; synonyms that
    share a context ("a picture of" / "a photo of"), and swaps that name another object of the
    image, make some negatives true: a known cost.
    """

    def __init__(self, fillers: dict[tuple[str, str], tuple[list[str], np.ndarray]]) -> None:
        self.fillers = fillers  # context -> (substitutes, how often each filled it)
        # the substitutes without the punctuation `pre_caption` keeps: "ring," and "ring" are one word
        self.bare = {context: [w.strip(_KEPT_PUNCT) for w in words] for context, (words, _) in fillers.items()}
        self.bare_sets = {context: frozenset(words) for context, words in self.bare.items()}

    @classmethod
    def build(cls, captions: list[str], min_count: int = 2, max_words: int = 50) -> SwapTable:
        """Contexts whose substitutes include at least two words each seen `min_count` times."""
        counts: dict[tuple[str, str], dict[str, int]] = {}
        for caption in captions:
            words = [_EDGE[0], *pre_caption(caption, max_words).split(), _EDGE[1]]
            for i in range(1, len(words) - 1):
                slot = counts.setdefault((words[i - 1], words[i + 1]), {})
                slot[words[i]] = slot.get(words[i], 0) + 1
        fillers = {}
        for context, slot in counts.items():
            common = sorted(w for w, n in slot.items() if n >= min_count)
            if len(common) >= 2:
                fillers[context] = (common, np.array([slot[w] for w in common], dtype=np.float64))
        return cls(fillers)

    def __len__(self) -> int:
        return len(self.fillers)

    def negative(self, text: str, rng: np.random.Generator) -> str | None:
        """`text` (already in `pre_caption` form) with one word swapped; None when no word of it
        has a substitute. Substitutes that differ from the word only in the punctuation
        `pre_caption` keeps ("ring," / "ring") do not count: the text would still be true."""
        words = text.split()
        padded = [_EDGE[0], *words, _EDGE[1]]
        contexts = [(padded[i], padded[i + 2]) for i in range(len(words))]
        slots = [i for i, c in enumerate(contexts)
                 if any(b != words[i].strip(_KEPT_PUNCT) for b in self.bare.get(c, ()))]
        if not slots:
            return None
        i = slots[int(rng.integers(len(slots)))]
        fillers, counts = self.fillers[contexts[i]]
        bare = words[i].strip(_KEPT_PUNCT)
        weights = np.where([b == bare for b in self.bare[contexts[i]]], 0.0, counts)  # never the word itself
        pick = fillers[int(rng.choice(len(fillers), p=weights / weights.sum()))]
        return " ".join([*words[:i], pick, *words[i + 1:]])

    def exchange(self, text: str, rng: np.random.Generator) -> str | None:
        """`text` (already in `pre_caption` form) with two of its words exchanged, where each is a
        substitute in the other's context ("a red ring and a blue cross" -> "a blue ring and a
        red cross"); None when no two words qualify. The words stay the same, only what they are
        bound to changes: a negative a bag-of-words reading cannot tell from the caption (the
        compositional hard negatives of NegCLIP, Yuksekgonul et al. 2023). English function words
        and framing words ("in"/"at", "image"/"picture") are never exchanged: that only rewords.
        Neither are neighbours (each is the other's context). Each word keeps its slot's
        punctuation; the pair is drawn uniformly. Known cost: an exchange between objects that
        share the rest of the description ("a red ring and a red cross" -> "a red cross and a
        red ring") stays true."""
        words = text.split()
        padded = [_EDGE[0], *words, _EDGE[1]]
        contexts = [(padded[i], padded[i + 2]) for i in range(len(words))]
        bare = [w.strip(_KEPT_PUNCT) for w in words]
        bare = [b if b not in _FUNCTION_WORDS else "" for b in bare]
        mates = [self.bare_sets.get(c, frozenset()) for c in contexts]
        pairs = [(i, j) for i in range(len(words)) if bare[i] and mates[i] for j in range(i + 2, len(words))
                 if bare[j] and bare[j] != bare[i] and bare[j] in mates[i] and bare[i] in mates[j]]
        if not pairs:
            return None
        i, j = pairs[int(rng.integers(len(pairs)))]
        out = list(words)
        out[i], out[j] = words[i].replace(bare[i], bare[j], 1), words[j].replace(bare[j], bare[i], 1)
        return " ".join(out)
