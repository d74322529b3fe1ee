"""Resume checkpoints are published atomically; exported model directories round-trip strictly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from components import checkpoints as ckpt
from components.errors import CapfiltError


def _fake_save(resume_dir, step):
    tmp = resume_dir / ckpt.temp_tag(step)
    tmp.mkdir(parents=True)
    (tmp / "mp_rank_00_model_states.pt").write_bytes(b"x")


def test_a_half_written_checkpoint_is_never_picked_up(tmp_path):
    assert ckpt.prepare_resume_dir(tmp_path, "run-a", resume=True) is None
    _fake_save(tmp_path, 5)
    ckpt.publish(tmp_path, 5, keep=2)
    _fake_save(tmp_path, 10)  # killed before publish: no rename, no pointer update
    assert ckpt.latest_tag(tmp_path) == "step00000005"
    assert ckpt.prepare_resume_dir(tmp_path, "run-a", resume=True) == "step00000005"
    assert not list(tmp_path.glob(".tmp-*"))  # the leftover is cleaned on start


def test_publish_keeps_the_newest_and_a_dangling_pointer_is_ignored(tmp_path):
    ckpt.prepare_resume_dir(tmp_path, "run-a", resume=True)
    for step in (1, 2, 3):
        _fake_save(tmp_path, step)
        ckpt.publish(tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step*")) == ["step00000002", "step00000003"]
    (tmp_path / "latest").write_text("step00000099")
    assert ckpt.latest_tag(tmp_path) is None


def test_another_run_or_resume_off_starts_afresh(tmp_path):
    ckpt.prepare_resume_dir(tmp_path, "run-a", resume=True)
    _fake_save(tmp_path, 1)
    ckpt.publish(tmp_path, 1, keep=1)
    assert ckpt.prepare_resume_dir(tmp_path, "run-a", resume=False) is None
    assert not list(tmp_path.glob("step*"))
    _fake_save(tmp_path, 1)
    ckpt.publish(tmp_path, 1, keep=1)
    assert ckpt.prepare_resume_dir(tmp_path, "run-b", resume=True) is None
    assert json.loads((tmp_path / "run.json").read_text()) == {"fingerprint": "run-b"}


class Tied(nn.Module):
    """An embedding tied to an output layer, a buffer and a 0-dim parameter."""

    def __init__(self, vocab: int = 7, width: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)
        self.head.weight = self.embed.weight
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.register_buffer("queue", torch.randn(width, 3))

    @classmethod
    def from_config_dict(cls, config: dict) -> Tied:
        return cls(**config)


def test_model_dir_round_trips_tied_weights_without_pickle(tmp_path):
    model = Tied()
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    out = ckpt.save_model_dir(tmp_path / "model", model, {"vocab": 7, "width": 4}, tok)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    with safe_open(out / "model.safetensors", framework="pt") as f:
        stored = set(f.keys())
    assert stored == {"embed.weight", "head.bias", "temp", "queue"}  # the tied head stored once
    loaded = ckpt.load_model_dir(out, Tied)
    assert loaded.head.weight is loaded.embed.weight  # still tied after loading
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    assert json.loads((out / "config.json").read_text())["class"] == "Tied"


def test_loading_names_missing_unexpected_and_misshaped_keys(tmp_path):
    out = ckpt.save_model_dir(tmp_path / "m", Tied(), {"vocab": 7, "width": 4})

    class Other(Tied):
        def __init__(self, vocab: int = 7, width: int = 4) -> None:
            super().__init__(vocab, width)
            self.extra = nn.Linear(2, 2)
            del self.queue
            self.register_buffer("queue", torch.randn(width, 5))

    with pytest.raises(CapfiltError, match=r"missing keys: extra.bias, extra.weight; "
                                           r"wrong shape keys: queue"):
        ckpt.load_model_dir(out, Other)
    with pytest.raises(CapfiltError, match="config.json: not found"):
        ckpt.load_model_dir(tmp_path / "nowhere", Tied)


def test_optional_keys_an_older_checkpoint_lacks_keep_their_initial_values(tmp_path):
    out = ckpt.save_model_dir(tmp_path / "m", Tied(), {"vocab": 7, "width": 4})

    class Newer(Tied):
        optional_state_keys = frozenset({"ids"})

        def __init__(self, vocab: int = 7, width: int = 4) -> None:
            super().__init__(vocab, width)
            self.register_buffer("ids", torch.full((1, 3), -100))

    loaded = ckpt.load_model_dir(out, Newer)
    assert loaded.ids.eq(-100).all() and loaded.head.weight is loaded.embed.weight
    stripped = {k: v for k, v in Tied().state_dict().items() if k != "temp"}
    with pytest.raises(CapfiltError, match="missing keys: temp$"):  # only the listed keys may be absent
        ckpt.load_state_strict(Newer(), stripped, "old")


def test_export_replaces_an_old_directory_atomically(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    ckpt.save_model_dir(target, Tied(), {"vocab": 7, "width": 4})
    assert not (target / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary left behind
