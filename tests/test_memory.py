"""longlora.memory: the chunked loss, the tiled MLP and offloaded checkpoints give today's loss and gradients, and
the tensors they exist to avoid (the (L, V) logits, the sequence's MLP intermediate) never appear."""

from __future__ import annotations

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM

from longlora import enable_s2_attention
from longlora.adapters import apply_lora_plus
from longlora.config import TrainConfig
from longlora.memory import (
    TILED_MLP_AUTO_TOKENS, apply_memory_plan, check_host_memory, chunked_causal_lm_loss, loss_chunk_tokens,
    memory_plan_of, mlp_modules, mlp_tile_tokens, normalize_tiled_mlp, remove_memory_plan,
)
from tiny_models import ARCHS, tiny_config

VOCAB = 320
LENGTH = 48


def _model(arch="llama", seed=0, checkpointing=True, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=VOCAB, **overrides))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = _random_adapters(apply_lora_plus(model), seed)
    enable_s2_attention(model, group_size=16)
    return model.train()


def _random_adapters(model, seed=0):
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # LoRA B starts at 0: random adapters give every trainable parameter a gradient
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _batch(layout="plain", seed=3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (2, LENGTH), generator=gen)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if layout == "padding":  # row 0 left-padded, row 1 right-padded; padding is never scored
        mask = torch.ones_like(ids)
        mask[0, :7] = 0
        mask[1, -11:] = 0
        batch["attention_mask"] = mask
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    elif layout == "packed":  # three documents per row, positions restart at each
        batch["position_ids"] = torch.cat([torch.arange(20), torch.arange(12), torch.arange(16)])[None].expand(2, -1)
    elif layout == "sft":  # answers only
        batch["labels"][:, :30] = -100
    return batch


def _step(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**batch, use_cache=False, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def _assert_same(ref, got, loss_rtol=1e-5, grad_rtol=1e-4):
    (ref_out, ref_grads), (out, grads) = ref, got
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=loss_rtol, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert float(g.abs().max()) > 0, name  # every trainable parameter is exercised
        torch.testing.assert_close(grads[name], g, rtol=grad_rtol, atol=grad_rtol * float(g.abs().max()))


class LargestTensor(TorchDispatchMode):
    """The most elements of any new tensor (not a view of an input) an op produced whose last dimension is `size`."""

    def __init__(self, size):
        super().__init__()
        self.size, self.largest = size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.size
                    and t.untyped_storage().data_ptr() not in inputs):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("arch", ARCHS)
def test_tiled_loss_equals_the_models_loss_for_every_architecture(arch):
    model = _model(arch)
    batch = _batch("padding")
    ref = _step(model, batch)
    apply_memory_plan(model, tiled_loss=True, tiled_mlp=False, loss_chunk_tokens=16)
    got = _step(model, batch)
    _assert_same(ref, got)
    assert got[0].logits.shape == (2, 1, VOCAB)  # only the last position's logits are computed


@pytest.mark.parametrize("layout", ["plain", "padding", "packed", "sft"])
@pytest.mark.parametrize("tied", [False, True])
def test_every_setting_together_equals_todays_step(layout, tied):
    model = _model(tie_word_embeddings=tied)
    batch = _batch(layout)
    ref = _step(model, batch)
    # odd chunk and tile sizes: the last chunk is short; every layer's MLP runs in several tiles
    apply_memory_plan(model, tiled_loss=True, tiled_mlp=True, offload_checkpoints=True, loss_chunk_tokens=24,
                      mlp_tile_tokens=40)
    _assert_same(ref, _step(model, batch))
    remove_memory_plan(model)
    assert memory_plan_of(model) is None
    again = _step(model, batch)
    assert again[0].logits.shape == (2, LENGTH, VOCAB)
    _assert_same(ref, again, loss_rtol=0, grad_rtol=0)


def test_token_count_normalisation_and_shift_labels():
    """The Trainer's num_items_in_batch (a count over an optimizer step's micro-batches) and pre-shifted labels
    (sequence parallelism) are honoured as transformers' ForCausalLMLoss honours them."""
    model = _model()
    batch = _batch("sft")
    shifted = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    count = torch.tensor(123)
    ref_count = _step(model, batch, num_items_in_batch=count)
    ref_shift = _step(model, batch, shift_labels=shifted)
    apply_memory_plan(model, tiled_mlp=False, loss_chunk_tokens=16)
    _assert_same(ref_count, _step(model, batch, num_items_in_batch=count))
    _assert_same(ref_shift, _step(model, batch, shift_labels=shifted))
    # the count divides the summed loss: 123 tokens -> the sum / 123
    scored = int((shifted != -100).sum())
    torch.testing.assert_close(ref_count[0].loss * 123 / scored, ref_shift[0].loss, rtol=1e-5, atol=0)


def test_no_length_by_vocabulary_tensor_exists():
    model = _model()
    batch = _batch()
    tokens = 2 * LENGTH
    with LargestTensor(VOCAB) as today:
        _step(model, batch)
    assert today.largest >= tokens * VOCAB  # the full logits (and their gradient)
    apply_memory_plan(model, tiled_mlp=False, loss_chunk_tokens=16)
    with LargestTensor(VOCAB) as tiled:
        _step(model, batch)
    assert tiled.largest == 16 * VOCAB  # one chunk's logits at most


def test_default_chunk_bounds_the_loss_working_set():
    # 64 MiB of float32 logits per chunk whatever the vocabulary (multiple of 8 tokens)
    assert loss_chunk_tokens(128_256) == 128
    assert loss_chunk_tokens(256_000) == 64
    assert loss_chunk_tokens(32_000) == 520
    for vocab in (32_000, 128_256, 256_000):
        assert loss_chunk_tokens(vocab) * vocab * 4 <= 64 * 2**20


def test_chunked_loss_function_against_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    hidden = torch.randn(3, 37, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 50, (3, 37), generator=gen)
    labels[0, :5] = -100
    for cap in (None, 3.0):
        logits = head(hidden)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        ref_grads = torch.autograd.grad(ref, [hidden, head.weight, head.bias])
        got = chunked_causal_lm_loss(hidden, head, labels, softcap=cap, chunk_tokens=10)
        grads = torch.autograd.grad(got, [hidden, head.weight, head.bias])
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="labels give"):
        chunked_causal_lm_loss(hidden, head, labels[:, :-1])


def test_gemma2_soft_capping_is_applied():
    config = AutoConfig.for_model("gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB,
                                  max_position_embeddings=64, final_logit_softcapping=5.0, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2, sliding_window=16)
    config._attn_implementation = "eager"  # transformers has no SDPA path for Gemma-2 (its attention soft cap)
    torch.manual_seed(0)
    model = _random_adapters(apply_lora_plus(AutoModelForCausalLM.from_config(config))).train()
    batch = _batch()
    ref = _step(model, batch)
    apply_memory_plan(model, tiled_mlp=False, loss_chunk_tokens=16)
    _assert_same(ref, _step(model, batch))


def test_a_model_that_rescales_its_logits_is_refused():
    """Cohere multiplies its logits by logit_scale after lm_head: the chunked loss would miss it, so it says so."""
    config = AutoConfig.for_model("cohere", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, logit_scale=0.5,
                                  max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config).train()
    apply_memory_plan(model, tiled_mlp=False)
    with pytest.raises(RuntimeError, match="set tiled_loss false"):
        model(**_batch())


def test_eval_and_label_free_forwards_are_untouched():
    model = _model()
    batch = _batch()
    model.eval()
    with torch.no_grad():
        ref = model(**batch).logits
    apply_memory_plan(model, tiled_mlp=True, offload_checkpoints=True, mlp_tile_tokens=8)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref)
    model.train()
    out = model(input_ids=batch["input_ids"])  # no labels: no loss, the full logits
    assert out.loss is None and out.logits.shape == (2, LENGTH, VOCAB)


def test_tiled_mlp_bounds_the_intermediate():
    model = _model(checkpointing=False)
    intermediate = tiny_config("llama").intermediate_size
    batch = _batch()
    ref = _step(model, batch)
    with LargestTensor(intermediate) as today:
        _step(model, batch)
    assert today.largest == 2 * LENGTH * intermediate
    apply_memory_plan(model, tiled_loss=False, tiled_mlp=True, mlp_tile_tokens=32)
    with LargestTensor(intermediate) as tiled:
        got = _step(model, batch)
    assert tiled.largest == 32 * intermediate
    _assert_same(ref, got)
    assert len(mlp_modules(model)) == 2


def test_tiled_mlp_auto_acts_from_the_measured_length():
    model = _model()
    apply_memory_plan(model, tiled_mlp="auto")
    plan = memory_plan_of(model)
    assert not plan.tiles_mlp(TILED_MLP_AUTO_TOKENS - 1) and plan.tiles_mlp(TILED_MLP_AUTO_TOKENS)
    assert normalize_tiled_mlp("AUTO") == "auto" and normalize_tiled_mlp("off") is False
    with pytest.raises(ValueError, match="auto, true or false"):
        normalize_tiled_mlp("sometimes")
    # 8B's MLP (14336 wide) in bf16: 4096-token tiles of 112 MiB per intermediate tensor
    assert mlp_tile_tokens(14336, 2) == 4096
    assert mlp_tile_tokens(14336, 4) == 2048


def test_offload_packs_each_layer_input_once_and_frees_it():
    model = _model()
    batch = _batch()
    apply_memory_plan(model, tiled_loss=False, tiled_mlp=False, offload_checkpoints=True)
    offloader = memory_plan_of(model)._offloader
    out = model(**batch, use_cache=False)
    hidden = tiny_config("llama").hidden_size
    assert offloader.host_bytes == 2 * (2 * LENGTH * hidden * 4)  # two layers' inputs, float32
    out.loss.backward()
    del out
    assert offloader.host_bytes == 0
    # the Trainer enables gradient checkpointing again after the plan is on: the new checkpoint function offloads too
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    out = model(**batch, use_cache=False)
    assert offloader.host_bytes == 2 * (2 * LENGTH * hidden * 4)
    del out
    assert offloader.host_bytes == 0
    remove_memory_plan(model)
    model(**batch, use_cache=False)
    assert offloader.host_bytes == 0


def test_offload_needs_gradient_checkpointing_and_host_memory(tmp_path):
    with pytest.raises(ValueError, match="set gradient_checkpointing true"):
        TrainConfig(model="m", data="d", offload_checkpoints=True, gradient_checkpointing=False)
    config = AutoConfig.for_model("llama", hidden_size=4096, num_hidden_layers=32)
    need = 32 * 131072 * 4096 * 2
    assert check_host_memory(config, 131072, 2, available=need) == need
    with pytest.raises(ValueError, match=r"32.0 GiB of checkpoints in host memory .* has 8.0 GiB available"):
        check_host_memory(config, 131072, 2, available=8 * 2**30)


def test_train_options_reach_the_model(tmp_path):
    from longlora.config import load_config

    config = load_config(TrainConfig, ["--model", "m", "--data", "d", "--tiled-mlp", "true", "--no-tiled-loss"])
    assert config.tiled_mlp is True and config.tiled_loss is False and config.offload_checkpoints is False
    assert TrainConfig(model="m", data="d").tiled_mlp == "auto"
    with pytest.raises(ValueError, match="tiled_mlp must be auto, true or false"):
        TrainConfig(model="m", data="d", tiled_mlp="maybe")


def test_applying_twice_replaces_the_plan():
    model = _model()
    batch = _batch()
    ref = _step(model, batch)
    apply_memory_plan(model, tiled_mlp=True, mlp_tile_tokens=16)
    apply_memory_plan(model, tiled_mlp=False, loss_chunk_tokens=8)
    plan = memory_plan_of(model)
    assert plan.tiled_mlp is False and plan.loss_chunk_tokens == 8
    assert all("forward" not in m.__dict__ for m in mlp_modules(model))  # the tiled forward is gone
    _assert_same(ref, _step(model, batch))


def test_tiled_mlp_with_trainable_mlp_weights():
    """LoRA on the MLP's projections: their gradients come out of the tiles' backward."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=VOCAB))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = _random_adapters(apply_lora_plus(model, targets=["q_proj", "v_proj", "gate_proj", "down_proj"])).train()
    batch = _batch("padding")
    ref = _step(model, batch)
    apply_memory_plan(model, tiled_loss=True, tiled_mlp=True, loss_chunk_tokens=16, mlp_tile_tokens=20)
    got = _step(model, batch)
    assert any("gate_proj.lora_A" in name for name in got[1])
    _assert_same(ref, got)


@pytest.mark.parametrize("arch,lean", [("llama", 5), ("qwen3", 9), ("phi3", 5), ("gemma", 0), ("gpt_neox", 0)])
def test_lean_norms_only_where_the_forward_is_llamas(arch, lean):
    """Llama-style RMSNorms (2 per layer + the final one; Qwen3's q/k norms too) get the lean backward; Gemma's
    (1 + weight) norm and GPT-NeoX's LayerNorm keep their own. PEFT's trained copies and originals both count."""
    from longlora.memory import lean_norm_modules

    model = _model(arch)
    names = {type(m).__name__ for m in lean_norm_modules(model)}
    assert len(lean_norm_modules(model)) == 2 * lean  # the original and PEFT's trained copy of each
    assert all(name.endswith("RMSNorm") for name in names)


def test_lean_norms_in_bfloat16_match_autograd():
    from longlora.memory import _LeanRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(32)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(32, generator=gen) + 0.5)  # float32 weight, as LoRA+ trains it
    x = torch.randn(5, 7, 32, generator=gen).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(5, 7, 32, generator=gen)
    ref = norm(x)
    ref_x, ref_w = torch.autograd.grad(ref, [x, norm.weight], grad)
    out = _LeanRMSNorm.apply(x, norm.weight, norm.variance_epsilon)
    got_x, got_w = torch.autograd.grad(out, [x, norm.weight], grad)
    assert out.dtype == ref.dtype == torch.float32 and torch.equal(out, ref)
    torch.testing.assert_close(got_x, ref_x, rtol=1e-2, atol=1e-2)  # bf16 input gradient: one rounding apart
    torch.testing.assert_close(got_w, ref_w, rtol=1e-5, atol=1e-5)


def test_training_with_and_without_the_memory_settings_gives_the_same_adapter(tmp_path):
    """`longlora train` with gradient accumulation over packed documents: the defaults (chunked loss, lean norms) and
    every setting on give the adapter and the losses of a run with all of them off."""
    from safetensors.torch import load_file

    from longlora.config import load_config
    from longlora.train import run_training
    from tiny_models import save_tiny_model, stdlib_corpus

    save_tiny_model(tmp_path / "base", "llama")
    stdlib_corpus(tmp_path / "corpus", n_files=2)
    common = ["--model", str(tmp_path / "base"), "--data", str(tmp_path / "corpus"), "--context-length", "128",
              "--max-steps", "2", "--gradient-accumulation-steps", "2", "--learning-rate", "3e-3",
              "--warmup-steps", "0", "--save-steps", "100", "--max-blocks", "4", "--packing", "documents"]
    runs = {"off": ["--tiled-loss", "false", "--tiled-mlp", "false"], "defaults": [],
            "all": ["--tiled-mlp", "true", "--offload-checkpoints", "true"]}
    results = {}
    for name, extra in runs.items():
        result = run_training(load_config(TrainConfig, common + ["--output-dir", str(tmp_path / name)] + extra))
        results[name] = (load_file(tmp_path / name / "adapter_model.safetensors"), result.summary["losses"])
    ref, ref_losses = results["off"]
    for name in ("defaults", "all"):
        got, losses = results[name]
        assert [s for s, _ in losses] == [s for s, _ in ref_losses] == [1, 2]
        for (_, a), (_, b) in zip(losses, ref_losses):
            assert a == pytest.approx(b, rel=1e-5)
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-6)
