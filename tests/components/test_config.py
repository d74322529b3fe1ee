"""Contract tests for the params loader: unknown keys and wrong types are named errors."""

from pathlib import Path

import pytest

from components.config import Params, load_params, parse_params
from components.errors import CapfiltError

ROOT = Path(__file__).resolve().parents[2]


def test_repository_params_validate():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.synth.image_size > 0


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("synth:\n  seed: 0\n  n_webb: 10\n")
    with pytest.raises(CapfiltError) as e:
        load_params(p)
    assert "synth.n_webb: unknown key" in str(e.value)
    assert str(p) in str(e.value)


def test_unknown_section_is_named(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("synthh:\n  seed: 0\n")
    with pytest.raises(CapfiltError, match="synthh: unknown key"):
        load_params(p)


def test_wrong_type_is_named():
    with pytest.raises(CapfiltError) as e:
        parse_params({"synth": {"image_size": "big"}})
    assert "synth.image_size" in str(e.value)
    assert "'big'" in str(e.value)


def test_strict_types_do_not_coerce_strings():
    with pytest.raises(CapfiltError, match="synth.seed"):
        parse_params({"synth": {"seed": "3"}})


def test_params_are_frozen():
    params = parse_params({})
    with pytest.raises(Exception):
        params.synth.seed = 5  # type: ignore[misc]


def test_overrides_apply_and_validate(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("synth:\n  seed: 0\n")
    assert load_params(p, ["synth.seed=7"]).synth.seed == 7
    with pytest.raises(CapfiltError, match="synth.seed"):
        load_params(p, ["synth.seed=abc"])
    with pytest.raises(CapfiltError, match="KEY=VALUE"):
        load_params(p, ["synth.seed"])


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(CapfiltError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("synth: [unclosed\n")
    with pytest.raises(CapfiltError, match="not valid YAML"):
        load_params(bad)


def test_a_key_given_twice_is_named(tmp_path):
    # PyYAML keeps the last of two equal keys; an edit that duplicates a line must not pass quietly
    p = tmp_path / "params.yaml"
    p.write_text("synth:\n  seed: 0\n  n_test: 300\n  n_test: 1000\n")
    with pytest.raises(CapfiltError, match=r"'n_test' is given twice \(lines 3 and 4\)"):
        load_params(p)
    p.write_text("model:\n  overrides: {itm_negative_hardness: 0.0, itm_negative_hardness: 1.0}\n")
    with pytest.raises(CapfiltError, match=r"'itm_negative_hardness' is given twice \(line 2\)"):
        load_params(p)
    p.write_text("synth:\n  seed: 0\ntrain:\n  seed: 0\n")  # the same key in two sections is fine
    assert load_params(p).train.seed == 0


@pytest.mark.parametrize("key", ["synth.seed", "train.seed", "bootstrap.seed", "evaluate.resample_seed"])
def test_negative_seeds_are_named(key):
    # numpy's and torch's generators refuse them deep inside a stage; the loader names the key
    section, name = key.split(".")
    with pytest.raises(CapfiltError, match=key.replace(".", r"\.")):
        parse_params({section: {name: -1}})


def test_synth_seed_flag_is_validated_like_the_file(tmp_path, capsys):
    from components import cli

    assert cli.main(["synth", "--out", str(tmp_path / "data"), "--seed", "-1"]) == 2
    assert "synth.seed" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
