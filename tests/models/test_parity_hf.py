"""Numerical parity with Hugging Face transformers BLIP: a tiny random-weight HF model is converted
into capfilt (`models.convert`), and ITM logits, ITC cosines, decoder logits and greedy/beam
captions must agree; the capfilt model exported back to HF must agree again."""

import dataclasses

import pytest
import torch

from models.blip import BlipCaptioner, BlipFilter
from models.convert import ConversionError, capfilt_to_hf, hf_to_capfilt
from models.convert_config import capfilt_config_to_hf, hf_config_to_capfilt
from models.generation import GenerationConfig, decode_batch, generate, strip_prompt

PAD, CLS, SEP, DEC, ENC = 0, 2, 3, 5, 6
VOCAB, IMAGE = 48, 32
ATOL = 1e-4


def hf_config(image_size: int = IMAGE):
    from transformers import BlipConfig

    text = dict(vocab_size=VOCAB, hidden_size=32, encoder_hidden_size=24, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=40,
                layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                bos_token_id=DEC, eos_token_id=SEP, sep_token_id=SEP, pad_token_id=PAD)
    vision = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=8, layer_norm_eps=1e-6)
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)


def randomise_(model: torch.nn.Module, seed: int, eos_boost: float = 0.0) -> torch.nn.Module:
    """Peaky random weights (HF's default init is near zero for the ViT)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm_gain = ("norm" in name.lower()) and name.endswith("weight")
            p.copy_(1.0 + 0.1 * noise if is_norm_gain else 0.3 * noise)
        for name, p in model.named_parameters():
            if name.endswith("cls.predictions.bias"):
                p[SEP] += eos_boost
    return model.eval()


def batch(seed: int = 0, b: int = 3, t: int = 7, image_size: int = IMAGE):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 3, image_size, image_size, generator=g)
    ids = torch.randint(7, VOCAB, (b, t), generator=g)
    ids[:, 0] = CLS
    mask = torch.ones(b, t, dtype=torch.long)
    ids[0, t - 2:], mask[0, t - 2:] = PAD, 0  # one padded row
    ids[1, t - 1] = SEP
    return image, ids, mask


def to_capfilt(hf_model, cls):
    config = hf_config_to_capfilt(hf_model.config, cls_token_id=CLS, enc_token_id=ENC)
    model = cls(config).eval()
    converted = hf_to_capfilt(hf_model.state_dict(), model.state_dict())
    model.load_state_dict(converted.state, strict=True)
    return model, converted


@pytest.fixture(scope="module")
def hf_retrieval():
    from transformers import BlipForImageTextRetrieval

    torch.manual_seed(0)
    return randomise_(BlipForImageTextRetrieval(hf_config()), seed=1)


@pytest.fixture(scope="module")
def hf_captioner():
    from transformers import BlipForConditionalGeneration

    torch.manual_seed(0)
    return randomise_(BlipForConditionalGeneration(hf_config()), seed=2, eos_boost=3.0)


def check_itm_itc(hf_model, ours, seed=0):
    image, ids, mask = batch(seed)
    enc_ids = ids.clone()
    enc_ids[:, 0] = ENC  # capfilt writes [ENC] itself; HF uses the ids as given
    with torch.no_grad():
        ref_itm = hf_model(input_ids=enc_ids, pixel_values=image, attention_mask=mask).itm_score
        ref_itc = hf_model(input_ids=ids, pixel_values=image, attention_mask=mask, use_itm_head=False).itm_score
        embeds = ours.encode_image(image)
        itm = ours.itm_logits(embeds, ids, mask, torch.arange(ids.shape[0]))
        itc = ours.itc_similarity(embeds, ids, mask)
    assert ref_itm.abs().max() > 0.1  # not a degenerate model
    torch.testing.assert_close(itm, ref_itm, atol=ATOL, rtol=0)
    torch.testing.assert_close(itc, ref_itc, atol=ATOL, rtol=0)


def check_decoder_logits(hf_model, ours, seed=0):
    image, ids, mask = batch(seed)
    ids[:, 0] = DEC
    with torch.no_grad():
        ref = hf_model(pixel_values=image, input_ids=ids, attention_mask=mask).logits
        got = ours.decoder_logits(ids, mask, ours.encode_image(image))
    keep = mask.bool()
    assert ref[keep].std() > 0.1
    torch.testing.assert_close(got[keep], ref[keep], atol=ATOL, rtol=0)


def check_captions(hf_model, ours, decoding, num_beams, seed=0):
    image, _, _ = batch(seed, b=4)
    prompt = torch.tensor([[CLS, 9, 10, SEP]]).repeat(4, 1)  # HF writes [DEC] and drops [SEP]
    ours_prompt = prompt[:, :-1].clone()
    ours_prompt[:, 0] = DEC
    cfg = GenerationConfig(decoding=decoding, num_beams=num_beams, max_new_tokens=10, min_new_tokens=2,
                           eos_token_id=SEP, pad_token_id=PAD)
    with torch.no_grad():
        ref = hf_model.generate(pixel_values=image, input_ids=prompt.clone(), num_beams=num_beams,
                                do_sample=False, max_new_tokens=10, min_new_tokens=2)
        got = generate(ours.step_decoder(), ours_prompt, ours.encode_image(image), cfg)
    ref_rows = decode_batch(strip_prompt(ref, 3), SEP, PAD)
    assert decode_batch(got.new_tokens, SEP, PAD) == ref_rows
    assert len({tuple(r) for r in ref_rows}) > 1  # captions depend on the image


def test_hf_retrieval_converts_to_a_filter_with_equal_itm_and_itc(hf_retrieval):
    ours, converted = to_capfilt(hf_retrieval, BlipFilter)
    check_itm_itc(hf_retrieval, ours)
    # HF has no momentum copies, queues or temperature: they are initialised and reported
    assert "visual_encoder_m.pos_embed" in converted.filled and "temp" in converted.filled
    torch.testing.assert_close(ours.visual_encoder_m.pos_embed, ours.visual_encoder.pos_embed)


def test_hf_captioner_converts_with_equal_logits_and_captions(hf_captioner):
    ours, converted = to_capfilt(hf_captioner, BlipCaptioner)
    check_decoder_logits(hf_captioner, ours)
    check_captions(hf_captioner, ours, "greedy", 1)
    check_captions(hf_captioner, ours, "beam", 3, seed=1)
    assert not converted.dropped


def test_export_back_to_hf_keeps_parity(hf_captioner, hf_retrieval):
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    for hf_model, cls, hf_cls, arch in (
        (hf_captioner, BlipCaptioner, BlipForConditionalGeneration, "BlipForConditionalGeneration"),
        (hf_retrieval, BlipFilter, BlipForImageTextRetrieval, "BlipForImageTextRetrieval"),
    ):
        ours, _ = to_capfilt(hf_model, cls)
        exported = capfilt_to_hf(ours.state_dict(), arch)
        again = hf_cls(capfilt_config_to_hf(ours.config, arch)).eval()
        result = again.load_state_dict(exported.state, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        if cls is BlipFilter:
            assert "temp" in exported.dropped and "image_queue" in exported.dropped
            check_itm_itc(again, ours, seed=3)
        else:
            check_decoder_logits(again, ours, seed=3)
            check_captions(again, ours, "beam", 2, seed=4)


def test_config_round_trip_is_exact_and_sets_parity_fields_explicitly(hf_captioner):
    ours = hf_config_to_capfilt(hf_captioner.config, cls_token_id=CLS, enc_token_id=ENC)
    hf = capfilt_config_to_hf(ours, "BlipForConditionalGeneration")
    assert hf.text_config.num_attention_heads == 4 and hf.vision_config.layer_norm_eps == 1e-6
    assert hf_config_to_capfilt(hf, cls_token_id=CLS, enc_token_id=ENC) == ours
    from models.config import resolve_config

    base = resolve_config("base")
    hf_base = capfilt_config_to_hf(base, "BlipForImageTextRetrieval")
    # HF's own defaults would be 8 heads, eps 1e-5, dropout 0, no label smoothing
    assert hf_base.text_config.num_attention_heads == 12
    assert hf_base.vision_config.layer_norm_eps == 1e-6
    assert hf_base.text_config.hidden_dropout_prob == 0.1 and hf_base.text_config.label_smoothing == 0.1
    assert hf_config_to_capfilt(hf_base, base.text.cls_token_id, base.text.enc_token_id) == base


def test_position_table_is_interpolated_like_hf_runtime_interpolation(hf_retrieval):
    config = hf_config_to_capfilt(hf_retrieval.config, cls_token_id=CLS, enc_token_id=ENC)
    bigger = dataclasses.replace(config, vision=dataclasses.replace(config.vision, image_size=48))
    ours = BlipFilter(bigger).eval()
    converted = hf_to_capfilt(hf_retrieval.state_dict(), ours.state_dict())
    assert converted.resized == ("visual_encoder.pos_embed",)
    ours.load_state_dict(converted.state)
    image, ids, mask = batch(5, image_size=48)
    with torch.no_grad():
        ref = hf_retrieval.vision_model(pixel_values=image, interpolate_pos_encoding=True).last_hidden_state
        got = ours.encode_image(image)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_missing_unexpected_and_misshaped_keys_are_named(hf_retrieval):
    ours = BlipFilter(hf_config_to_capfilt(hf_retrieval.config, cls_token_id=CLS, enc_token_id=ENC))
    state = dict(hf_retrieval.state_dict())
    del state["itm_head.bias"]
    state["text_encoder.pooler.dense.weight"] = torch.zeros(2, 2)
    state["vision_proj.weight"] = torch.zeros(3, 24)
    with pytest.raises(ConversionError) as err:
        hf_to_capfilt(state, ours.state_dict())
    message = str(err.value)
    assert "itm_head.bias" in message and "text_encoder.pooler.dense.weight" in message
    assert "vision_proj.weight (3, 24)" in message
    with pytest.raises(ConversionError, match="logit_scale"):
        hf_to_capfilt({"logit_scale": torch.zeros(())}, ours.state_dict())


def test_untied_decoder_weights_are_refused(hf_captioner):
    ours = BlipCaptioner(hf_config_to_capfilt(hf_captioner.config, cls_token_id=CLS, enc_token_id=ENC))
    state = {k: v.clone() for k, v in hf_captioner.state_dict().items()}
    state["text_decoder.cls.predictions.decoder.weight"] += 1.0
    with pytest.raises(ConversionError, match="tied"):
        hf_to_capfilt(state, ours.state_dict())
    # a save_pretrained state dict lacks the tied keys: they are filled from their twin
    del state["text_decoder.cls.predictions.decoder.weight"], state["text_decoder.cls.predictions.decoder.bias"]
    converted = hf_to_capfilt(state, ours.state_dict())
    assert "text_decoder.cls.predictions.decoder.weight" in converted.filled
