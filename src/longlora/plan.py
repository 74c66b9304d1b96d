"""`longlora plan`: the memory of one LoRA+ training step per GPU, predicted from a model's config alone.

The step is that of `longlora train` (gradient checkpointing, S2-Attn, LoRA r=8 on the attention projections +
trained embedding and norms, AdamW, batch B of L tokens). Its peak is the fixed part (frozen weights; trainable
weights with their two Adam moments) plus the largest of the step's phases, each a sum of tensors:

- loss backward: every layer's checkpointed input, the final norm's saved tensors, the loss's working set (one chunk
  of logits with `tiled_loss`, else the (N, V) logits, their float32 copy, log-softmax and gradients) and the
  gradient of the hidden states;
- layer backward (the last layer, recomputed): the checkpoints, the layer's saved activations (attention: q/k/v
  after RoPE, output, logsumexp; the rest: norms, projections, residuals, the MLP's intermediates or one tile of
  them) and its backward's temporaries;
- embedding backward: the trained embedding's dense (V, H) float32 gradient;
- optimizer step: every trainable's gradient and AdamW's temporaries.

Bytes per token of each tensor group are counted for transformers' Llama-family decoder layer (Llama, Mistral,
Qwen2/3: the same layer) under this package's memory settings, in float32 and in bfloat16 autocast (frozen weights
bf16, trainables fp32); the coefficients below were read off exact tensor counts on CPU (benchmarks/memory.py
checks every prediction against a measurement, Llama-3.1-8B's width included). Other architectures get the same
formula as an estimate. Attention is memory-linear in L for S2 and for flash-style full attention alike (both save
q, k, v, the output and a logsumexp), so S2 and full attention predict the same peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .memory import loss_chunk_tokens as default_chunk  # (predict has an option of that name)
from .memory import mlp_tile_tokens

GiB = 2**30
RESERVED_BYTES = 2 * GiB
"""Taken off the GPU's memory before fitting: the CUDA context, cuBLAS/cuDNN workspaces, allocator slack."""

# Published shapes, used when a hub id's config cannot be fetched (no network): name -> LlamaConfig fields.
KNOWN_SHAPES = {
    "meta-llama/Llama-3.1-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                    tie_word_embeddings=False),
    "meta-llama/Llama-3.2-1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                                    tie_word_embeddings=True),
    "meta-llama/Llama-2-7b-hf": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                     tie_word_embeddings=False),
    "mistralai/Mistral-7B-v0.1": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                      tie_word_embeddings=False),
}
KNOWN_SHAPES["meta-llama/Llama-3.1-8B-Instruct"] = KNOWN_SHAPES["meta-llama/Llama-3.1-8B"]
KNOWN_SHAPES["meta-llama/Llama-3.2-1B-Instruct"] = KNOWN_SHAPES["meta-llama/Llama-3.2-1B"]

# Bytes per token of one decoder layer's recompute + backward, by activation dtype: coefficients of hidden (H),
# query width (Hq x D), key/value width (Hkv x D), MLP intermediate (I), query heads, head_dim (RoPE cos/sin) and a
# constant (ids, labels, positions). `mlp` is the MLP's share (gate, act(gate), up saved + their gradients); with the
# MLP tiled it is paid for one tile only, and `tiled` x H per token is paid instead (the tile outputs, the gradient
# of the MLP input); in bf16 the layer's peak then moves to a point where `tiled_floor` x H per token is live.
LAYER = {
    4: dict(hidden=12, q=8, kv=8, mlp=24, heads=4, head_dim=8, const=160, tiled=9.5, tiled_floor=0),
    2: dict(hidden=10, q=6, kv=4, mlp=12, heads=4, head_dim=4, const=110, tiled=4.75, tiled_floor=10),
}
LAYER_TODAY_HIDDEN = {4: 20, 2: 20}  # without the lean RMSNorm backward (norms keep float32 copies)
# Loss backward, bytes per token besides the checkpoints: the final norm, the hidden state and its gradient.
LOSS = {4: dict(hidden=12, head_dim=8, const=37), 2: dict(hidden=7, head_dim=4, const=37)}
LOSS_TODAY_HIDDEN = {4: 10, 2: 7}  # (N, V) logits path: bytes per token besides 12 x V and the checkpoints
EMBEDDING = dict(hidden=4, const=55)  # the gradient reaching the embedding output (float32), per token
ADAM_BYTES = 8  # two float32 moments per trainable parameter
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + an 8-bit scale per 64 + a float32 per 256 scales


@dataclass
class ModelShape:
    """What the memory of a step depends on, read from a transformers config."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    lora_rank: int = 8

    @classmethod
    def from_config(cls, config, name: str = "", lora_rank: int = 8) -> "ModelShape":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
                   if getattr(text, k, None) is None]
        if missing:
            raise ValueError(f"{name or 'the model'}: its config has no {', '.join(missing)}; plan needs a decoder "
                             "config (hidden_size, intermediate_size, num_hidden_layers, heads, vocab_size)")
        return cls(name=name or getattr(text, "_name_or_path", "") or text.model_type, layers=text.num_hidden_layers,
                   hidden=text.hidden_size, intermediate=text.intermediate_size, heads=heads,
                   kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   vocab=text.vocab_size, tied=bool(getattr(config, "tie_word_embeddings", False)), lora_rank=lora_rank)

    # parameter counts
    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_linear_params(self) -> int:
        h, q, kv, i = self.hidden, self.q_width, self.kv_width, self.intermediate
        return h * q + 2 * h * kv + q * h + 3 * h * i

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    def lora_params(self) -> int:
        h, q, kv, r = self.hidden, self.q_width, self.kv_width, self.lora_rank
        return self.layers * r * ((h + q) + 2 * (h + kv) + (q + h))

    def params(self) -> int:
        head = 0 if self.tied else self.embedding_params()
        return self.layers * self.layer_linear_params() + self.embedding_params() + head + self.norm_params()


@dataclass
class Settings:
    """One memory setting of a step (longlora.memory's options, the activation dtype, the quantization)."""

    tiled_loss: bool = True
    tiled_mlp: str | bool = "auto"
    offload_checkpoints: bool = False
    lean_norms: bool = True
    dtype: str = "bf16"
    """bf16 (a bf16 base under autocast, trainables fp32) | fp32."""
    quantization: str | None = None
    """None | 4bit (QLoRA: NF4 projections, bf16 compute)."""
    batch: int = 1
    loss_chunk_tokens: int | None = None
    mlp_tile_tokens: int | None = None

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "fp32" else 2

    @property
    def label(self) -> str:
        if not self.tiled_loss and not self.lean_norms:
            return "today"
        parts = ["tiled loss" if self.tiled_loss else "full loss"]
        if self.tiled_mlp is not False:
            parts.append("tiled MLP" + (" (auto)" if self.tiled_mlp == "auto" else ""))
        if self.offload_checkpoints:
            parts.append("offloaded checkpoints")
        return " + ".join(parts)


@dataclass
class Prediction:
    """Bytes of one step's peak per GPU, split by component, and of each phase."""

    shape: ModelShape
    context: int
    settings: Settings
    components: dict[str, int] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)
    host_bytes: int = 0

    @property
    def fixed(self) -> int:
        return self.components["weights"] + self.components["trainables + optimizer"]

    @property
    def peak(self) -> int:
        return self.fixed + max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)


def predict(shape: ModelShape, context: int, *, dtype: str = "bf16", quantization: str | None = None,
            tiled_loss: bool = True, tiled_mlp: str | bool = "auto", offload_checkpoints: bool = False,
            lean_norms: bool | None = None, batch: int = 1, loss_chunk_tokens: int | None = None,
            mlp_tile_tokens: int | None = None, prefetch: bool = True) -> Prediction:
    """The peak of one training step of `batch` x `context` tokens (see the module docstring). prefetch: offloaded
    checkpoints are prefetched one layer ahead (CUDA; on CPU there is no prefetch: one layer input less)."""
    from .memory import normalize_tiled_mlp

    if lean_norms is None:  # "today" (neither setting) is the step before longlora.memory existed
        lean_norms = tiled_loss or tiled_mlp is not False
    settings = Settings(tiled_loss=tiled_loss, tiled_mlp=normalize_tiled_mlp(tiled_mlp),
                        offload_checkpoints=offload_checkpoints, lean_norms=lean_norms, dtype=dtype,
                        quantization=quantization, batch=batch, loss_chunk_tokens=loss_chunk_tokens,
                        mlp_tile_tokens=mlp_tile_tokens)
    if quantization == "4bit":
        settings.dtype = "bf16"
    s = settings.itemsize
    n = batch * context
    h, v = shape.hidden, shape.vocab
    out = Prediction(shape=shape, context=context, settings=settings)

    # fixed: frozen weights (with LoRA+, PEFT keeps the original embedding and norms beside the trained copies)
    linear = shape.layers * shape.layer_linear_params()
    rest = shape.params() - linear
    if quantization == "4bit":
        weights = math.ceil(linear * NF4_BYTES) + rest * 2
    else:
        weights = shape.params() * s
    trainable = shape.lora_params() + shape.embedding_params() + shape.norm_params()
    small = shape.lora_params() + shape.norm_params()  # gradients that exist during the backward of the layers
    out.components["weights"] = weights
    out.components["trainables + optimizer"] = trainable * (4 + ADAM_BYTES)  # gradients: in the phases
    head_grad = v * h * 4 if shape.tied else 0  # a trained, tied lm_head: its gradient exists from the loss on

    # checkpoints: each layer's input, on the GPU unless offloaded (then two: the one recomputed, the one prefetched)
    checkpoints = shape.layers * n * h * s
    on_gpu = min(2 if prefetch else 1, shape.layers) * n * h * s if offload_checkpoints else checkpoints
    out.host_bytes = checkpoints if offload_checkpoints else 0
    out.components["checkpoints"] = on_gpu

    # one layer's recompute + backward
    c = LAYER[s]
    attention = n * (c["q"] * shape.q_width + c["kv"] * shape.kv_width + c["heads"] * shape.heads)
    rest_of_layer = n * ((c["hidden"] if lean_norms else LAYER_TODAY_HIDDEN[s]) * h + c["head_dim"] * shape.head_dim
                         + c["const"])
    tile = mlp_tile_tokens or _mlp_tile(shape, settings, n)
    if tile and tile < n:
        mlp = max(c["mlp"] * shape.intermediate * tile + int(n * c["tiled"] * h), n * c["tiled_floor"] * h)
    else:
        mlp = n * c["mlp"] * shape.intermediate
    if quantization == "4bit":  # one projection dequantised at a time (bf16), and its gradient's partner
        rest_of_layer += 2 * 2 * h * shape.intermediate
    out.components["attention"] = attention
    out.components["recompute"] = rest_of_layer + mlp
    out.phases["layer backward"] = on_gpu + attention + rest_of_layer + mlp + small * 4 + head_grad

    # the loss
    if tiled_loss:
        chunk = min(loss_chunk_tokens or default_chunk(v), n)
        working = 12 * chunk * v  # a chunk's float32 logits, log-softmax and their gradients
        per_token = LOSS[s]["hidden"] * h + LOSS[s]["head_dim"] * shape.head_dim + LOSS[s]["const"]
        loss = working + n * per_token
    else:
        loss = 12 * n * v + n * LOSS_TODAY_HIDDEN[s] * h
    out.components["loss"] = loss
    out.phases["loss backward"] = (0 if offload_checkpoints else checkpoints) + loss + head_grad

    out.phases["embedding backward"] = v * h * 4 * (2 if shape.tied else 1) + n * (EMBEDDING["hidden"] * h
                                                                                   + EMBEDDING["const"])
    out.phases["embedding backward"] += small * 4
    # every trainable's gradient, and AdamW's temporaries (its foreach updates): about one more copy
    out.phases["optimizer step"] = trainable * 4 * 2
    return out


def _mlp_tile(shape: ModelShape, settings: Settings, tokens: int) -> int | None:
    from .memory import TILED_MLP_AUTO_TOKENS

    if settings.tiled_mlp is False or (settings.tiled_mlp == "auto" and tokens < TILED_MLP_AUTO_TOKENS):
        return None
    return mlp_tile_tokens(shape.intermediate, settings.itemsize)


def step_tensors(prediction: Prediction) -> int:
    """What benchmarks/memory.py measures on CPU: the step's tensors without parameters and optimizer state (the
    largest backward phase, gradients included)."""
    return max(v for k, v in prediction.phases.items() if k != "optimizer step")


def usable_bytes(gpu_gib: float) -> int:
    return int(gpu_gib * GiB) - RESERVED_BYTES


def longest_context(shape: ModelShape, gpu_gib: float, step: int = 1024, limit: int = 1 << 24, **options) -> int:
    """The longest context (a multiple of `step`) whose predicted peak fits `gpu_gib` GiB; 0 when none does."""
    budget = usable_bytes(gpu_gib)
    if predict(shape, step, **options).peak > budget:
        return 0
    lo, hi = 1, limit // step  # in units of step: lo fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if predict(shape, mid * step, **options).peak <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo * step


PLAN_SETTINGS = {
    "today": dict(tiled_loss=False, tiled_mlp=False, offload_checkpoints=False),
    "defaults": dict(tiled_loss=True, tiled_mlp="auto", offload_checkpoints=False),
    "offload": dict(tiled_loss=True, tiled_mlp="auto", offload_checkpoints=True),
}


def load_shape(model: str, lora_rank: int = 8) -> tuple[ModelShape, str]:
    """The shape of `model` (a local directory with config.json, a hub id, or a known published shape) and where
    it was read from. No weights are loaded."""
    from pathlib import Path

    from transformers import AutoConfig, LlamaConfig

    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{model} has no config.json; pass a model directory or a hub id")
        return ModelShape.from_config(AutoConfig.from_pretrained(path), name=model, lora_rank=lora_rank), "config.json"
    if path.suffix == ".gguf" or path.exists():
        raise ValueError(f"{model}: plan reads a config.json (a model directory or a hub id), not a file")
    if model in KNOWN_SHAPES:  # published shapes: exact, and no network needed
        shape = ModelShape.from_config(LlamaConfig(**KNOWN_SHAPES[model]), name=model, lora_rank=lora_rank)
        return shape, "its published shape"
    try:
        config = AutoConfig.from_pretrained(model)
        return ModelShape.from_config(config, name=model, lora_rank=lora_rank), "the hub"
    except (OSError, ValueError) as err:
        raise ValueError(f"unknown model {model!r}: no local directory of that name and the hub gave no config "
                         f"({' '.join(str(err).split())[:120]}); pass a directory holding config.json") from None


def format_plan(shape: ModelShape, context: int, gpu_gib: float, batch: int = 1, quantization: str | None = None,
                dtype: str = "bf16") -> tuple[str, list[dict]]:
    """`longlora plan`'s table: the peak at `context` by component for each setting, and the longest that fits."""
    rows = []
    for name, options in PLAN_SETTINGS.items():
        pred = predict(shape, context, batch=batch, quantization=quantization, dtype=dtype, **options)
        longest = longest_context(shape, gpu_gib, batch=batch, quantization=quantization, dtype=dtype, **options)
        rows.append(dict(setting=name, label=pred.settings.label, peak=pred.peak, fits=pred.peak <= usable_bytes(gpu_gib),
                         components=dict(pred.components), phases=dict(pred.phases), peak_phase=pred.peak_phase,
                         host_bytes=pred.host_bytes, longest=longest))
    kind = "QLoRA (4-bit base)" if quantization == "4bit" else f"LoRA+ ({dtype} base)"
    lines = [f"{shape.name}: {shape.layers} layers, hidden {shape.hidden}, intermediate {shape.intermediate}, "
             f"{shape.heads}/{shape.kv_heads} heads, vocabulary {shape.vocab}; {kind}, batch {batch} x {context} "
             f"tokens, one {gpu_gib:g} GiB GPU ({usable_bytes(gpu_gib) / GiB:.1f} GiB usable)"]
    names = list(rows[0]["components"])
    lines.append(f"{'GiB':>24}" + "".join(f"{r['setting']:>12}" for r in rows))
    for component in names:
        lines.append(f"{component:>24}" + "".join(f"{r['components'][component] / GiB:>12.2f}" for r in rows))
    lines.append(f"{'peak':>24}" + "".join(f"{r['peak'] / GiB:>12.2f}" for r in rows))
    lines.append(f"{'peak during':>24}" + "".join(f"{r['peak_phase'].split()[0]:>12}" for r in rows))
    lines.append(f"{'fits':>24}" + "".join(f"{'yes' if r['fits'] else 'no':>12}" for r in rows))
    lines.append(f"{'host memory':>24}" + "".join(f"{r['host_bytes'] / GiB:>12.2f}" for r in rows))
    lines.append(f"{'longest context':>24}" + "".join(f"{_tokens(r['longest']):>12}" for r in rows))
    lines.append("settings: " + "; ".join(f"{r['setting']} = {r['label']}" for r in rows)
                 + ". Components are at the peak phase's context; attention is the same for S2 and full attention.")
    return "\n".join(lines), rows


def _tokens(n: int) -> str:
    return "none" if n == 0 else (f"{n // 1024}k" if n % 1024 == 0 else str(n))


def cmd_plan(model: str, context: int, gpu_memory: float = 80.0, batch: int = 1, quantization: str | None = None,
             dtype: str = "bf16", output: str | None = None) -> list[dict]:
    """Print the plan; a ValueError (one line, exit 2) when no setting fits or the GPU cannot hold the weights."""
    if context < 1 or batch < 1:
        raise ValueError(f"--context and --batch must be positive, got {context} and {batch}")
    if gpu_memory <= 0:
        raise ValueError(f"--gpu-memory must be positive (GiB), got {gpu_memory}")
    if quantization not in (None, "4bit"):
        raise ValueError(f"--quantization must be 4bit (or left out), got {quantization!r}")
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"--dtype must be bf16 or fp32, got {dtype!r}")
    shape, source = load_shape(model)
    fixed = predict(shape, 1, batch=batch, quantization=quantization, dtype=dtype)
    if fixed.fixed >= usable_bytes(gpu_memory):
        raise ValueError(
            f"{model}: the weights ({fixed.components['weights'] / GiB:.1f} GiB) and trainables + optimizer "
            f"({fixed.components['trainables + optimizer'] / GiB:.1f} GiB) alone exceed the {gpu_memory:g} GiB GPU "
            f"({usable_bytes(gpu_memory) / GiB:.1f} GiB usable); use --quantization 4bit, a bigger GPU, or shard the "
            "model over several GPUs (DeepSpeed ZeRO-3 / FSDP)")
    text, rows = format_plan(shape, context, gpu_memory, batch, quantization, dtype)
    print(f"(shape from {source})\n{text}", flush=True)
    if output:
        from .io import write_json

        write_json(output, dict(model=model, context=context, gpu_memory_gib=gpu_memory, batch=batch,
                                quantization=quantization, dtype=dtype, rows=rows))
    if not any(r["fits"] for r in rows):
        best = min(rows, key=lambda r: r["peak"])
        longest = max(r["longest"] for r in rows)
        raise ValueError(
            f"{model} at {context} tokens x batch {batch} needs {best['peak'] / GiB:.1f} GiB even with "
            f"{best['label']}, more than the {gpu_memory:g} GiB GPU's {usable_bytes(gpu_memory) / GiB:.1f} GiB usable; "
            f"the longest context that fits is {_tokens(longest)} tokens (or spread the sequence over GPUs: "
            "--sequence-parallel N)")
    return rows
