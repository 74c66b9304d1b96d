"""Memory of a long training step: a loss without an (L, V) tensor, the MLP in tiles, checkpoints in host memory.

At long context, attention is not what fills a GPU (S2-Attn makes it 4x cheaper): with gradient checkpointing, a
step holds the input of every decoder layer (L x hidden per layer), one layer's recomputed activations, and the loss.
The loss is the big one: transformers' causal-LM heads compute the (L, V) logits, upcast them to float32, take a
log-softmax and keep them all for backward, ~16 bytes per token per vocabulary entry (2 MiB per token with
Llama-3's 128,256 entries; 48 GiB at 32k tokens). Three settings bound the rest:

- `tiled_loss` (default on): the loss of training forwards with labels is computed over chunks of tokens, hidden
  states -> lm_head -> cross-entropy, each chunk under activation checkpointing (recomputed in backward, one chunk
  at a time), so at most one chunk of logits (`LOSS_CHUNK_BYTES` of float32 logits) exists. The chunks call the
  model's own lm_head module and the same loss arithmetic as transformers' `ForCausalLMLoss` (labels shifted, -100
  ignored, the Trainer's `num_items_in_batch` normalisation), so the loss and every gradient are today's to float
  rounding, and module hooks (DeepSpeed ZeRO-3, FSDP) see an ordinary lm_head call.
- `tiled_mlp` (auto | true | false): the MLP of each decoder layer runs over tiles of tokens, each tile under
  activation checkpointing, so one tile's intermediate activations (3 x tokens x intermediate) exist instead of the
  sequence's. It costs one more MLP forward per layer in backward; `auto` tiles forwards of at least
  `TILED_MLP_AUTO_TOKENS` tokens (benchmarks/memory.py measured where it pays).
- `offload_checkpoints` (default off; `longlora.offload`): the input each checkpointed decoder layer keeps for its
  recompute is copied to (pinned) host memory in the forward and brought back for the recompute; on CUDA both copies
  run on a side stream, and the recompute of layer i prefetches layer i-1's input while layer i is recomputed.

`apply_memory_plan(model, ...)` installs them on a model (per-instance hooks; no class is patched) for the Trainer or
one's own loop; `longlora train` calls it with the run's options. Eval-mode forwards and forwards without labels
are untouched.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .adapters import base_model, route_forward_through_hooks
from .offload import (
    HostOffloader, available_host_memory, check_host_memory, checkpointed_layers, install_offload, offload_host_bytes,
)

LOSS_CHUNK_BYTES = 64 * 2**20
"""Float32 logits of one loss chunk (the chunk's working set, logits + log-softmax + their gradients, is ~4x)."""
MLP_TILE_BYTES = 128 * 2**20
"""One MLP tile's intermediate tensor (tile tokens x intermediate size x the activation dtype's bytes)."""
TILED_MLP_AUTO_TOKENS = 16384
"""`tiled_mlp="auto"` tiles the MLP of forwards with at least this many tokens (batch x length)."""
TILED_MLP_CHOICES = ("auto", True, False)
IGNORE_INDEX = -100

_PLAN_ATTRIBUTE = "_longlora_memory_plan"


@dataclass
class MemoryPlan:
    """The memory settings installed on a model (stored on the transformers model as `_longlora_memory_plan`)."""

    tiled_loss: bool = True
    """Compute training losses over chunks of tokens (no (L, V) logits tensor)."""
    tiled_mlp: str | bool = "auto"
    """Run each MLP over tiles of tokens: True, False, or "auto" (from TILED_MLP_AUTO_TOKENS tokens)."""
    offload_checkpoints: bool = False
    """Keep checkpointed layer inputs in host memory between forward and recompute."""
    lean_norms: bool = True
    """Llama-style RMSNorms keep only their input and 1/rms for backward (`_LeanRMSNorm`), not float32 copies."""
    loss_chunk_tokens: int | None = None
    """Tokens per loss chunk; None: as many as LOSS_CHUNK_BYTES of float32 logits hold (a multiple of 8)."""
    mlp_tile_tokens: int | None = None
    """Tokens per MLP tile; None: as many as MLP_TILE_BYTES of intermediate activations hold."""
    _handles: list = field(default_factory=list, repr=False)
    _offloader: "HostOffloader | None" = field(default=None, repr=False)

    def __post_init__(self):
        self.tiled_mlp = normalize_tiled_mlp(self.tiled_mlp)
        for name in ("loss_chunk_tokens", "mlp_tile_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")

    def tiles_mlp(self, tokens: int) -> bool:
        """Whether a forward of `tokens` tokens runs its MLPs in tiles."""
        return self.tiled_mlp is True or (self.tiled_mlp == "auto" and tokens >= TILED_MLP_AUTO_TOKENS)


def normalize_tiled_mlp(value) -> str | bool:
    """"auto", True or False from the option's spellings (auto | true | false, on/off, yes/no, 1/0)."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered == "auto":
            return "auto"
        if lowered in ("true", "on", "yes", "1"):
            return True
        if lowered in ("false", "off", "no", "0"):
            return False
    elif isinstance(value, bool):
        return value
    raise ValueError(f"tiled_mlp must be auto, true or false; got {value!r}")


def memory_plan_of(model) -> MemoryPlan | None:
    """The plan `apply_memory_plan` installed on `model` (also through a PEFT wrapper), or None."""
    return getattr(base_model(model), _PLAN_ATTRIBUTE, None)


def apply_memory_plan(model, tiled_loss: bool = True, tiled_mlp: str | bool = "auto",
                      offload_checkpoints: bool = False, *, lean_norms: bool = True,
                      loss_chunk_tokens: int | None = None, mlp_tile_tokens: int | None = None):
    """Install the memory settings on `model` (a transformers causal LM, or a PEFT model of one); returns it.

    Calling it again replaces the previous settings; `remove_memory_plan` takes them all off. The settings act on
    training-mode forwards only: `tiled_loss` on those given `labels` (their output's `logits` then hold the last
    position only; the loss is the same), `tiled_mlp` and `offload_checkpoints` on those with gradients enabled
    (`offload_checkpoints` acts on decoder layers that run under gradient checkpointing). `lean_norms` (exact, on
    by default) gives Llama-style RMSNorms a backward that keeps their input instead of its float32 copies.
    """
    plan = MemoryPlan(tiled_loss=bool(tiled_loss), tiled_mlp=tiled_mlp, offload_checkpoints=bool(offload_checkpoints),
                      lean_norms=bool(lean_norms), loss_chunk_tokens=loss_chunk_tokens,
                      mlp_tile_tokens=mlp_tile_tokens)
    remove_memory_plan(model)
    base = base_model(route_forward_through_hooks(model))
    if plan.tiled_loss:
        plan._handles += _install_tiled_loss(base, plan)
    if plan.tiled_mlp is not False:
        mlps = mlp_modules(base)
        if not mlps and plan.tiled_mlp is True:
            raise ValueError(f"tiled_mlp: {type(base).__name__} has no MLP module (a module named 'mlp' whose class "
                             "ends in 'MLP') to tile; set tiled_mlp false")
        plan._handles += [_tile_mlp(mlp, plan) for mlp in mlps]
    if plan.lean_norms:
        plan._handles += [_lean_norm(norm) for norm in lean_norm_modules(base)]
    if plan.offload_checkpoints:
        layers = checkpointed_layers(base)
        if not layers:
            raise ValueError(f"offload_checkpoints: {type(base).__name__} has no decoder layers that transformers' "
                             "gradient checkpointing runs; set offload_checkpoints false")
        plan._offloader = HostOffloader()
        plan._handles.append(_Undo(install_offload(base, layers, plan._offloader)))
    setattr(base, _PLAN_ATTRIBUTE, plan)
    return model


def remove_memory_plan(model):
    """Take the settings `apply_memory_plan` installed off `model`; returns it."""
    base = base_model(model)
    plan = getattr(base, _PLAN_ATTRIBUTE, None)
    if plan is not None:
        for undo in reversed(plan._handles):
            undo.remove()
        delattr(base, _PLAN_ATTRIBUTE)
    return model


# --------------------------------------------------------------------------------------------------------------------
# The loss over chunks of tokens


def loss_chunk_tokens(vocab_size: int, chunk_bytes: int = LOSS_CHUNK_BYTES) -> int:
    """Tokens per loss chunk: as many as `chunk_bytes` of float32 logits hold, a multiple of 8 (at least 8)."""
    return max(8, chunk_bytes // (4 * vocab_size) // 8 * 8)


def chunked_causal_lm_loss(hidden: torch.Tensor, head: nn.Module, shift_labels: torch.Tensor, *,
                           softcap: float | None = None, chunk_tokens: int | None = None) -> torch.Tensor:
    """Sum over tokens of cross-entropy(head(hidden), shift_labels), labels of -100 ignored, float32.

    hidden (..., H) and shift_labels (...) (the label each position predicts, already shifted). The tokens are cut
    into chunks of `chunk_tokens` (default: `loss_chunk_tokens(V)`); each chunk's logits -> loss runs under
    activation checkpointing, so in forward and in backward one chunk's logits exist at a time. Gradients reach
    `hidden` and the head's trainable parameters through autograd as usual. softcap: Gemma-2's final logit soft
    capping (logits = cap * tanh(logits / cap)).
    """
    flat = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    labels = shift_labels.reshape(-1).to(flat.device)  # (N,)
    if labels.numel() != flat.shape[0]:
        raise ValueError(f"labels give {labels.numel()} tokens, hidden states {flat.shape[0]}")
    vocab = _out_features(head)
    chunk = chunk_tokens or loss_chunk_tokens(vocab)

    def chunk_loss(h, y):  # (c, H), (c,) -> scalar
        logits = head(h)  # (c, V): the model's lm_head, under the caller's autocast
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX, reduction="sum")

    grad = torch.is_grad_enabled() and (flat.requires_grad or any(p.requires_grad for p in head.parameters()))
    losses = []
    for start in range(0, flat.shape[0], chunk):
        h, y = flat[start:start + chunk], labels[start:start + chunk]
        if grad:
            losses.append(checkpoint(chunk_loss, h, y, use_reentrant=False, preserve_rng_state=False))
        else:
            losses.append(chunk_loss(h, y))
    return torch.stack(losses).sum() if losses else flat.new_zeros((), dtype=torch.float32)


def causal_lm_loss(total: torch.Tensor, shift_labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """transformers' normalisation of a summed token loss: / num_items_in_batch when given (the Trainer's count over
    an optimizer step's micro-batches), else / the batch's scored tokens (the mean; NaN when there are none)."""
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / (shift_labels != IGNORE_INDEX).sum().to(total.device)


def _out_features(head: nn.Module) -> int:
    weight = getattr(head, "weight", None)
    if weight is None:  # a PEFT ModulesToSaveWrapper (a trained, tied lm_head) or a LoRA layer: the wrapped one
        inner = getattr(head, "base_layer", None) or getattr(head, "original_module", None)
        return _out_features(inner) if inner is not None else 0
    return weight.shape[0]


@dataclass
class _LossCall:
    labels: torch.Tensor | None
    shift_labels: torch.Tensor | None
    num_items: object
    hidden: torch.Tensor | None = None


def _install_tiled_loss(base, plan: MemoryPlan) -> list:
    """Hooks on the causal LM: a training forward with labels runs with logits_to_keep=1 and no labels, the decoder's
    final hidden states are caught on the way, and the chunked loss is put into the output."""
    import inspect

    head = base.get_output_embeddings()
    decoder = getattr(base, getattr(base, "base_model_prefix", ""), None)
    if head is None or not isinstance(decoder, nn.Module) or decoder is base:
        raise ValueError(f"tiled_loss: {type(base).__name__} is not a causal LM with an lm_head over a decoder; set "
                         "tiled_loss false")
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        raise ValueError(f"tiled_loss: {type(base).__name__}.forward has no logits_to_keep argument (the full logits "
                         "would still be computed); set tiled_loss false")
    softcap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
    calls: list[_LossCall] = []  # a stack: forwards may nest

    def before(module, args, kwargs):
        if not module.training or kwargs.get("labels") is None or kwargs.get("logits_to_keep"):
            calls.append(None)
            return None
        kwargs = dict(kwargs)
        calls.append(_LossCall(kwargs.pop("labels"), kwargs.pop("shift_labels", None),
                               kwargs.pop("num_items_in_batch", None)))
        kwargs["logits_to_keep"] = 1  # the model computes the last position's logits only
        return args, kwargs

    def caught(module, args, output):
        call = calls[-1] if calls else None
        if call is not None and call.hidden is None:
            call.hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state  # (B, L, H)

    def after(module, args, kwargs, output):
        call = calls.pop() if calls else None
        if call is None or output is None:  # (None: the forward raised; its exception goes on)
            return None
        if call.hidden is None:
            raise RuntimeError(f"tiled_loss: the decoder of {type(module).__name__} returned no hidden states; set "
                               "tiled_loss false")
        labels = call.shift_labels
        if labels is None:  # transformers' shift: token t predicts label t+1, the last position predicts nothing
            labels = F.pad(call.labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        logits = output[0] if isinstance(output, tuple) else output.logits  # (B, 1, V)
        _check_head(module, head, call.hidden, logits, softcap)
        total = chunked_causal_lm_loss(call.hidden, head, labels, softcap=softcap, chunk_tokens=plan.loss_chunk_tokens)
        loss = causal_lm_loss(total, labels.to(total.device), call.num_items)
        if isinstance(output, tuple):
            return (loss,) + output
        return type(output)(loss=loss, **{k: v for k, v in output.items() if k != "loss"})

    return [base.register_forward_pre_hook(before, with_kwargs=True),
            decoder.register_forward_hook(caught),
            base.register_forward_hook(after, with_kwargs=True, always_call=True)]


def _check_head(model, head, hidden, logits, softcap) -> None:
    """The model's own last-position logits must be head(hidden) (with the soft cap): else the model does something
    to its logits that the chunked loss would not (a scale, a bias of its own), and the loss would be wrong."""
    with torch.no_grad():
        mine = head(hidden[:, -1:])  # (B, 1, V)
        if softcap:
            mine = torch.tanh(mine / softcap) * softcap
    if mine.shape != logits.shape or not torch.allclose(mine.float(), logits.float(), rtol=1e-3, atol=1e-3):
        raise RuntimeError(f"tiled_loss: {type(model).__name__} computes its logits otherwise than lm_head(hidden "
                           "states); the chunked loss does not apply to it: set tiled_loss false")


# --------------------------------------------------------------------------------------------------------------------
# The MLP over tiles of tokens


def mlp_modules(model) -> list[nn.Module]:
    """The per-token MLP of each decoder layer: modules named `mlp` whose class name ends in 'MLP' (LlamaMLP,
    Qwen3MLP, GPTNeoXMLP, Phi3MLP, ...; mixture-of-experts blocks are named and built otherwise)."""
    return [m for name, m in base_model(model).named_modules()
            if name.rsplit(".", 1)[-1] == "mlp" and type(m).__name__.endswith("MLP")]


def mlp_tile_tokens(intermediate_size: int, itemsize: int, tile_bytes: int = MLP_TILE_BYTES) -> int:
    """Tokens per MLP tile: the largest power of two (>= 256) whose intermediate tensor fits in `tile_bytes`."""
    fits = max(1, tile_bytes // max(1, intermediate_size * itemsize))
    return max(256, 1 << (fits.bit_length() - 1))


class _Undo:
    def __init__(self, fn):
        self.remove = fn


def _override_forward(module: nn.Module, forward) -> _Undo:
    """Give this instance `forward` (a function of (self, ...)); the _Undo puts back what it had before (the class's
    forward, or a wrapper an earlier tool set on the instance)."""
    had_own, before = "forward" in module.__dict__, module.forward
    module.forward = types.MethodType(forward, module)

    def undo():
        if had_own:
            module.forward = before
        else:
            del module.forward

    return _Undo(undo)


def _tile_mlp(mlp: nn.Module, plan: MemoryPlan) -> _Undo:
    """Give this MLP instance a forward that runs the original over tiles of tokens (each under checkpointing)."""
    original = mlp.forward  # bound: the class's forward, or a wrapper an earlier tool put on the instance
    intermediate = max((getattr(m, "out_features", 0) for m in mlp.modules() if isinstance(m, nn.Linear)), default=1)
    keep_rng = any(isinstance(m, nn.Dropout) and m.p > 0 for m in mlp.modules())

    def tiled_forward(self, x, *args, **kwargs):
        tokens = x.numel() // x.shape[-1]
        if args or kwargs or not (self.training and torch.is_grad_enabled() and plan.tiles_mlp(tokens)):
            return original(x, *args, **kwargs)
        tile = plan.mlp_tile_tokens or mlp_tile_tokens(intermediate, _activation_itemsize(x))
        if tokens <= tile:
            return original(x)
        flat = x.reshape(-1, x.shape[-1])  # (N, H): the MLP is per token
        outs = [checkpoint(original, flat[s:s + tile], use_reentrant=False, preserve_rng_state=keep_rng)
                for s in range(0, tokens, tile)]
        return torch.cat(outs).reshape(*x.shape[:-1], -1)

    return _override_forward(mlp, tiled_forward)


def _activation_itemsize(x: torch.Tensor) -> int:
    """Bytes per value of the MLP's activations: autocast's dtype when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type).itemsize
    return x.element_size()


# --------------------------------------------------------------------------------------------------------------------
# RMSNorms that keep their input, not float32 copies of it


_LEAN_NORM_OK: dict[type, bool] = {}  # norm class -> its forward is Llama's (checked once per class)


def lean_norm_modules(model) -> list[nn.Module]:
    """RMSNorms computing Llama's `weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)` (Llama, Mistral,
    Qwen2/3, Phi-3, ...: checked numerically against the class's own forward, once per class)."""
    found = []
    for m in base_model(model).modules():
        if not (type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), torch.Tensor)
                and isinstance(getattr(m, "variance_epsilon", None), float) and m.weight.dim() == 1):
            continue
        if type(m) not in _LEAN_NORM_OK:
            _LEAN_NORM_OK[type(m)] = _same_as_llama_norm(m)
        if _LEAN_NORM_OK[type(m)]:
            found.append(m)
    return found


def _same_as_llama_norm(norm: nn.Module) -> bool:
    """Whether the class's forward computes Llama's RMSNorm, on a probe instance with a weight of its own (the
    norm's may be a ZeRO-3 shard, empty outside its forward)."""
    size = int(getattr(norm.weight, "ds_shape", norm.weight.shape)[0])
    dtype = norm.weight.dtype
    x = torch.randn(3, size, generator=torch.Generator().manual_seed(0)).to(dtype)
    probe = type(norm).__new__(type(norm))
    nn.Module.__init__(probe)
    probe.variance_epsilon = norm.variance_epsilon
    probe.weight = nn.Parameter(torch.linspace(0.5, 1.5, size).to(dtype), requires_grad=False)
    with torch.no_grad():
        try:
            theirs = type(norm).forward(probe, x)
        except Exception:  # noqa: BLE001 - a norm with another signature is simply not made lean
            return False
        mine = _LeanRMSNorm.apply(x, probe.weight, norm.variance_epsilon)
    return theirs.shape == mine.shape and theirs.dtype == mine.dtype and torch.allclose(theirs, mine, atol=1e-6)


def _lean_norm(norm: nn.Module) -> _Undo:
    original = norm.forward

    def lean_forward(self, x, *args, **kwargs):
        if args or kwargs or not (self.training and torch.is_grad_enabled()):
            return original(x, *args, **kwargs)
        return _LeanRMSNorm.apply(x, self.weight, self.variance_epsilon)

    return _override_forward(norm, lean_forward)


NORM_ROWS = 1024
"""Tokens per block of rows in `_LeanRMSNorm` (its float32 temporaries are a few such blocks)."""


class _LeanRMSNorm(torch.autograd.Function):
    """Llama's RMSNorm, `weight * (x32 * r).to(x.dtype)` with x32 = x.float(), r = rsqrt(mean(x32^2) + eps), whose
    backward keeps x and r (one float per token) where autograd keeps x32, x32 * r and its cast (10 bytes per value
    in bf16). Both passes run over blocks of rows, so their float32 temporaries
    are a few blocks (NORM_ROWS tokens each), not a few copies of the whole (N, H) input."""

    @staticmethod
    def forward(ctx, x, weight, eps):  # x (..., H), weight (H,)
        flat = x.reshape(-1, x.shape[-1])  # (N, H)
        rows = NORM_ROWS
        r = torch.empty(flat.shape[0], 1, dtype=torch.float32, device=x.device)
        out = None
        for start in range(0, flat.shape[0], rows):
            x32 = flat[start:start + rows].float()
            r[start:start + rows] = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
            y = weight * (x32 * r[start:start + rows]).to(x.dtype)
            if out is None:
                out = y.new_empty(flat.shape[0], flat.shape[1])
            out[start:start + rows] = y
        ctx.save_for_backward(x, weight, r)
        ctx.rows = rows
        return out.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        x, weight, r = ctx.saved_tensors
        flat, grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, x.shape[-1])
        need_x, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.empty_like(flat) if need_x else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for start in range(0, flat.shape[0], ctx.rows):
            end = start + ctx.rows
            n = flat[start:end].float() * r[start:end]  # the normalised input, recomputed
            g = grad[start:end]
            if need_weight:
                grad_weight += (g * n.to(x.dtype)).sum(0, dtype=torch.float32)
            if need_x:
                gn = (g * weight).to(x.dtype).float()  # the gradient reaching the float32 normalised input
                grad_x[start:end] = r[start:end] * (gn - n * (gn * n).mean(-1, keepdim=True))
        grad_x = grad_x.reshape(x.shape) if need_x else None
        return grad_x, (grad_weight.to(weight.dtype) if need_weight else None), None


__all__ = [
    "LOSS_CHUNK_BYTES", "MLP_TILE_BYTES", "TILED_MLP_AUTO_TOKENS", "MemoryPlan", "apply_memory_plan",
    "available_host_memory", "causal_lm_loss", "check_host_memory", "checkpointed_layers", "chunked_causal_lm_loss",
    "loss_chunk_tokens", "memory_plan_of", "mlp_modules", "mlp_tile_tokens", "normalize_tiled_mlp",
    "offload_host_bytes", "remove_memory_plan",
]
