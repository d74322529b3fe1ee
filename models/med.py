"""The MED text transformer (BERT layers + cross-attention in every layer) and its LM decoder.

Written in plain PyTorch rather than on transformers' BERT classes because we need three things
those make awkward in transformers 5.x: `F.scaled_dot_product_attention`, a self-attention KV
cache we control (`models.kv_cache`), and cross-attention keys/values computed once per image and
shared by many text rows. The math is BLIP's: post-LN layers, exact GELU, no token-type
embeddings, additive -10000 masks, absolute positions from `arange` (+ cache length). Parameter
names follow BLIP/BERT (`embeddings.word_embeddings`, `encoder.layer.N.attention.self.query`,
`crossattention.*`, `intermediate.dense`, `output.LayerNorm`, `cls.predictions.*`) so official
and Hugging Face checkpoints map one-to-one. Modes: `text` (bidirectional, no cross-attention),
`multimodal` (bidirectional + image) and `decoder` (causal + image).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import TextConfig
from models.kv_cache import DecoderCache, ImageKV

Mode = Literal["text", "multimodal", "decoder"]
MASK_VALUE = -10000.0  # BLIP/BERT additive mask


class AttentionProjections(nn.Module):
    """`attention.self` / `crossattention.self`: query from text, key/value from `kv_width`."""

    def __init__(self, hidden: int, heads: int, kv_width: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)

    def split(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, h, L, dh)."""
        b, length, _ = x.shape
        return x.view(b, length, self.heads, -1).transpose(1, 2)

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L, Dkv) -> keys, values (B, h, L, dh)."""
        return self.split(self.key(x)), self.split(self.value(x))


class ResidualOutput(nn.Module):
    """`*.output`: dense -> dropout -> LayerNorm(x + residual) (post-LN)."""

    def __init__(self, d_in: int, hidden: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)  # noqa: N815 (BERT parameter name)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    """`attention` / `crossattention`: projections (`self`) and the residual `output`."""

    def __init__(self, config: TextConfig, kv_width: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.self = AttentionProjections(d, config.num_heads, kv_width)
        self.output = ResidualOutput(d, d, config.layer_norm_eps, config.dropout)


class Intermediate(nn.Module):
    """`intermediate`: dense -> exact GELU."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


def _merge(x: Tensor) -> Tensor:
    """(B, h, T, dh) -> (B, T, h*dh)."""
    b, h, t, dh = x.shape
    return x.transpose(1, 2).reshape(b, t, h * dh)


class MedLayer(nn.Module):
    """Self-attention, cross-attention (present in every layer, used when an image is given), FFN."""

    def __init__(self, config: TextConfig, encoder_width: int) -> None:
        super().__init__()
        self.attention = Attention(config, config.hidden_size)
        self.crossattention = Attention(config, encoder_width)
        self.intermediate = Intermediate(config)
        self.output = ResidualOutput(config.intermediate_size, config.hidden_size,
                                     config.layer_norm_eps, config.dropout)
        self.attn_dropout = config.attention_dropout

    def forward(self, x: Tensor, self_mask: Tensor | None, image: ImageKV | None, index: int,
                past: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, T, D) -> (B, T, D) and this layer's self-attention keys/values (B, h, t+T, dh)."""
        p = self.attn_dropout if self.training else 0.0
        proj = self.attention.self
        q = proj.split(proj.query(x))  # (B, h, T, dh)
        k, v = proj.keys_values(x)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=self_mask, dropout_p=p)
        x = self.attention.output(_merge(ctx), x)
        if image is not None:
            cross = self.crossattention.self
            ctx = image.attend(index, cross.split(cross.query(x)), dropout_p=p)
            x = self.crossattention.output(_merge(ctx), x)
        x = self.output(self.intermediate(x), x)
        return x, (k, v)


class Embeddings(nn.Module):
    """Word + absolute position embeddings -> LayerNorm -> dropout (no token types, as BLIP)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                            padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # noqa: N815
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: Tensor, offset: int = 0) -> Tensor:
        """input_ids (B, T) -> (B, T, D); positions offset..offset+T-1."""
        length = input_ids.shape[1]
        limit = self.position_embeddings.num_embeddings
        if offset + length > limit:
            raise ValueError(f"text of {offset + length} tokens exceeds max_position_embeddings {limit}")
        positions = torch.arange(offset, offset + length, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        return self.dropout(self.LayerNorm(x))


class LayerStack(nn.Module):
    """`encoder`: holds `layer` (BERT naming)."""

    def __init__(self, config: TextConfig, encoder_width: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(MedLayer(config, encoder_width) for _ in range(config.num_layers))


def self_attention_mask(attention_mask: Tensor | None, length: int, causal: bool,
                        dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """Additive mask (B or 1, 1, T, T) or (B, 1, 1, T): 0 where attended, -10000 elsewhere."""
    keep = None
    if attention_mask is not None:
        keep = attention_mask[:, None, None, :].to(device) != 0  # (B, 1, 1, T)
    if causal:
        tri = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
        keep = tri if keep is None else keep & tri  # (B, 1, T, T)
    if keep is None:
        return None
    return (~keep).to(dtype) * MASK_VALUE


def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT init: normal(0, std) linears and embeddings (pad row zeroed), zero biases, unit LN."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class TextTransformer(nn.Module):
    """BLIP's `BertModel` without pooler: `embeddings` + `encoder.layer.N`."""

    def __init__(self, config: TextConfig, encoder_width: int) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = LayerStack(config, encoder_width)
        init_bert_weights(self, config.init_std)

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layer

    def image_kv(self, image_embeds: Tensor, index: Tensor | None = None) -> ImageKV:
        """Cross-attention keys/values of (B_img, N, Dv) image tokens, once per layer."""
        pairs = [layer.crossattention.self.keys_values(image_embeds) for layer in self.layers]
        return ImageKV.build(tuple(k for k, _ in pairs), tuple(v for _, v in pairs), index)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, mode: Mode = "text",
                image_embeds: Tensor | None = None, image_kv: ImageKV | None = None) -> Tensor:
        """input_ids (B, T) -> hidden states (B, T, D).

        `text` ignores the image (no cross-attention); `multimodal` and `decoder` need
        `image_embeds` (B, N, Dv) or precomputed `image_kv`; `decoder` is causal.
        """
        if mode not in ("text", "multimodal", "decoder"):
            raise ValueError(f"unknown text mode {mode!r}; use 'text', 'multimodal' or 'decoder'")
        image = None
        if mode != "text":
            if image_kv is None and image_embeds is None:
                raise ValueError(f"mode {mode!r} needs image_embeds or image_kv")
            image = image_kv if image_kv is not None else self.image_kv(image_embeds)
        x = self.embeddings(input_ids)  # (B, T, D)
        mask = self_attention_mask(attention_mask, input_ids.shape[1], mode == "decoder", x.dtype, x.device)
        for i, layer in enumerate(self.layers):
            x, _ = layer(x, mask, image, i)
        return x

    def forward_cached(self, input_ids: Tensor, image: ImageKV,
                       cache: DecoderCache | None) -> tuple[Tensor, DecoderCache]:
        """Causal pass over new tokens (B, T) given the cached prefix -> (B, T, D), new cache."""
        offset = 0 if cache is None else cache.length
        x = self.embeddings(input_ids, offset)
        length = input_ids.shape[1]
        # New tokens see the whole cached prefix; among themselves the mask is causal.
        mask = None
        if length > 1:
            causal = self_attention_mask(None, length, True, x.dtype, x.device)  # (1, 1, T, T)
            mask = F.pad(causal, (offset, 0)) if offset else causal
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            past = None if cache is None else (cache.self_keys[i], cache.self_values[i])
            x, (k, v) = layer(x, mask, image, i, past)
            keys.append(k)
            values.append(v)
        return x, DecoderCache(tuple(keys), tuple(values), image)


class PredictionTransform(nn.Module):
    """`cls.predictions.transform`: dense -> GELU -> LayerNorm."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # noqa: N815

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class PredictionHead(nn.Module):
    """`cls.predictions`: transform, `decoder` (weight tied to word embeddings), `bias`."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.transform = PredictionTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias  # one Parameter under both names, as in BERT

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.transform(x))


class LMHead(nn.Module):
    """`cls`: holds `predictions` (BERT naming)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.predictions = PredictionHead(config)


class TextDecoder(nn.Module):
    """BLIP's `BertLMHeadModel`: `bert` (causal, cross-attending) + `cls` LM head.

    Implements the `StepDecoder` protocol of `models.kv_cache` for generation: `prefill`
    computes the image keys/values once per layer and caches the prompt, `step` feeds one token,
    `reorder` selects or repeats rows without copying the image keys/values.
    """

    def __init__(self, config: TextConfig, encoder_width: int) -> None:
        super().__init__()
        self.config = config
        self.bert = TextTransformer(config, encoder_width)
        self.cls = LMHead(config)
        init_bert_weights(self.cls, config.init_std)
        nn.init.zeros_(self.cls.predictions.bias)
        self.tie_weights()

    def tie_weights(self) -> None:
        """The output matrix is the word-embedding matrix (same Parameter)."""
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                image_embeds: Tensor | None = None, image_kv: ImageKV | None = None) -> Tensor:
        """input_ids (B, T) with [DEC] at 0 -> logits (B, T, V) for the next token at each position."""
        hidden = self.bert(input_ids, attention_mask, "decoder", image_embeds, image_kv)
        return self.cls.predictions(hidden)

    def prefill(self, input_ids: Tensor, image_embeds: Tensor) -> tuple[Tensor, DecoderCache]:
        """Prompt (B, T) and image tokens (B, N, Dv) -> next-token logits (B, V) float, cache."""
        hidden, cache = self.bert.forward_cached(input_ids, self.bert.image_kv(image_embeds), None)
        return self.cls.predictions(hidden[:, -1]).float(), cache

    def step(self, input_ids: Tensor, cache: DecoderCache) -> tuple[Tensor, DecoderCache]:
        """Newest token (B, 1) -> next-token logits (B, V) float, extended cache."""
        hidden, cache = self.bert.forward_cached(input_ids, cache.image, cache)
        return self.cls.predictions(hidden[:, -1]).float(), cache

    def reorder(self, cache: DecoderCache, index: Tensor) -> DecoderCache:
        """Rows `index` (B',) of the current rows (beam reorder, or expanding B to B*K)."""
        return cache.select(index)
