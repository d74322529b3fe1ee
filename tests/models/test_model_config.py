"""Model presets, dotted overrides and the config.json round trip."""

import json

import pytest

from models.config import PRESETS, BlipConfig, from_dict, resolve_config, to_dict


def test_presets_are_blip_sizes():
    base, large, tiny = PRESETS["base"], PRESETS["large"], PRESETS["tiny"]
    assert (base.vision.width, base.vision.depth, base.vision.heads) == (768, 12, 12)
    assert (large.vision.width, large.vision.depth, large.vision.heads, large.vision.drop_path) == (1024, 24, 16, 0.1)
    assert base.text.vocab_size == 30524 and base.text.bos_token_id == 30522 and base.text.enc_token_id == 30523
    assert base.embed_dim == 256 and base.queue_size == 57600 and base.vision.layer_norm_eps == 1e-6
    assert tiny.vision.image_size == 64 and tiny.vision.num_tokens == 17


def test_overrides_are_applied_and_typed():
    cfg = resolve_config("tiny", {"vision.depth": 2, "text.vocab_size": 321, "embed_dim": 64, "alpha": 1})
    assert cfg.vision.depth == 2 and cfg.text.vocab_size == 321 and cfg.embed_dim == 64
    assert isinstance(cfg.alpha, float) and cfg.alpha == 1.0
    assert PRESETS["tiny"].vision.depth == 4  # presets untouched


@pytest.mark.parametrize("key", ["vision.dpeth", "nope", "text.hidden_size.x"])
def test_unknown_override_names_the_key(key):
    with pytest.raises(ValueError, match=f"unknown model config key '{key}'"):
        resolve_config("tiny", {key: 1})
    with pytest.raises(ValueError, match="'vision' is a section"):
        resolve_config("tiny", {"vision": 1})


def test_wrong_type_and_bad_values_are_rejected():
    with pytest.raises(ValueError, match="vision.depth"):
        resolve_config("tiny", {"vision.depth": "2"})
    with pytest.raises(ValueError, match="vision.grad_checkpointing"):
        resolve_config("tiny", {"vision.grad_checkpointing": 1})
    with pytest.raises(ValueError, match="patch_size"):
        resolve_config("tiny", {"vision.patch_size": 15})
    with pytest.raises(ValueError, match="enc_token_id"):
        resolve_config("tiny", {"text.vocab_size": 4})
    with pytest.raises(ValueError, match="unknown model preset"):
        resolve_config("huge", {})
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="itm_negative_hardness"):
            resolve_config("tiny", {"itm_negative_hardness": bad})


def test_dict_round_trip_through_json():
    cfg = resolve_config("large", {"text.num_layers": 3})
    again = from_dict(json.loads(json.dumps(to_dict(cfg))))
    assert again == cfg and isinstance(again, BlipConfig)
    with pytest.raises(ValueError, match="text.bogus"):
        from_dict({**to_dict(cfg), "text": {**to_dict(cfg)["text"], "bogus": 1}})


def test_init_std_scales_with_width():
    assert PRESETS["base"].text.init_std == pytest.approx(0.02)
    assert PRESETS["tiny"].text.init_std == pytest.approx(0.02 * (768 / 128) ** 0.5)
    assert resolve_config("tiny", {"text.scale_init_with_width": False}).text.init_std == 0.02
