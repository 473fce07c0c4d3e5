"""One mixed-precision policy for every forward pass alignkit runs.

`--mixed_precision bf16|fp16` means: the weights, the optimizer state, the log-probs and every loss
stay float32 ("master weights"); only the forward passes run under `torch.autocast` in the low
precision, so the matmuls (and the LM head's logits) are bf16/fp16. Every trainer, generation and
scoring pass enters the same context, `autocast(precision, device)`, so one process and many behave
alike (accelerate's own autocast wraps `model.forward` only, which the loss helpers bypass when they
call the trunk and the head separately).

fp16 needs a loss scaler (its exponent range underflows small gradients); accelerate applies one on
CUDA. CPU autocast has no fp16 scaler support worth having, so fp16 is refused there.
"""

from __future__ import annotations

import contextlib
import logging
from functools import lru_cache

import torch

logger = logging.getLogger(__name__)

MIXED_PRECISIONS = ("no", "bf16", "fp16", "auto")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX-BF16); elsewhere bf16 is emulated (slower)."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = set(handle.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def _device_has_bf16(device: torch.device) -> tuple[bool, str]:
    if device.type == "cuda":
        # native only (compute capability 8+, or ROCm): torch's default also counts pre-Ampere GPUs, which can
        # make bf16 tensors but emulate its arithmetic, slower than fp32, the case `auto` exists to avoid
        ok = torch.cuda.is_bf16_supported(including_emulation=False)
        return ok, f"{torch.cuda.get_device_name(device)} {'computes' if ok else 'does not compute'} bf16 natively"
    if device.type == "cpu":
        ok = cpu_has_bf16()
        return ok, "this CPU has " + ("AVX512-BF16/AMX" if ok else "no AVX512-BF16/AMX (bf16 would be emulated, slower than fp32)")
    return False, f"bf16 support on {device.type} is not probed"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_mixed_precision(value: str, device: torch.device | str | None = None) -> str:
    """--mixed_precision as given -> what runs: "no", "bf16" or "fp16".

    `auto` picks bf16 where the device computes it natively and fp32 ("no") elsewhere, and logs which
    and why. fp16 is refused on CPU (ValueError naming the flag and what is allowed)."""
    device = torch.device(device) if device is not None else default_device()
    if value not in MIXED_PRECISIONS:
        raise ValueError(f"--mixed_precision must be one of {' | '.join(MIXED_PRECISIONS)}, got {value!r}")
    if value == "auto":
        ok, why = _device_has_bf16(device)
        resolved = "bf16" if ok else "no"
        logger.info("--mixed_precision auto -> %s: %s", "bf16" if ok else "no (fp32)", why)
        return resolved
    if value == "fp16" and device.type != "cuda":
        raise ValueError(f"--mixed_precision fp16 needs a CUDA GPU (it trains with a loss scaler there); on {device.type} use bf16 or no")
    return value


def autocast(precision: str, device: torch.device | str):
    """The forward context of `precision` ("no" | "bf16" | "fp16") on `device`: torch.autocast, or nothing."""
    device = torch.device(device)
    if precision not in DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])
