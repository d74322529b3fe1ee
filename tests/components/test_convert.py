"""`capfilt convert / export / caption / match` on tiny random checkpoints: an official-layout
round trip, transformers folders in and out (logits compared), JSON-line outputs, and bad input
reported as one-line errors that name the file."""

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from components.checkpoints import load_model_dir, read_state_dict
from components.cli import main
from components.config import TokenizerConfig
from components.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from models.blip import BlipCaptioner, BlipFilter, BlipPretrain
from models.config import resolve_config
from models.convert import capfilt_to_official

CAPTIONS = ["a red circle on the left", "a blue square at the top", "two green triangles",
            "a picture of a yellow star", "the red square is big", "small blue circles"]
SIZES = {"vision.image_size": 32, "vision.patch_size": 8, "vision.width": 32, "vision.depth": 2,
         "vision.heads": 4, "text.hidden_size": 32, "text.num_layers": 2, "text.num_heads": 4,
         "text.intermediate_size": 64, "text.max_position_embeddings": 40, "embed_dim": 16, "queue_size": 8}
HEADS = ["--set", "vision.heads=4", "--set", "text.num_heads=4"]  # not readable from shapes


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer(CAPTIONS, TokenizerConfig(vocab_size=80)), folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("img")
    paths = []
    for i, colour in enumerate(["red", "blue", (0, 200, 40)]):
        im = Image.new("RGB", (48 + 8 * i, 40), "white")
        im.paste(colour, (4 * i, 5, 30, 30))
        paths.append(folder / f"im{i}.png")
        im.save(paths[-1])
    return paths


def tiny_config(tok_dir: Path):
    tok = load_tokenizer(tok_dir)
    ids = {f"text.{k}": tok.token_to_id(t) for k, t in
           {"pad_token_id": "[PAD]", "cls_token_id": "[CLS]", "sep_token_id": "[SEP]",
            "bos_token_id": "[DEC]", "enc_token_id": "[ENC]"}.items()}
    return resolve_config("tiny", {**SIZES, **ids, "text.vocab_size": tok.get_vocab_size()})


def peaky_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("_m") and "norm" not in name.lower():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# --------------------------------------------------------------------------- official layout


@pytest.fixture(scope="module")
def official_pth(tmp_path_factory, tok_dir):
    torch.manual_seed(0)
    model = peaky_(BlipPretrain(tiny_config(tok_dir)), seed=1)
    state = capfilt_to_official(model.state_dict())
    assert "text_decoder.bert.embeddings.position_ids" in state
    path = tmp_path_factory.mktemp("official") / "model_base.pth"
    torch.save({"model": state, "epoch": 19, "config": {"vit": "base"}}, path)
    return path, model


def test_official_round_trip_into_pretrain_captioner_and_filter(official_pth, tok_dir, tmp_path, capsys):
    path, original = official_pth
    expected = original.state_dict()
    for target, cls in (("pretrain", BlipPretrain), ("captioner", BlipCaptioner), ("filter", BlipFilter)):
        out = tmp_path / target
        code, stdout, err = cli(capsys, "convert", path, "--from", "official", "--tokenizer", tok_dir,
                                "--target", target, "--out", out, *HEADS)
        assert code == 0, err
        model = load_model_dir(out, cls)
        state = model.state_dict()
        shared = [k for k in state if k in expected and k != "ptr_queue"]
        assert len(shared) >= len(state) - 2
        for key in shared:
            torch.testing.assert_close(state[key], expected[key], rtol=0, atol=0, msg=key)
        assert (out / "tokenizer.json").is_file()
    assert "dropped" in stdout  # the filter drops the decoder, by name
    # the decoupled copies are independent models that compute what the pre-training model did
    captioner = load_model_dir(tmp_path / "captioner", BlipCaptioner).eval()
    image, ids = torch.randn(2, 3, 32, 32), torch.tensor([[5, 9, 10, 11], [5, 12, 13, 3]])
    with torch.no_grad():
        ref = original.text_decoder(ids, None, image_embeds=original.visual_encoder(image))
        got = captioner.decoder_logits(ids, None, captioner.encode_image(image))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_official_checkpoint_at_another_image_size_is_interpolated(official_pth, tok_dir, tmp_path, capsys):
    path, _ = official_pth
    code, stdout, err = cli(capsys, "convert", path, "--from", "official", "--tokenizer", tok_dir,
                            "--target", "captioner", "--image-size", "48", "--out", tmp_path / "c48", *HEADS)
    assert code == 0, err
    assert "resized" in stdout
    assert read_state_dict(tmp_path / "c48")["visual_encoder.pos_embed"].shape == (1, 37, 32)


def test_official_errors_name_the_file_or_key(official_pth, tok_dir, tmp_path, capsys):
    path, _ = official_pth
    code, _, err = cli(capsys, "convert", path, "--from", "official", "--out", tmp_path / "x")
    assert code == 2 and "--tokenizer" in err and str(path) in err
    garbage = tmp_path / "broken.pth"
    garbage.write_bytes(b"not a checkpoint")
    code, _, err = cli(capsys, "convert", garbage, "--from", "official", "--tokenizer", tok_dir,
                       "--out", tmp_path / "x")
    assert code == 2 and str(garbage) in err
    state = torch.load(path, weights_only=True)["model"]
    state["text_decoder.cls.extra.weight"] = torch.zeros(2)
    del state["visual_encoder.norm.bias"]
    bad = tmp_path / "bad.pth"
    torch.save({"model": state}, bad)
    code, _, err = cli(capsys, "convert", bad, "--from", "official", "--tokenizer", tok_dir,
                       "--target", "captioner", "--out", tmp_path / "x", *HEADS)
    assert code == 2 and "text_decoder.cls.extra.weight" in err and "visual_encoder.norm.bias" in err
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- transformers layout


def hf_folder(kind: str, tok_dir: Path, folder: Path, seed: int):
    import transformers

    tok = load_tokenizer(tok_dir)
    sep, dec = tok.token_to_id("[SEP]"), tok.token_to_id("[DEC]")
    text = dict(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=40, bos_token_id=dec, eos_token_id=sep,
                sep_token_id=sep, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8, layer_norm_eps=1e-6)
    cfg = transformers.BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)
    torch.manual_seed(seed)
    model = getattr(transformers, kind)(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name.lower():
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + len(name)))
    model.eval().save_pretrained(folder)
    # a tokenizer as transformers saves BLIP's: BERT with [DEC] as bos and [ENC] as extra token
    transformers.BertTokenizer(vocab=tok.get_vocab(), bos_token="[DEC]",
                               extra_special_tokens=["[ENC]"]).save_pretrained(folder)
    return model


def test_hf_captioner_convert_caption_export_round_trip(tok_dir, images, tmp_path, capsys):
    from transformers import AutoTokenizer, BlipForConditionalGeneration

    hf = hf_folder("BlipForConditionalGeneration", tok_dir, tmp_path / "hf", seed=3)
    code, _, err = cli(capsys, "convert", tmp_path / "hf", "--from", "hf", "--out", tmp_path / "cap")
    assert code == 0, err
    ours = load_model_dir(tmp_path / "cap", BlipCaptioner).eval()
    image = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[5, 9, 10, 11, 12], [5, 13, 14, 15, 3]])
    with torch.no_grad():
        ref = hf(pixel_values=image, input_ids=ids).logits
        torch.testing.assert_close(ours.decoder_logits(ids, None, ours.encode_image(image)), ref, atol=1e-4, rtol=0)

    code, out, err = cli(capsys, "caption", "--checkpoint", tmp_path / "cap", *images, "--decoding", "greedy",
                         "--max-new-tokens", "6", "--prompt", "a picture of")
    rows = json_lines(out)
    assert code == 0, err
    assert [r["image"] for r in rows] == [str(p) for p in images]
    assert all(isinstance(r["caption"], str) and not r["caption"].startswith("a picture of") for r in rows)
    code, out2, _ = cli(capsys, "caption", "--checkpoint", tmp_path / "cap", *images, "--decoding", "nucleus",
                        "--seed", "7", "--batch-size", "2")
    code3, out3, _ = cli(capsys, "caption", "--checkpoint", tmp_path / "cap", *images, "--decoding", "nucleus",
                         "--seed", "7", "--batch-size", "2")
    assert code == code3 == 0 and json_lines(out2) == json_lines(out3)  # seeded

    code, _, err = cli(capsys, "export", tmp_path / "cap", "--to", "hf", "--out", tmp_path / "back")
    assert code == 0, err
    again = BlipForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(pixel_values=image, input_ids=ids).logits, ref, atol=1e-4, rtol=0)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "back")
    assert hf_tok("a red circle").input_ids == load_tokenizer(tok_dir).encode("a red circle").ids
    assert hf_tok.convert_tokens_to_ids("[ENC]") == load_tokenizer(tok_dir).token_to_id("[ENC]")


def test_hf_retrieval_convert_match_export(tok_dir, images, tmp_path, capsys):
    from transformers import BlipForImageTextRetrieval

    hf = hf_folder("BlipForImageTextRetrieval", tok_dir, tmp_path / "hf", seed=4)
    code, _, err = cli(capsys, "convert", tmp_path / "hf", "--from", "hf", "--out", tmp_path / "filt")
    assert code == 0, err
    texts = ["a red circle", "two blue squares"]
    code, out, err = cli(capsys, "match", "--checkpoint", tmp_path / "filt", "--image", images[0], "--text", *texts)
    rows = json_lines(out)
    assert code == 0, err
    assert [r["text"] for r in rows] == texts
    assert all(0.0 <= r["itm"] <= 1.0 and -1.0 <= r["itc"] <= 1.0 for r in rows)
    # the same numbers straight from transformers on the same pixels and ids
    from components.batch_inference import tokenize
    from components.config import TextInput
    from components.predict import load_images

    tok = load_tokenizer(tok_dir)
    pixels = load_images([images[0]], 32)
    padded, mask = tokenize(tok, texts, TextInput(max_tokens=40), torch.device("cpu"))  # (M, T)
    for row, ids in zip(rows, [i[m.bool()] for i, m in zip(padded, mask)]):
        enc = ids.clone()
        enc[0] = tok.token_to_id("[ENC]")
        with torch.no_grad():
            itm = hf(input_ids=enc[None], pixel_values=pixels).itm_score.softmax(-1)[0, 1]
            itc = hf(input_ids=ids[None], pixel_values=pixels, use_itm_head=False).itm_score[0, 0]
        assert abs(row["itm"] - float(itm)) < 1e-4 and abs(row["itc"] - float(itc)) < 1e-4

    code, _, err = cli(capsys, "export", tmp_path / "filt", "--to", "hf", "--out", tmp_path / "back")
    assert code == 0, err
    again = BlipForImageTextRetrieval.from_pretrained(tmp_path / "back").eval()
    probe = torch.tensor([[6, 9, 10, 3]])
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=probe, pixel_values=pixels).itm_score,
                                   hf(input_ids=probe, pixel_values=pixels).itm_score, atol=1e-4, rtol=0)


def test_model_command_errors_are_one_line_and_name_the_input(tok_dir, images, official_pth, tmp_path, capsys):
    code, _, err = cli(capsys, "convert", tmp_path / "nowhere", "--from", "hf", "--out", tmp_path / "x")
    assert code == 2 and "config.json" in err
    path, _ = official_pth
    cli(capsys, "convert", path, "--from", "official", "--tokenizer", tok_dir, "--target", "filter",
        "--out", tmp_path / "filt", *HEADS)
    code, _, err = cli(capsys, "caption", "--checkpoint", tmp_path / "filt", images[0])
    assert code == 2 and "BlipFilter" in err and "BlipCaptioner" in err
    code, _, err = cli(capsys, "match", "--checkpoint", tmp_path / "filt", "--image", tmp_path / "no.png",
                       "--text", "x")
    assert code == 2 and "no.png" in err
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    code, _, err = cli(capsys, "match", "--checkpoint", tmp_path / "filt", "--image", not_image, "--text", "x")
    assert code == 2 and "notes.png" in err
    cli(capsys, "convert", path, "--from", "official", "--tokenizer", tok_dir, "--out", tmp_path / "pre", *HEADS)
    positions = load_model_dir(tmp_path / "pre", BlipPretrain).config.text.max_position_embeddings
    for flags, named in [(["--num-beams", "0"], "num_beams must be >= 1"),
                         (["--batch-size", "0"], "--batch-size must be >= 1"),
                         (["--max-new-tokens", str(positions)], f"exceed the captioner's {positions} text positions"),
                         (["--device", "nonsense"], "not a torch device")]:
        code, out, err = cli(capsys, "caption", "--checkpoint", tmp_path / "pre", images[0], *flags)
        assert (code, out) == (2, "") and named in err and "Traceback" not in err, (flags, err)
    if not torch.cuda.is_available():
        code, _, err = cli(capsys, "match", "--checkpoint", tmp_path / "pre", "--image", images[0], "--text", "x",
                           "--device", "cuda")
        assert code == 2 and "0 CUDA device(s)" in err
    code, _, err = cli(capsys, "caption", "--checkpoint", tmp_path / "pre", images[0], "--max-new-tokens", "999")
    longest = int(re.search(r"use max_new_tokens <= (\d+)", err).group(1))  # positions - the prompt's tokens
    assert 0 < longest < positions
    code, out, err = cli(capsys, "caption", "--checkpoint", tmp_path / "pre", images[0], "--decoding", "greedy",
                         "--max-new-tokens", str(longest), "--min-new-tokens", str(longest))
    assert code == 0, err  # the longest that fits decodes to the last position
    code, _, err = cli(capsys, "export", tmp_path / "pre", "--to", "hf", "--out", tmp_path / "y")
    assert code == 2 and "--part" in err
    code, _, err = cli(capsys, "export", tmp_path / "pre", "--to", "hf", "--part", "filter", "--out", tmp_path / "y")
    assert code == 0, err
    assert (tmp_path / "y" / "model.safetensors").is_file()


def test_a_bare_bert_vocab_gets_dec_and_enc_appended(tmp_path):
    from components.model_io import load_any_tokenizer, special_ids

    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\nred\ncircle\n")
    tok = load_any_tokenizer(tmp_path)
    assert tok.encode("A Red circle").ids == [2, 5, 6, 7, 3]  # lower-cased, [CLS] ... [SEP]
    assert special_ids(tok, tmp_path) == {"pad_token_id": 0, "cls_token_id": 2, "sep_token_id": 3,
                                          "bos_token_id": 8, "enc_token_id": 9}
