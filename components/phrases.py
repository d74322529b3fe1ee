"""What the filter removed, by phrase: the web texts' word n-grams that no human caption uses.

The captioner and the filter learn from the human captions, so a concept those captions never
name can look like noise to both: on the embedded corpus with human captions that show only 10 of
the 25 shape-colour pairs, the filter kept 7.5-10% of the correct web texts naming another pair
against 27.5-33% of the others (README, "Quality on the embedded corpus"). Real corpora have no
ground truth to see this with, but the phrases tell: for every n-gram (1..`max_words` words) that
appears in at least `min_texts` web texts and in no human caption, the share of its texts the
filter kept, against the share of all web texts (`kept_fraction`). `lost` is how many more of its
texts were removed than that average rate would remove; the table is sorted by it. Boilerplate
("product image", "jpg") belongs at the top; a concept there ("blue rings", a new object's name)
is one the human captions should cover before the cleaned corpus is trusted with it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from components.config import PhrasesConfig

_WORD = re.compile(r"[^\W_]+")


def words(text: str) -> list[str]:
    """Lower-cased runs of letters and digits; punctuation and underscores split words."""
    return _WORD.findall(text.lower())


def phrases(text: str, max_words: int) -> set[str]:
    """Every run of 1..max_words consecutive words of `text`, joined by single spaces."""
    w = words(text)
    return {" ".join(w[i:i + n]) for n in range(1, max_words + 1) for i in range(len(w) - n + 1)}


def unseen_phrases(web_captions: Sequence[str], kept: Sequence[bool], human_captions: Iterable[str],
                   cfg: PhrasesConfig, seed: int = 0) -> dict[str, Any]:
    """The table described in the module docstring, as a metrics.json object. Above `cfg.sample`
    web texts a seeded sample of that many is read (`texts` says how many were)."""
    if len(web_captions) != len(kept):
        raise ValueError(f"{len(web_captions)} web captions but {len(kept)} kept flags")
    keep = np.asarray(kept, dtype=bool)
    rows = np.arange(len(web_captions))
    if len(rows) > cfg.sample:
        rows = np.sort(np.random.default_rng(seed).choice(rows, cfg.sample, replace=False))
    known: set[str] = set()
    for caption in human_captions:
        known |= phrases(caption, cfg.max_words)
    texts: Counter[str] = Counter()
    kept_texts: Counter[str] = Counter()
    per_text = []
    for i in rows:
        found = phrases(web_captions[i], cfg.max_words) - known
        per_text.append(found)
        texts.update(found)
        if keep[i]:
            kept_texts.update(found)
    base = float(keep[rows].mean()) if len(rows) else 0.0
    frequent = {p for p, n in texts.items() if n >= cfg.min_texts}
    table = []
    for p in frequent:
        n, k = texts[p], kept_texts[p]
        table.append({"phrase": p, "texts": n, "kept": k, "kept_fraction": k / n, "lost": n * base - k})
    table.sort(key=lambda r: (-r["lost"], r["phrase"]))
    with_unseen = [i for i, found in zip(rows, per_text) if found & frequent]
    return {
        "max_words": cfg.max_words, "min_texts": cfg.min_texts, "texts": len(rows),
        "kept_fraction": base, "phrases": len(frequent), "texts_with_one": len(with_unseen),
        "their_kept_fraction": float(keep[with_unseen].mean()) if with_unseen else None,
        "top": [r for r in table if r["lost"] > 0][:cfg.top],
    }
