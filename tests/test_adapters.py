"""LoRA+ through PEFT: the exact trainable set per architecture, tied embeddings, saving, training, errors."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GPT2Config

from longlora.adapters import (
    apply_lora_plus,
    default_lora_targets,
    format_trainable_counts,
    keep_trainables_in_float32,
    trainable_module_names,
    trainable_parameter_counts,
    trainable_parameter_names,
)
from tiny_models import ARCHS, HIDDEN, LAYERS, VOCAB, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

LAYER_IDS = range(LAYERS)


def tiny_model(arch: str, **overrides):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))


# The exact modules per architecture: (layer prefix, LoRA targets in a layer, norms in a layer, embedding, final norm,
# parameters of a norm)
LAYOUT = {
    "llama": ("model.layers", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
              ["input_layernorm", "post_attention_layernorm"], "model.embed_tokens", "model.norm", ["weight"]),
    "qwen3": ("model.layers", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
              ["self_attn.q_norm", "self_attn.k_norm", "input_layernorm", "post_attention_layernorm"],
              "model.embed_tokens", "model.norm", ["weight"]),
    "phi3": ("model.layers", ["self_attn.qkv_proj", "self_attn.o_proj"],
             ["input_layernorm", "post_attention_layernorm"], "model.embed_tokens", "model.norm", ["weight"]),
    "gpt_neox": ("gpt_neox.layers", ["attention.query_key_value", "attention.dense"],
                 ["input_layernorm", "post_attention_layernorm"], "gpt_neox.embed_in", "gpt_neox.final_layer_norm",
                 ["weight", "bias"]),
}


def expected_trainable(arch: str, finetune: str) -> set[str]:
    layers, targets, norms, embed, final_norm, norm_params = LAYOUT[arch]
    prefix = "base_model.model."
    names = {
        f"{prefix}{layers}.{i}.{target}.lora_{ab}.default.weight"
        for i in LAYER_IDS for target in targets for ab in "AB"
    }
    if finetune == "lora_plus":
        names.add(f"{prefix}{embed}.modules_to_save.default.weight")
        norm_modules = [f"{layers}.{i}.{norm}" for i in LAYER_IDS for norm in norms] + [final_norm]
        names |= {f"{prefix}{m}.modules_to_save.default.{p}" for m in norm_modules for p in norm_params}
    return names


# ---------------------------------------------------------------- what is trained


@pytest.mark.parametrize("arch", sorted(LAYOUT))
@pytest.mark.parametrize("finetune", ["lora_plus", "lora"])
def test_exact_trainable_parameters(arch, finetune):
    model = apply_lora_plus(tiny_model(arch), finetune=finetune)
    assert set(trainable_parameter_names(model)) == expected_trainable(arch, finetune)


@pytest.mark.parametrize(
    "arch,targets",
    [("llama", ["q_proj", "k_proj", "v_proj", "o_proj"]), ("mistral", ["q_proj", "k_proj", "v_proj", "o_proj"]),
     ("qwen2", ["q_proj", "k_proj", "v_proj", "o_proj"]), ("qwen3", ["q_proj", "k_proj", "v_proj", "o_proj"]),
     ("gemma", ["q_proj", "k_proj", "v_proj", "o_proj"]), ("gemma3_text", ["q_proj", "k_proj", "v_proj", "o_proj"]),
     ("phi3", ["qkv_proj", "o_proj"]), ("gpt_neox", ["query_key_value", "dense"])],
)
def test_default_lora_targets(arch, targets):
    assert default_lora_targets(tiny_model(arch)) == targets


def test_gemma3_trains_all_its_norms():
    names = trainable_module_names(tiny_model("gemma3_text"))
    per_layer = ["self_attn.q_norm", "self_attn.k_norm", "input_layernorm", "post_attention_layernorm",
                 "pre_feedforward_layernorm", "post_feedforward_layernorm"]
    expected = ["model.embed_tokens"] + [f"model.layers.{i}.{n}" for i in LAYER_IDS for n in per_layer] + ["model.norm"]
    assert names == expected


def test_trainable_kinds_can_be_chosen():
    model = tiny_model("llama")
    assert trainable_module_names(model, ("embed",)) == ["model.embed_tokens"]
    assert trainable_module_names(model, ("norm",))[-1] == "model.norm"
    assert "lm_head" not in trainable_module_names(model)


def test_full_trains_everything():
    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    out = apply_lora_plus(model, finetune="full")
    assert out is model
    assert all(p.requires_grad for p in model.parameters())
    counts = trainable_parameter_counts(model)
    assert counts["total"] == counts["all"] == sum(p.numel() for p in model.parameters())
    assert counts["lora"] == 0 and counts["embed"] == VOCAB * HIDDEN and counts["norm"] == (2 * LAYERS + 1) * HIDDEN


# ---------------------------------------------------------------- counts


def test_counts_by_kind():
    base = tiny_model("llama")
    base_size = sum(p.numel() for p in base.parameters())
    counts = trainable_parameter_counts(apply_lora_plus(base, rank=8))
    kv_dim = 2 * HIDDEN // 4  # 2 key/value heads of 16
    # LoRA: r * (in + out) for q (64->64), k and v (64->32), o (64->64), in every layer
    lora = LAYERS * 8 * ((HIDDEN + HIDDEN) + 2 * (HIDDEN + kv_dim) + (HIDDEN + HIDDEN))
    assert counts == {
        "lora": lora, "embed": VOCAB * HIDDEN, "norm": (2 * LAYERS + 1) * HIDDEN, "other": 0,
        "total": lora + VOCAB * HIDDEN + (2 * LAYERS + 1) * HIDDEN, "all": base_size + lora,
    }
    assert format_trainable_counts(counts) == (
        "trainable: lora 7.2K | embed 8.2K | norm 320 | total 15.7K of 97.6K (16.1%)"
    )


def test_format_large_numbers():
    counts = {"lora": 1_200_000, "embed": 500_000, "norm": 3_100, "other": 0, "total": 1_703_100,
              "all": 134_515_008}
    assert format_trainable_counts(counts) == (
        "trainable: lora 1.2M | embed 500K | norm 3.1K | total 1.7M of 135M (1.27%)"
    )


# ---------------------------------------------------------------- tied embeddings and saving


def _trained_copy(model, module: str) -> torch.Tensor:
    return model.get_base_model().get_submodule(module).modules_to_save["default"].weight


def test_tied_embeddings_stay_tied_through_training_saving_and_loading(tmp_path):
    base = tiny_model("llama", tie_word_embeddings=True)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    model = apply_lora_plus(base)
    assert _trained_copy(model, "lm_head") is _trained_copy(model, "model.embed_tokens")

    _train(model, steps=2)
    embed = _trained_copy(model, "model.embed_tokens")
    assert _trained_copy(model, "lm_head") is embed
    assert not torch.equal(embed, model.get_base_model().model.embed_tokens.original_module.weight)

    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        saved = {key: f.get_tensor(key) for key in f.keys()}
    assert torch.equal(saved["base_model.model.model.embed_tokens.weight"], embed.detach())
    for norm in ["model.layers.0.input_layernorm", "model.layers.1.post_attention_layernorm", "model.norm"]:
        assert torch.equal(saved[f"base_model.model.{norm}.weight"], _trained_copy(model, norm).detach())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight" in saved

    loaded = PeftModel.from_pretrained(tiny_model("llama", tie_word_embeddings=True), tmp_path)
    assert _trained_copy(loaded, "lm_head") is _trained_copy(loaded, "model.embed_tokens")
    torch.testing.assert_close(_trained_copy(loaded, "model.embed_tokens"), embed.detach())
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_untied_model_does_not_train_lm_head():
    model = apply_lora_plus(tiny_model("llama"))
    assert not any("lm_head" in name for name in trainable_parameter_names(model))


# ---------------------------------------------------------------- a training step


def _train(model, steps: int) -> None:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):  # two steps: LoRA A gets no gradient while B is still zero
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("arch,finetune", [("llama", "lora_plus"), ("gpt_neox", "lora_plus"), ("qwen3", "lora")])
def test_training_changes_only_trainable_parameters(arch, finetune):
    model = apply_lora_plus(tiny_model(arch), finetune=finetune)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = set(trainable_parameter_names(model))
    _train(model, steps=2)
    for name, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == (name in trainable), name


# ---------------------------------------------------------------- mixed precision: bf16 base, fp32 trainables


def _decoder_layers(model) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen3", False), ("phi3", False),
                                       ("gpt_neox", False)])
def test_trainables_in_float32_over_a_bfloat16_base(arch, tied):
    base = tiny_model(arch, **({"tie_word_embeddings": True} if tied else {})).to(torch.bfloat16)
    model = apply_lora_plus(base)
    cast = keep_trainables_in_float32(model, torch.bfloat16)
    # exactly the embed / norm copies were cast (PEFT makes LoRA A/B float32 itself); nothing frozen moved
    assert set(cast) == {n for n in expected_trainable(arch, "lora_plus") if ".lora_" not in n}
    for name, parameter in model.named_parameters():
        assert parameter.dtype == (torch.float32 if parameter.requires_grad else torch.bfloat16), name
    if tied:
        assert _trained_copy(model, "lm_head") is _trained_copy(model, "model.embed_tokens")

    layer_inputs = []
    hooks = [layer.register_forward_pre_hook(
        lambda module, args, kwargs: layer_inputs.append((args[0] if args else kwargs["hidden_states"]).dtype),
        with_kwargs=True) for layer in _decoder_layers(model)]
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what the Trainer runs a bf16 step under
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for hook in hooks:
        hook.remove()
    # the residual stream (every layer's input, what checkpointing keeps) stays in bfloat16
    assert layer_inputs == [torch.bfloat16] * LAYERS
    assert torch.isfinite(loss)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and ".lora_A." not in name:  # A gets no gradient while B is zero
            assert parameter.grad is not None and parameter.grad.dtype == torch.float32, name
            assert parameter.grad.abs().sum() > 0, name


def test_output_casts_are_replaced_not_stacked_and_float32_removes_them():
    model = apply_lora_plus(tiny_model("llama").to(torch.bfloat16))
    keep_trainables_in_float32(model, torch.bfloat16)
    assert keep_trainables_in_float32(model, torch.bfloat16) == []  # already float32
    embedding = model.get_base_model().model.embed_tokens.modules_to_save["default"]
    norm = model.get_base_model().model.norm.modules_to_save["default"]
    assert len(embedding._forward_hooks) == 1 and len(norm._forward_hooks) == 1
    ids = torch.tensor([[3, 4, 5]])
    assert embedding(ids).dtype == torch.bfloat16 and norm(torch.ones(1, HIDDEN)).dtype == torch.bfloat16
    keep_trainables_in_float32(model, torch.float32)
    assert len(embedding._forward_hooks) == 0 and len(norm._forward_hooks) == 0
    assert embedding(ids).dtype == torch.float32


def test_lora_only_has_nothing_to_cast_or_hook():
    model = apply_lora_plus(tiny_model("llama").to(torch.bfloat16), finetune="lora")
    assert keep_trainables_in_float32(model, torch.bfloat16) == []
    assert all(not module._forward_hooks for module in model.modules())


# ---------------------------------------------------------------- errors


def test_unknown_architecture():
    gpt2 = AutoModelForCausalLM.from_config(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    )
    with pytest.raises(ValueError, match=r"unknown architecture GPT2LMHeadModel.*targets=\[\.\.\.\]"):
        default_lora_targets(gpt2)
    with pytest.raises(ValueError, match="unknown architecture"):
        apply_lora_plus(gpt2)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"finetune": "qlora"}, "unknown finetune 'qlora'"),
        ({"rank": 0}, "rank must be a positive integer"),
        ({"alpha": 0}, "alpha must be > 0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"trainable": ("embed", "lm_head")}, "trainable must be a list drawn from"),
        ({"targets": []}, "targets is empty"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        apply_lora_plus(tiny_model("llama"), **kwargs)


def test_adapters_are_not_applied_twice():
    model = apply_lora_plus(tiny_model("llama"))
    with pytest.raises(ValueError, match="already carries PEFT adapters"):
        apply_lora_plus(model)


def test_forward_hooks_on_the_transformers_model_fire_through_peft():
    """S2, the memory plan and sequence parallelism hook the transformers model: calling the PEFT model must reach
    it through __call__ (PEFT < 0.21 called its .forward, which skips hooks; apply_lora_plus routes it)."""
    from longlora.adapters import base_model

    model = apply_lora_plus(tiny_model("llama"))
    calls = []
    handle = base_model(model).register_forward_pre_hook(lambda module, args: calls.append(module))
    model(input_ids=torch.randint(0, VOCAB, (1, 8)))
    handle.remove()
    assert calls == [base_model(model)]


def test_every_tiny_architecture_gets_lora_plus():
    for arch in ARCHS:
        counts = trainable_parameter_counts(apply_lora_plus(tiny_model(arch)))
        assert counts["lora"] > 0 and counts["embed"] == VOCAB * HIDDEN and counts["norm"] > 0, arch
        assert counts["other"] == 0, arch
