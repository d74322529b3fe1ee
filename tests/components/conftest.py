"""Fixtures shared by the component tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from components import hardware


@pytest.fixture
def cpu_bf16_units(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[bool, bool], None]]:
    """A setter for what torch's CPU probes answer, `set(avx512_bf16, amx)`, with the once-per-setting
    warning memory of `hardware.warn_emulated_bf16` cleared before and after."""
    hardware.warn_emulated_bf16.cache_clear()

    def set_units(avx512_bf16: bool, amx: bool) -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)

    yield set_units
    hardware.warn_emulated_bf16.cache_clear()
