"""Every shipped preset loads into its options class, and the distributed configs are valid files."""

import json
from pathlib import Path

import pytest
import yaml

from longlora.config import TrainConfig, load_config
from longlora.sft import SFTConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["tiny", "llama2-7b-8k", "llama2-7b-32k", "mistral-7b-32k"])
def test_train_presets_load(name):
    config = load_config(TrainConfig, [str(CONFIGS / f"{name}.yaml"), "--model", "m", "--data", "d"])
    assert config.attention == "s2" and config.finetune == "lora_plus"
    assert config.group_size() == config.context_length // 4
    if "deepspeed" in config.training_args:
        assert (CONFIGS.parent / config.training_args["deepspeed"]).is_file()


def test_sft_preset_loads():
    config = load_config(SFTConfig, [str(CONFIGS / "longalpaca-sft.yaml"), "--model", "m", "--data", "d"])
    assert config.prompt_template == "llama2" and config.packing == "documents"


def test_distributed_configs_parse():
    for stage in (2, 3):
        ds = json.loads((CONFIGS / "deepspeed" / f"zero{stage}.json").read_text())
        assert ds["zero_optimization"]["stage"] == stage
    fsdp = yaml.safe_load((CONFIGS / "fsdp" / "full_shard.yaml").read_text())
    config = load_config(TrainConfig, [], model="m", data="d", **fsdp)
    assert config.training_args["fsdp"] == "full_shard auto_wrap"


def test_a_yaml_syntax_error_names_the_place(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("context_length: [1024, 2048\nmodel: m\n")
    with pytest.raises(ValueError, match=r"bad\.yaml is not valid YAML at line 2, column 6: expected ',' or ']'"):
        load_config(TrainConfig, [str(bad)])
    bad.write_bytes(b"model: \xff\xfe\n")
    with pytest.raises(ValueError, match="not a text"):
        load_config(TrainConfig, [str(bad)])
