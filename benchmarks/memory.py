"""Memory of one long training step, measured and predicted: today's step vs each setting of longlora.memory.

    python benchmarks/memory.py                       # Llama-3.1-8B's width, 1-2 layers, L = 1k..8k (CPU, ~1 h)
    python benchmarks/memory.py --layers 1 --lengths 1024,2048 --settings today,defaults   # a quick look
    python benchmarks/memory.py --smoke --output /tmp/memory.json                           # tiny (the test suite)

(i) Measured: exact tensor bytes of one LoRA+ training step (forward + backward, gradient checkpointing, S2-Attn,
    batch 1, float32 on CPU) of a Llama at Llama-3.1-8B's width (hidden 4096, intermediate 14336, 32 query / 8
    key-value heads, vocabulary 128,256) with 1-2 decoder layers, random weights, the model set up as `longlora
    train` sets it up. Tensors are counted from their allocation until their storage is freed
    (_measure.PeakTensorMemory); the model's parameters are not counted (the optimizer state neither: no optimizer
    step), gradients are. Each step is cut into phases (forward, loss backward, layer backward, embedding backward)
    and the peak of each is reported beside `longlora plan`'s prediction for the same phase (longlora.plan).
(ii) Predicted: `longlora plan`'s table at full depth, Llama-3.1-8B and Llama-3.2-1B, LoRA+ (bf16 base) and QLoRA,
    contexts 32k..1M, on 24 / 80 / 141 GB: the peak per GPU by component and the longest context that fits.

Settings: today (tiled_loss false, tiled_mlp false), tiled_loss, tiled_mlp (both), offload (both + offloaded
checkpoints), defaults (tiled_loss, tiled_mlp auto). Writes JSON + PNG (docs/benchmarks/memory.{json,png} by default).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
from _measure import PeakTensorMemory, save_figure

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SETTINGS = {
    "today": dict(tiled_loss=False, tiled_mlp=False, offload_checkpoints=False),
    "tiled_loss": dict(tiled_loss=True, tiled_mlp=False, offload_checkpoints=False),
    "tiled_mlp": dict(tiled_loss=True, tiled_mlp=True, offload_checkpoints=False),
    "offload": dict(tiled_loss=True, tiled_mlp=True, offload_checkpoints=True),
    "defaults": dict(tiled_loss=True, tiled_mlp="auto", offload_checkpoints=False),
}
LLAMA31_8B_WIDTH = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                        vocab_size=128256, rope_theta=500000.0)
SMOKE_WIDTH = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=2048)
PHASES = ("forward", "loss backward", "layer backward", "embedding backward")


def build(width: dict, layers: int, length: int, dtype: str):
    """A random Llama of `width` and `layers`, set up as `longlora train` sets it up (LoRA+, S2, checkpointing)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import longlora
    from longlora.adapters import apply_lora_plus

    config = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=length, use_cache=False, **width)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora_plus(model)
    if dtype == "bf16":
        from longlora.adapters import keep_trainables_in_float32

        keep_trainables_in_float32(model, torch.bfloat16)
    longlora.enable_s2_attention(model)
    return model.train()


def measure_step(model, length: int, setting: str, dtype: str, **plan_options) -> dict:
    """Seconds and the tensor peak of each phase of one training step under `setting` (+ apply_memory_plan's
    keyword options, e.g. mlp_tile_tokens)."""
    from longlora.adapters import base_model
    from longlora.memory import apply_memory_plan, memory_plan_of, remove_memory_plan

    remove_memory_plan(model)
    apply_memory_plan(model, **SETTINGS[setting], **plan_options)
    plan = memory_plan_of(model)
    base = base_model(model)
    ids = torch.randint(0, base.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    offloaded = (lambda: plan._offloader.host_bytes) if plan._offloader is not None else None
    model.zero_grad(set_to_none=True)
    gc.collect()
    with PeakTensorMemory(offloaded=offloaded) as tracker:
        marks = [base.model.norm.register_full_backward_pre_hook(lambda *a: tracker.mark("loss backward")),
                 base.model.embed_tokens.register_full_backward_pre_hook(lambda *a: tracker.mark("layer backward"))]
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = model(input_ids=ids, labels=ids).loss
        tracker.mark("forward")
        loss.backward()
        tracker.mark("embedding backward")
        seconds = time.perf_counter() - started
        for handle in marks:
            handle.remove()
        del loss
    model.zero_grad(set_to_none=True)
    return dict(seconds=seconds, peak=tracker.peak, phases=dict(tracker.phases))


def predict(width: dict, layers: int, length: int, setting: str, dtype: str):
    from transformers import LlamaConfig

    from longlora import plan as memory_plan

    shape = memory_plan.ModelShape.from_config(LlamaConfig(num_hidden_layers=layers, **width))
    return memory_plan.predict(shape, length, dtype=dtype, **SETTINGS[setting])
