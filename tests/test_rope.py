"""Position interpolation: the config written, the rotary embeddings a model builds from it, and the errors."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from longlora.rope import apply_position_interpolation, original_context_length, rope_factor_for
from tiny_models import POSITIONS, tiny_config


def rotary(config) -> torch.nn.Module:
    """The rotary-embedding module of a tiny model built from `config`."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    (module,) = [m for name, m in model.named_modules() if name.endswith("rotary_emb")]
    return module


def cos_sin(module, positions: torch.Tensor, layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(1, dtype=torch.float32)
    kwargs = {"layer_type": layer_type} if layer_type else {}
    return module(x, positions[None], **kwargs)  # each (1, T, rotary_dim)


# ---------------------------------------------------------------- factors and original context


def test_factor_is_ceil_of_target_over_original():
    llama2 = LlamaConfig(max_position_embeddings=4096)
    assert original_context_length(llama2) == 4096
    assert rope_factor_for(llama2, 32768) == 8  # the paper's 4k -> 32k
    assert rope_factor_for(llama2, 10000) == 3  # never a fraction
    assert rope_factor_for(llama2, 4096) == 1
    tiny = tiny_config("llama")
    assert rope_factor_for(tiny, 256) == 4
    assert rope_factor_for(tiny, POSITIONS + 1) == 2


def test_original_context_is_the_recorded_one_for_yarn():
    config = tiny_config(
        "qwen2", rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    )
    assert original_context_length(config) == 32
    assert original_context_length(tiny_config("llama")) == POSITIONS


# ---------------------------------------------------------------- linear PI (the paper)


def test_linear_writes_rope_parameters_and_keeps_theta():
    config = tiny_config("llama", rope_theta=500_000.0)
    extended = apply_position_interpolation(config, 256)
    assert extended.rope_parameters == {"rope_type": "linear", "factor": 4, "rope_theta": 500_000.0}
    assert extended.max_position_embeddings == 256
    # the input config is left as it was
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 500_000.0}
    assert config.max_position_embeddings == POSITIONS


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt_neox", "phi3"])
def test_linear_pi_position_4p_rotates_like_original_p(arch):
    config = tiny_config(arch)
    original, extended = rotary(config), rotary(apply_position_interpolation(config, 4 * POSITIONS))
    p = torch.arange(POSITIONS)
    cos0, sin0 = cos_sin(original, p)
    cos4, sin4 = cos_sin(extended, 4 * p)
    torch.testing.assert_close(cos4, cos0, atol=1e-4, rtol=0)
    torch.testing.assert_close(sin4, sin0, atol=1e-4, rtol=0)
    torch.testing.assert_close(extended.inv_freq, original.inv_freq / 4)
    assert extended.attention_scaling == 1.0


def test_phi3_linear_is_written_as_uniform_longrope():
    # transformers' Phi3Config accepts only default / longrope RoPE
    extended = apply_position_interpolation(tiny_config("phi3"), 256)
    params = extended.rope_parameters
    head_dim = extended.hidden_size // extended.num_attention_heads
    assert params["rope_type"] == "longrope"
    assert params["short_factor"] == params["long_factor"] == [4.0] * (head_dim // 2)
    assert params["attention_factor"] == 1.0
    assert params["original_max_position_embeddings"] == extended.original_max_position_embeddings == POSITIONS
    # beyond the original context LongRoPE switches to long_factor: still linear x4
    module = rotary(extended)
    cos, _ = cos_sin(module, torch.arange(4 * POSITIONS))
    torch.testing.assert_close(module.inv_freq, module.original_inv_freq)
    ref_cos, _ = cos_sin(rotary(tiny_config("phi3")), torch.arange(4 * POSITIONS) / 4)
    torch.testing.assert_close(cos, ref_cos, atol=1e-4, rtol=0)


def test_gemma3_scales_only_the_global_layers():
    config = tiny_config("gemma3_text")
    extended = apply_position_interpolation(config, 256)
    assert extended.rope_parameters["full_attention"] == {"rope_type": "linear", "factor": 4, "rope_theta": 1e6}
    assert extended.rope_parameters["sliding_attention"] == config.rope_parameters["sliding_attention"]
    original, scaled = rotary(config), rotary(extended)
    p = torch.arange(POSITIONS)
    torch.testing.assert_close(
        cos_sin(scaled, 4 * p, "full_attention")[0], cos_sin(original, p, "full_attention")[0], atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        cos_sin(scaled, p, "sliding_attention")[0], cos_sin(original, p, "sliding_attention")[0]
    )


# ---------------------------------------------------------------- other scalings


def test_yarn_keys_and_attention_scaling():
    config = tiny_config("llama")
    extended = apply_position_interpolation(config, 256, scaling="yarn")
    assert extended.rope_parameters == {
        "rope_type": "yarn", "factor": 4, "original_max_position_embeddings": POSITIONS, "rope_theta": 10000.0,
    }
    assert extended.max_position_embeddings == 256
    original, module = rotary(config), rotary(extended)
    assert module.attention_scaling == pytest.approx(0.1 * math.log(4) + 1)  # YaRN's mscale
    # highest frequency extrapolated (kept), lowest interpolated (divided by the factor)
    assert module.inv_freq[0] == pytest.approx(original.inv_freq[0].item())
    assert module.inv_freq[-1] == pytest.approx(original.inv_freq[-1].item() / 4)


def test_llama3_keys_and_frequencies():
    config = tiny_config("llama")
    extended = apply_position_interpolation(config, 256, scaling="llama3")
    assert extended.rope_parameters == {
        "rope_type": "llama3", "factor": 4, "original_max_position_embeddings": POSITIONS,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "rope_theta": 10000.0,
    }
    original, module = rotary(config), rotary(extended)
    assert module.inv_freq[0] == pytest.approx(original.inv_freq[0].item())
    assert module.inv_freq[-1] == pytest.approx(original.inv_freq[-1].item() / 4)


def test_dynamic_keeps_the_reference_length_and_only_stretches_beyond_it():
    config = tiny_config("llama")
    extended = apply_position_interpolation(config, 256, scaling="dynamic")
    assert extended.rope_parameters == {"rope_type": "dynamic", "factor": 4, "rope_theta": 10000.0}
    assert extended.max_position_embeddings == POSITIONS  # dynamic NTK stretches from here
    original, module = rotary(config), rotary(extended)
    short = torch.arange(POSITIONS)
    torch.testing.assert_close(cos_sin(module, short)[0], cos_sin(original, short)[0])
    cos_sin(module, torch.arange(256))
    assert module.inv_freq[-1] < original.inv_freq[-1]  # larger base for the long input


def test_none_leaves_rope_alone():
    config = tiny_config("llama")
    longer = apply_position_interpolation(config, 256, scaling="none")
    assert longer.rope_parameters == config.rope_parameters
    assert longer.max_position_embeddings == 256
    shorter = apply_position_interpolation(config, 32, scaling="none")  # allowed: no interpolation asked
    assert shorter.max_position_embeddings == POSITIONS


def test_same_length_is_a_no_op():
    config = tiny_config("llama")
    same = apply_position_interpolation(config, POSITIONS, scaling="llama3")
    assert same.rope_parameters == config.rope_parameters
    assert same.max_position_embeddings == POSITIONS


# ---------------------------------------------------------------- persistence


@pytest.mark.parametrize(
    "arch,scaling", [("llama", "linear"), ("llama", "yarn"), ("llama", "llama3"), ("phi3", "linear"),
                     ("gemma3_text", "linear")]
)
def test_save_and_load_keep_the_scaling(tmp_path, arch, scaling):
    extended = apply_position_interpolation(tiny_config(arch), 256, scaling=scaling)
    model = AutoModelForCausalLM.from_config(extended)
    model.save_pretrained(tmp_path)
    rope_logger = logging.get_logger("transformers.modeling_rope_utils")
    with CaptureLogger(rope_logger) as captured:
        loaded_config = AutoConfig.from_pretrained(tmp_path)
    assert captured.out == ""  # no "Unrecognized keys" / factor-mismatch warnings
    assert loaded_config.rope_parameters == extended.rope_parameters
    assert loaded_config.max_position_embeddings == 256
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    before = dict(rotary(extended).named_buffers())
    after = {n: b for n, b in loaded.named_buffers() if "rotary_emb" in n}
    assert after and all(torch.equal(b, before[n.split("rotary_emb.")[1]]) for n, b in after.items())


# ---------------------------------------------------------------- composition


def test_linear_on_linear_multiplies_like_one_step():
    config = tiny_config("llama")
    twice = apply_position_interpolation(apply_position_interpolation(config, 2 * POSITIONS), 8 * POSITIONS)
    once = apply_position_interpolation(config, 8 * POSITIONS)
    assert twice.rope_parameters == once.rope_parameters == {"rope_type": "linear", "factor": 8, "rope_theta": 1e4}
    assert twice.max_position_embeddings == once.max_position_embeddings == 8 * POSITIONS
    assert rope_factor_for(apply_position_interpolation(config, 2 * POSITIONS), 8 * POSITIONS) == 8


def test_phi3_linear_composes_too():
    config = apply_position_interpolation(apply_position_interpolation(tiny_config("phi3"), 128), 512)
    assert config.rope_parameters["factor"] == 8
    assert set(config.rope_parameters["short_factor"]) == {8.0}
    assert config.rope_parameters["original_max_position_embeddings"] == POSITIONS


def test_yarn_counts_what_its_factor_already_covers():
    # Qwen-style: YaRN x4 over 32 positions added without raising max_position_embeddings
    config = tiny_config(
        "qwen2", max_position_embeddings=32,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    )
    covered = apply_position_interpolation(config, 128, scaling="yarn")
    assert covered.rope_parameters["factor"] == 4 and covered.max_position_embeddings == 128
    further = apply_position_interpolation(config, 256, scaling="yarn")
    assert further.rope_parameters["factor"] == 8
    assert further.rope_parameters["original_max_position_embeddings"] == 32


def test_llama31_style_declared_context_wins():
    # Llama-3.1: llama3 x8 over 8k, declared 128k (16x): extending 2x further doubles the factor
    config = tiny_config(
        "llama", max_position_embeddings=16 * 16,
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0, "rope_theta": 5e5},
    )
    assert rope_factor_for(config, 16 * 16) == 8
    extended = apply_position_interpolation(config, 2 * 16 * 16, scaling="llama3")
    assert extended.rope_parameters["factor"] == 16
    assert extended.rope_parameters["rope_theta"] == 5e5


def test_explicit_factor_multiplies_an_existing_scaling():
    config = tiny_config("llama", rope_parameters={"rope_type": "linear", "factor": 8.0}, max_position_embeddings=512)
    extended = apply_position_interpolation(config, 768, factor=1.5)  # the paper's 32k model stretched to 48k
    assert extended.rope_parameters["factor"] == 12
    assert apply_position_interpolation(tiny_config("llama"), 512, scaling="llama3", factor=8).rope_parameters[
        "factor"] == 8


def test_dynamic_on_dynamic():
    config = apply_position_interpolation(tiny_config("llama"), 256, scaling="dynamic")
    assert apply_position_interpolation(config, 512, scaling="dynamic").rope_parameters["factor"] == 8


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("config", [GPT2Config(), OPTConfig()], ids=["gpt2", "opt"])
def test_model_without_rope_is_refused(config):
    with pytest.raises(ValueError, match="no rotary position embedding"):
        apply_position_interpolation(config, 4096)
    with pytest.raises(ValueError, match="no rotary position embedding"):
        original_context_length(config)


def test_context_below_original_says_what_to_do():
    with pytest.raises(ValueError, match=r"below the 64 positions.*scaling='none'"):
        apply_position_interpolation(tiny_config("llama"), 32)
    extended = apply_position_interpolation(tiny_config("llama"), 256)
    with pytest.raises(ValueError, match=r"below the 256 positions this model already handles with its linear x4"):
        apply_position_interpolation(extended, 128)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"scaling": "ntk"}, "unknown RoPE scaling 'ntk'"),
        ({"factor": 0.5}, "factor must be a number >= 1"),
        ({"scaling": "none", "factor": 2}, "a factor has no meaning"),
        ({"context_length": 100.0}, "positive integer"),
        ({"context_length": 0}, "positive integer"),
    ],
)
def test_bad_arguments(kwargs, message):
    kwargs = {"context_length": 256, **kwargs}
    with pytest.raises(ValueError, match=message):
        apply_position_interpolation(tiny_config("llama"), **kwargs)


def test_scaling_type_is_not_switched():
    extended = apply_position_interpolation(tiny_config("llama"), 256)
    with pytest.raises(ValueError, match="already uses 'linear'.*scaling='linear'"):
        apply_position_interpolation(extended, 512, scaling="yarn")


def test_phi3_only_takes_linear():
    with pytest.raises(ValueError, match="only scaling='linear'"):
        apply_position_interpolation(tiny_config("phi3"), 256, scaling="yarn")


def test_real_longrope_is_not_extended():
    half = tiny_config("phi3").hidden_size // tiny_config("phi3").num_attention_heads // 2
    config = tiny_config(
        "phi3", max_position_embeddings=256,
        rope_parameters={"rope_type": "longrope", "short_factor": [1.0] * half,
                         "long_factor": [float(i + 1) for i in range(half)], "original_max_position_embeddings": 64},
    )
    with pytest.raises(ValueError, match="already uses 'longrope'"):
        apply_position_interpolation(config, 512)


# ---------------------------------------------------------------- legacy keys for transformers 4.x readers


@pytest.mark.parametrize(
    "arch,scaling",
    [("llama", "linear"), ("llama", "dynamic"), ("llama", "yarn"), ("llama", "llama3"), ("qwen3", "yarn"),
     ("gpt_neox", "linear"), ("gemma3_text", "linear"), ("gemma3_text", "yarn"), ("phi3", "linear"),
     ("llama", "none")],
)
def test_legacy_keys_agree_with_rope_parameters(tmp_path, arch, scaling):
    """config.json gets rope_scaling / rope_theta as transformers 4.x reads them; transformers 5, which prefers
    rope_scaling when both are there, still loads exactly the rope_parameters that were written."""
    import json

    from longlora.modeling import finalize_saved_files

    extended = apply_position_interpolation(tiny_config(arch, rope_theta=5e5) if arch == "llama" else tiny_config(
        arch), 256, scaling=scaling)
    extended.save_pretrained(tmp_path)
    finalize_saved_files(tmp_path)
    values = json.loads((tmp_path / "config.json").read_text())
    entry = extended.rope_parameters.get("full_attention", extended.rope_parameters)
    if arch == "phi3":  # LongRoPE has no legacy form with the same meaning: nothing added
        assert "rope_scaling" not in values
    else:
        assert values["rope_theta"] == entry["rope_theta"]
        if scaling == "none":
            assert "rope_scaling" not in values
        else:
            legacy = values["rope_scaling"]
            assert legacy["type"] == legacy["rope_type"] == scaling
            assert legacy["factor"] == entry["factor"] == 4
            expected = {k: v for k, v in entry.items() if k not in ("rope_theta", "partial_rotary_factor")}
            assert {k: v for k, v in legacy.items() if k != "type"} == expected
            if scaling in ("yarn", "llama3"):
                assert legacy["original_max_position_embeddings"] == POSITIONS
            if scaling == "llama3":
                assert (legacy["low_freq_factor"], legacy["high_freq_factor"]) == (1.0, 4.0)
    if arch == "gemma3_text":
        assert values["rope_local_base_freq"] == extended.rope_parameters["sliding_attention"]["rope_theta"]
    if arch == "gpt_neox":
        assert values["rotary_emb_base"] == entry["rope_theta"]
        assert values["rotary_pct"] == entry["partial_rotary_factor"]
    rope_logger = logging.get_logger("transformers.modeling_rope_utils")
    with CaptureLogger(rope_logger) as captured:
        loaded = AutoConfig.from_pretrained(tmp_path)
    assert "Unrecognized" not in captured.out and "mismatch" not in captured.out
    strip = (lambda d: {k: v for k, v in d.items() if k != "type"})
    if "full_attention" in extended.rope_parameters:
        assert {k: strip(v) for k, v in loaded.rope_parameters.items()} == extended.rope_parameters
    else:
        assert strip(loaded.rope_parameters) == extended.rope_parameters
    assert loaded.max_position_embeddings == extended.max_position_embeddings
