"""What manifest.json records about the machine: CPU, its bf16/AMX/AVX-512 flags, threads, the bf16
switch and the dtype each stage computes in."""

import pytest
import torch

from saefeatures.study.config import RunConfig
from saefeatures.study.machine import WATCHED_FLAGS, cpu_name_and_flags, machine_info, stage_dtypes

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile amx_bf16 amx_int8
processor\t: 1
model name\t: should not be read
flags\t\t: fpu
"""


def test_cpu_name_and_flags_from_cpuinfo(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    assert cpu_name_and_flags(path) == ("Intel(R) Xeon(R) Platinum 8488C",
                                        ["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"])
    name, flags = cpu_name_and_flags(tmp_path / "absent")
    assert isinstance(name, str) and flags == []


@pytest.mark.dtype  # unset, the switch leaves bf16_is_fast to the hardware
def test_machine_info_keys_types_and_the_switch(bf16_env):
    bf16_env("1")
    info = machine_info("cpu", {"activations": "bfloat16"})
    assert set(info) == {"cpu", "cpu_flags", "torch_cpu_capability", "cpu_count", "torch_threads", "device",
                         "cuda_device", "bf16_switch", "bf16_is_fast", "dtypes", "torch_interop_threads",
                         "bf16_hardware"}
    hardware = {"cpu_avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
                "cpu_amx_tile": torch.cpu._is_amx_tile_supported()}
    assert info["bf16_hardware"] == hardware  # what the CPU has, whatever the switch forces
    assert info["torch_interop_threads"] == torch.get_num_interop_threads()
    assert isinstance(info["cpu"], str) and info["cpu"]
    assert set(info["cpu_flags"]) <= set(WATCHED_FLAGS)
    assert info["torch_threads"] == torch.get_num_threads() and isinstance(info["cpu_count"], int)
    assert info["device"] == "cpu" and info["cuda_device"] is None
    assert info["bf16_switch"] == "1" and info["bf16_is_fast"] is True
    assert info["dtypes"] == {"activations": "bfloat16"}
    bf16_env("0")
    assert machine_info()["bf16_switch"] == "0" and machine_info()["bf16_is_fast"] is False
    bf16_env(None)
    assert machine_info()["bf16_switch"] is None


@pytest.mark.parametrize("switch, auto", [("1", "bfloat16"), ("0", "float32")])
def test_stage_dtypes_follow_the_switch(model, bf16_env, switch, auto):
    bf16_env(switch)
    cfg = RunConfig()
    cfg.activations.dtype = "auto"
    assert stage_dtypes(cfg, model) == {"model": "float32", "activations": auto, "scoring": auto,
                                        "sae": "float32"}
    cfg.sae.source = "train"
    assert stage_dtypes(cfg, model)["sae_training_lm"] == ("bfloat16 autocast" if switch == "1" else "float32")
