"""The MED text transformer: modes, masks, BERT/BLIP names, KV cache and shared image keys."""

import pytest
import torch

from models.config import resolve_config
from models.kv_cache import ImageKV
from models.med import TextDecoder, TextTransformer

CFG = resolve_config("tiny", {"text.num_layers": 2, "text.vocab_size": 50})
V_WIDTH = 96  # a vision width different from the text width, to catch K/V shape mix-ups


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return TextTransformer(CFG.text, V_WIDTH).eval()


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(1)
    return TextDecoder(CFG.text, V_WIDTH).eval()


def _ids(b, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (b, t), generator=g)
    ids[:, 0] = CFG.text.bos_token_id
    return ids


def test_parameter_names_follow_blip(decoder):
    names = set(decoder.state_dict())
    for name in ["bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
                 "bert.embeddings.LayerNorm.weight", "bert.encoder.layer.1.attention.self.query.weight",
                 "bert.encoder.layer.1.attention.output.LayerNorm.bias",
                 "bert.encoder.layer.1.crossattention.self.key.weight",
                 "bert.encoder.layer.1.crossattention.output.dense.weight",
                 "bert.encoder.layer.1.intermediate.dense.weight", "bert.encoder.layer.1.output.LayerNorm.weight",
                 "cls.predictions.bias", "cls.predictions.transform.dense.weight",
                 "cls.predictions.transform.LayerNorm.weight", "cls.predictions.decoder.weight",
                 "cls.predictions.decoder.bias"]:
        assert name in names, name
    assert not any("token_type" in n or "pooler" in n for n in names)
    assert decoder.state_dict()["bert.encoder.layer.0.crossattention.self.key.weight"].shape == (128, V_WIDTH)
    assert decoder.cls.predictions.decoder.weight is decoder.bert.embeddings.word_embeddings.weight
    assert decoder.cls.predictions.decoder.bias is decoder.cls.predictions.bias


def test_text_mode_skips_cross_attention(encoder):
    ids, img = _ids(2, 7), torch.randn(2, 5, V_WIDTH)
    with torch.no_grad():
        text = encoder(ids, None, "text")
        text_with_image = encoder(ids, None, "text", image_embeds=img)
        multi_a = encoder(ids, None, "multimodal", image_embeds=img)
        multi_b = encoder(ids, None, "multimodal", image_embeds=img * 2 + 1)
    torch.testing.assert_close(text, text_with_image)
    assert (multi_a - multi_b).abs().max() > 1e-3
    assert (multi_a - text).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs image_embeds"):
        encoder(ids, None, "multimodal")
    with pytest.raises(ValueError, match="unknown text mode"):
        encoder(ids, None, "causal")


def test_padding_mask_hides_pad_tokens(encoder):
    ids = _ids(1, 6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    other = ids.clone()
    other[0, 4:] = 7
    with torch.no_grad():
        a = encoder(ids, mask, "text")
        b = encoder(other, mask, "text")
    torch.testing.assert_close(a[:, :4], b[:, :4])


def test_decoder_is_causal(decoder):
    ids, img = _ids(2, 8), torch.randn(2, 5, V_WIDTH)
    changed = ids.clone()
    changed[:, 5:] = 9
    with torch.no_grad():
        a, b = decoder(ids, None, img), decoder(changed, None, img)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-3


def test_kv_cache_matches_full_forward(decoder):
    ids, img = _ids(3, 9, seed=3), torch.randn(3, 5, V_WIDTH)
    with torch.no_grad():
        full = decoder(ids, torch.ones_like(ids), img)  # (B, T, V)
        logits, cache = decoder.prefill(ids[:, :3], img)
        steps = [logits]
        for t in range(3, 9):
            logits, cache = decoder.step(ids[:, t:t + 1], cache)
            steps.append(logits)
    assert cache.length == 9 and logits.dtype == torch.float32
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 2:], rtol=0, atol=1e-5)


def test_reorder_expand_beam_and_drop(decoder):
    ids, img = _ids(3, 9, seed=4), torch.randn(3, 5, V_WIDTH)
    expand = torch.arange(3).repeat_interleave(2)  # B -> B*K
    beam = torch.tensor([1, 1, 2, 3, 5, 4])  # reorder within each image
    drop = torch.tensor([0, 2, 3])  # rows leave the batch, uneven per image
    with torch.no_grad():
        _, cache = decoder.prefill(ids[:, :3], img)
        cache = decoder.reorder(cache, expand)
        assert cache.image.group == 2 and cache.image.keys[0].shape[0] == 3  # no copy of image keys
        rows = expand
        for t, select in [(3, beam), (4, drop)]:
            cache = decoder.reorder(cache, select)
            rows = rows[select]
            logits, cache = decoder.step(ids[rows, t:t + 1], cache)
            full = decoder(ids[rows, : t + 1], None, img[rows])
            torch.testing.assert_close(logits, full[:, t], rtol=0, atol=1e-5)
        assert cache.image.keys[0].shape[0] == 3 and cache.image.index is None


def test_image_kv_fold_and_gather_agree(encoder):
    torch.manual_seed(5)
    img, ids = torch.randn(3, 5, V_WIDTH), _ids(6, 7, seed=5)
    with torch.no_grad():
        expanded = encoder(ids, None, "multimodal", image_embeds=img.repeat_interleave(2, 0))
        grouped_kv = encoder.image_kv(img, torch.arange(3).repeat_interleave(2))
        assert grouped_kv.group == 2
        grouped = encoder(ids, None, "multimodal", image_kv=grouped_kv)
        index = torch.tensor([2, 0, 1, 1, 0, 2])
        gathered_kv = encoder.image_kv(img, index)
        assert gathered_kv.group is None
        gathered = encoder(ids, None, "multimodal", image_kv=gathered_kv)
        reference = encoder(ids, None, "multimodal", image_embeds=img[index])
    torch.testing.assert_close(grouped, expanded, rtol=0, atol=1e-5)
    torch.testing.assert_close(gathered, reference, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        ImageKV.build(grouped_kv.keys, grouped_kv.values, torch.tensor([0, 3]))


def test_positions_beyond_table_are_an_error(encoder):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        encoder(_ids(1, CFG.text.max_position_embeddings + 1), None, "text")


def test_init_std_is_scaled(decoder):
    std = decoder.bert.encoder.layer[0].crossattention.self.query.weight.std().item()
    assert std == pytest.approx(CFG.text.init_std, rel=0.1)
    assert decoder.bert.embeddings.word_embeddings.weight[CFG.text.pad_token_id].abs().sum() == 0
