"""The generation budgets in params.yaml leave room for the embedded corpus's longest captions.

Evaluation and bootstrapping stop decoding after `max_new_tokens` (EOS included). A budget below
the length of the corpus's full descriptions cuts every long caption mid-object, and the synth
scorer then counts the cut objects' attributes (and the object count) as wrong: with a budget of
16 on a 3-object corpus the measured position accuracy was at chance although the captioner's
untruncated captions were far better, and the bootstrap stage stored truncated synthetic captions.
"""

from pathlib import Path

import numpy as np
from tokenizers import normalizers, pre_tokenizers

from components.config import load_params
from components.synth_text import human_captions
from components.synth_world import sample_scene
from components.text import pre_caption

ROOT = Path(__file__).resolve().parents[2]


def _longest_human_caption_tokens(scenes: int = 300) -> int:
    """Word-level tokens (words and commas, as the corpus tokenizer splits them) of the longest
    human caption over `scenes` embedded-corpus scenes drawn with the params' synth settings."""
    synth = load_params(ROOT / "params.yaml").synth
    rng = np.random.default_rng(synth.seed)
    norm = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    split = pre_tokenizers.BertPreTokenizer()
    longest = 0
    for _ in range(scenes):
        scene = sample_scene(rng, synth.image_size, synth.max_objects, synth.duplicate_prob, synth.jitter)
        for caption in human_captions(scene, synth.captions_per_image, rng):
            text = norm.normalize_str(pre_caption(caption))
            longest = max(longest, len(split.pre_tokenize_str(text)))
    return longest


def test_longest_caption_is_long():
    # Guards the helper: the corpus's 3-object descriptions run well past 16 tokens.
    assert _longest_human_caption_tokens() > 20


def test_generation_budgets_fit_the_longest_caption():
    params = load_params(ROOT / "params.yaml")
    need = _longest_human_caption_tokens() + 1  # + EOS
    budgets = {"evaluate.max_new_tokens": params.evaluate.max_new_tokens,
               "bootstrap.max_new_tokens": params.bootstrap.max_new_tokens}
    short = {k: v for k, v in budgets.items() if v < need}
    assert not short, f"{short}: the corpus's longest caption needs {need} new tokens"
