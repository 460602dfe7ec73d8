"""The machine a run computes on, as manifest.json records it: CPU model and its vector/bf16 units
(or the GPU), torch threads, the bf16 switch, and the dtype each stage resolves to.

Results depend on it (``dtype: auto`` is bfloat16 only where `models.bf16_is_fast`), so two runs
on two machines must be told apart after the fact.

Example:
    >>> info = machine_info("cpu", {"activations": "float32"})
    >>> info["cpu"], info["cpu_flags"], info["torch_threads"]
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from ..models import BF16_ENV, bf16_is_fast, resolve_dtype
from ..sae.train import llm_autocast
from .config import RunConfig

WATCHED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
"""CPU flags (as /proc/cpuinfo names them) that decide float32 and bfloat16 matmul speed."""


def cpu_name_and_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, list[str]]:
    """The CPU's model name and which of `WATCHED_FLAGS` it has (Linux; elsewhere the platform's
    processor name and no flags)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        text = cpuinfo.read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            name = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break  # the first processor's entry is enough
    return name, [f for f in WATCHED_FLAGS if f in flags]


def dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def stage_dtypes(cfg: RunConfig, model: Any) -> dict[str, str]:
    """The dtype each stage of `saefeatures run` computes in on this machine: the model's weights
    (generation, steering, probes, monitor), the activation and scoring forward passes, the SAE,
    and the language model while an SAE is trained (when the config trains one)."""
    device = model.cfg.device
    model_dtype = next(model.parameters()).dtype
    out = {"model": dtype_name(model_dtype),
           "activations": dtype_name(resolve_dtype(cfg.activations.dtype, device)),
           "scoring": dtype_name(resolve_dtype(cfg.activations.dtype, device)),  # it pools as activations
           "sae": cfg.sae.dtype}
    if cfg.sae.source == "train":
        out["sae_training_lm"] = "bfloat16 autocast" if llm_autocast(cfg.sae.train, str(device)) \
            else dtype_name(model_dtype)
    return out


def bf16_hardware(device: torch.device) -> dict[str, bool]:
    """The bf16 units torch finds, whatever ``$SAEFEATURES_BF16`` says (the switch can force the
    bf16 path where they are missing: then ``bf16_is_fast`` and these disagree)."""
    out = {"cpu_avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
           "cpu_amx_tile": bool(torch.cpu._is_amx_tile_supported())}
    if device.type == "cuda":
        out["cuda_bf16"] = bool(torch.cuda.is_bf16_supported())
    return out


def machine_info(device: str | torch.device = "cpu", dtypes: dict[str, str] | None = None) -> dict[str, Any]:
    """CPU model and flags, torch's CPU capability and threads, the GPU (when ``device`` is one), the
    bf16 units torch finds, the bf16 switch (``$SAEFEATURES_BF16`` as set, None if unset) and what
    `bf16_is_fast` made of it, and ``dtypes`` (see `stage_dtypes`)."""
    device = torch.device(device)
    cpu, flags = cpu_name_and_flags()
    return {
        "cpu": cpu,
        "cpu_flags": flags,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "bf16_hardware": bf16_hardware(device),
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "bf16_switch": os.environ.get(BF16_ENV),
        "bf16_is_fast": bf16_is_fast(device),
        "dtypes": dict(dtypes or {}),
    }
