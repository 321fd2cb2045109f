"""configs/accelerate: every file parses with accelerate's own loader and says what its name says."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT

CONFIGS = ROOT / "configs" / "accelerate"
YAMLS = sorted(CONFIGS.glob("*.yaml"))


def cluster(path: Path):
    from accelerate.commands.config.config_args import ClusterConfig

    return ClusterConfig.from_yaml_file(str(path))


def test_every_advertised_config_exists():
    names = {p.name for p in YAMLS}
    assert {"cpu-2proc.yaml", "ddp-1gpu.yaml", "ddp-8gpu-bf16.yaml", "ddp-8gpu-fp16.yaml", "ddp-multinode.yaml",
            "fsdp-8gpu-bf16.yaml", "deepspeed-zero2-8gpu.yaml", "deepspeed-zero3-8gpu.yaml"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_config_loads_with_accelerate(path):
    c = cluster(path)
    assert c.num_processes >= 1 and c.num_machines >= 1
    assert c.num_processes % c.num_machines == 0, "num_processes counts all machines' processes"


@pytest.mark.parametrize("name, kind, procs, precision", [
    ("cpu-2proc.yaml", "MULTI_GPU", 2, "no"),  # torchrun launcher; gloo on CPU (see the file's comment)
    ("ddp-1gpu.yaml", "NO", 1, "bf16"),
    ("ddp-8gpu-bf16.yaml", "MULTI_GPU", 8, "bf16"),
    ("ddp-8gpu-fp16.yaml", "MULTI_GPU", 8, "fp16"),
    ("ddp-multinode.yaml", "MULTI_GPU", 16, "bf16"),
    ("fsdp-8gpu-bf16.yaml", "FSDP", 8, "bf16"),
])
def test_config_says_what_its_name_says(name, kind, procs, precision):
    c = cluster(CONFIGS / name)
    assert c.distributed_type.value == kind
    assert c.num_processes == procs
    assert str(c.mixed_precision) == precision
    assert c.use_cpu is False  # accelerate's --cpu would start ONE process without mpirun


def test_fsdp_config_shards_transformer_blocks_and_saves_a_full_state_dict():
    c = cluster(CONFIGS / "fsdp-8gpu-bf16.yaml")
    f = c.fsdp_config
    assert f["fsdp_version"] == 2 and f["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert f["fsdp_state_dict_type"] == "FULL_STATE_DICT" and f["fsdp_reshard_after_forward"] is True


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_leave_batch_and_precision_to_the_trainer(stage):
    c = cluster(CONFIGS / f"deepspeed-zero{stage}-8gpu.yaml")
    assert c.distributed_type.value == "DEEPSPEED"
    ds_file = ROOT / c.deepspeed_config["deepspeed_config_file"]  # relative to the repository root
    assert ds_file.is_file()
    ds = json.loads(ds_file.read_text())
    assert ds["zero_optimization"]["stage"] == stage
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert ds[key] == "auto", key  # filled from CrowConfig/SFTConfig by the Trainer: one source of truth
    assert ds["bf16"]["enabled"] == "auto" and ds["fp16"]["enabled"] == "auto"
    assert c.deepspeed_config["zero3_init_flag"] is (stage == 3)
    if stage == 3:
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_multinode_config_names_the_main_machine():
    raw = yaml.safe_load((CONFIGS / "ddp-multinode.yaml").read_text())
    assert raw["num_machines"] == 2 and raw["main_process_ip"] and raw["main_process_port"]
