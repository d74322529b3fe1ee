import logging

import pytest
import torch

from components import hardware


@pytest.mark.parametrize(("avx512_bf16", "amx", "native"), [(False, False, False), (True, False, True),
                                                           (False, True, True)])
def test_native_bf16_is_either_instruction_set(cpu_bf16_units, avx512_bf16, amx, native):
    cpu_bf16_units(avx512_bf16, amx)
    assert hardware.cpu_native_bf16() is native


def test_a_torch_without_the_probes_counts_as_no_native_bf16(monkeypatch):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    assert hardware.cpu_native_bf16() is False


def test_emulated_bf16_is_named_once_per_setting(cpu_bf16_units, caplog):
    cpu_bf16_units(False, False)
    with caplog.at_level(logging.WARNING, logger="components.hardware"):
        assert hardware.warn_emulated_bf16("train.precision") is True
        hardware.warn_emulated_bf16("train.precision")
        hardware.warn_emulated_bf16("precision bf16")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and messages[0].startswith("train.precision: bf16")
    assert "emulated" in messages[0] and "AVX512-BF16 or AMX" in messages[0]


def test_native_bf16_is_not_warned_about(cpu_bf16_units, caplog):
    cpu_bf16_units(True, False)
    with caplog.at_level(logging.WARNING, logger="components.hardware"):
        assert hardware.warn_emulated_bf16("train.precision") is False
    assert not caplog.records
