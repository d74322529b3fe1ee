"""What the CPU does natively, for the `precision` settings.

bf16 pays on a CPU only with native bf16 matrix instructions (AVX512-BF16 or AMX tiles); on other
CPUs PyTorch emulates it and it runs slower than fp32 (README, "Bootstrap (CapFilt)").
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)

_BF16_PROBES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch's own CPU probes


def cpu_native_bf16() -> bool:
    """True when the CPU has AVX512-BF16 or AMX tiles; False where this torch has no such probe."""
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in _BF16_PROBES)


@functools.cache
def warn_emulated_bf16(setting: str) -> bool:
    """Warn (once per setting and process) that bf16 asked for on this CPU is emulated; True if so."""
    if cpu_native_bf16():
        return False
    log.warning("%s: bf16 on a CPU without AVX512-BF16 or AMX is emulated by PyTorch and runs slower "
                "than fp32 on this machine; `auto` (fp32 on a CPU) is the faster choice here", setting)
    return True
