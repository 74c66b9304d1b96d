"""S2-Attn inside transformers, through its attention interface (no monkey-patching of model classes).

`import longlora` registers the attention implementation "s2_sdpa" in `AttentionInterface` and, under the same name,
SDPA's own mask builder in `AttentionMaskInterface` (a name missing there silently gets attention_mask=None). The name
contains "sdpa" so transformers applies SDPA's dispatch checks to it.

In training mode (`module.training`) the attention is S2; in eval mode it *is* transformers' SDPA function, called
with the same arguments, so evaluation and generation (KV cache included) are untouched.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from .adapters import base_model, route_forward_through_hooks
from .attention import BACKENDS, group_size_from_ratio, s2_attention, token_layout

S2_ATTENTION = "s2_sdpa"


@dataclass
class S2Settings:
    """How a model's attention layers run S2 in training mode (stored on each attention module)."""

    group_size: int | None = None
    """Tokens per group; None = group_size_ratio x the current sequence length (the paper's behaviour)."""
    group_size_ratio: float = 0.25
    """Group size as a fraction of the sequence length when group_size is None (paper: 1/4)."""
    shift: bool = True
    """Shift half of the heads by group_size/2; False gives the paper's no-shift ablation ("short" attention)."""
    backend: str = "auto"
    """auto | sdpa | cpu | varlen | flash: see longlora.attention (auto: the fastest correct path on the device)."""
    in_eval: bool = False
    """Also use S2 in eval mode (the paper's "test w/o full attention" column); no KV cache then, so no generation."""

    def __post_init__(self):
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2
            or self.group_size % 2
        ):
            raise ValueError(f"group_size must be an even integer >= 2 or None; got {self.group_size!r}")
        if not 0 < self.group_size_ratio <= 1:
            raise ValueError(f"group_size_ratio must be in (0, 1]; got {self.group_size_ratio!r} (paper: 0.25)")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {self.backend!r}")

    def group_size_for(self, length: int) -> int:
        if self.group_size is not None:
            return self.group_size
        return group_size_from_ratio(length, self.group_size_ratio)


_DEFAULT_SETTINGS = S2Settings()

# Config attributes that change the attention scores in a way S2's SDPA path cannot reproduce.
_UNSUPPORTED_FEATURES = {
    "attn_logit_softcapping": "attention logit soft-capping",
}


# True while an S2 model runs a forward in which its attention layers use S2 (set by a forward pre-hook, reset with
# its token by a forward hook that runs even when the forward raises).
_S2_FORWARD = contextvars.ContextVar("longlora_s2_forward", default=False)
# Whether the caller of that forward passed position_ids (else the model numbers tokens 0..L-1 itself).
_POSITIONS_GIVEN = contextvars.ContextVar("longlora_positions_given", default=True)
_LAYOUTS = "_longlora_layouts"  # attribute of a forward's mask (or position_ids) tensor: the layouts read off it
_COMPACT = "_longlora_compact_layout"  # attribute marking s2_mask's (B, 1, 1, 2L) masks


def s2_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
            mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None, local_size=None,
            allow_is_causal_skip: bool = True, use_vmap: bool = False, device="cpu", **kwargs):
    """AttentionMaskInterface entry for "s2_sdpa": SDPA's mask, except in a forward whose layers run S2.

    S2 reads only two facts per token: is it real (the mask's diagonal) and does it see the token before it (the
    sub-diagonal; a real token that does not starts a packed document). In an S2 forward this evaluates
    transformers' mask function (padding, packing, sliding window, all index-based) at those 2L points per row and
    returns them as a (B, 1, 1, 2L) bool tensor instead of the (B, 1, L, L) mask, which with padding or packing
    costs B*L^2 bytes (4 GiB per row at 64k). None when every token is real and sees its predecessor.
    """
    args = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, local_size=local_size,
                allow_is_causal_skip=allow_is_causal_skip, use_vmap=use_vmap, device=device, **kwargs)
    if (not _S2_FORWARD.get() or use_vmap or q_offset or kv_offset or q_length != kv_length
            or (attention_mask is not None and tuple(attention_mask.shape) != (batch_size, kv_length))):
        return sdpa_mask(**args)
    b = torch.arange(batch_size, device=device)[:, None]
    head = torch.zeros(1, 1, dtype=torch.long, device=device)
    t = torch.arange(q_length, device=device)[None, :]
    prev = (t - 1).clamp(min=0)
    try:  # index-based mask functions broadcast over aligned (B, L) indices just as over (B, 1, L, L) ones
        diag = torch.as_tensor(mask_function(b, head, t, t), device=device).expand(batch_size, q_length)
        sees_prev = torch.as_tensor(mask_function(b, head, t, prev), device=device).expand(batch_size, q_length)
    except Exception:  # a mask function that is not index-based: build the full mask
        return sdpa_mask(**args)
    if attention_mask is not None:
        real = attention_mask.to(device=device, dtype=torch.bool)
        diag = diag & real
        sees_prev = sees_prev & real[:, prev[0]]
    if bool(diag.all()) and bool(sees_prev[:, 1:].all()):
        return None  # no padding, no packing: S2's regular layout (and SDPA's is_causal)
    compact = torch.cat([diag, sees_prev], dim=1)[:, None, None, :]
    setattr(compact, _COMPACT, lambda: sdpa_mask(**args))  # the full mask, should an eval-mode layer need it
    return compact


def _full_mask(mask):
    """The (B, 1, L, L) mask SDPA expects, from s2_mask's compact form if that is what came."""
    return getattr(mask, _COMPACT)() if hasattr(mask, _COMPACT) else mask


def _layout_from_mask(mask: torch.Tensor | None, position_ids: torch.Tensor | None, batch: int, length: int,
                      device: torch.device):
    """Real tokens and document starts, read off the mask transformers built (diagonal and sub-diagonal only)."""
    if mask is None:
        return token_layout(batch, length, device, position_ids=position_ids)
    if hasattr(mask, _COMPACT):  # s2_mask's (B, 1, 1, 2L): diagonal, then sub-diagonal (its first entry unused)
        real, sees_prev = mask[:, 0, 0, :length], mask[:, 0, 0, length + 1:]
    else:
        if mask.shape[-1] != length or mask.shape[-2] != length:
            raise ValueError(
                f"S2-Attn trains on whole sequences without a KV cache, but got a {tuple(mask.shape)} mask for "
                f"{length} queries. Train with use_cache=False, or call model.eval() for generation."
            )
        allowed = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] > torch.finfo(mask.dtype).min / 2
        allowed = allowed.expand(batch, length, length)  # (B, L, L)
        real = allowed.diagonal(dim1=1, dim2=2)  # (B, L): a token sees itself iff it is real
        sees_prev = allowed.diagonal(offset=-1, dim1=1, dim2=2)  # (B, L-1): token t sees t-1
    boundaries = torch.zeros_like(real)
    # a real token right after a real token it cannot see starts a new packed document
    boundaries[:, 1:] = real[:, 1:] & real[:, :-1] & ~sees_prev
    return token_layout(batch, length, device, attention_mask=real, position_ids=position_ids,
                        doc_boundaries=boundaries)


def _forward_layout(mask: torch.Tensor | None, position_ids: torch.Tensor | None, batch: int, length: int,
                    device: torch.device):
    """The layout of this forward's tokens, built once for every layer of the forward.

    Kept on the tensor it is read from (the mask, else position_ids), so it lives exactly as long as the forward's
    inputs, and the gradient-checkpoint recompute in backward (same tensors, no forward hook active) finds it too.
    In an S2 forward the mask came from s2_mask, which returns None when no token is padding and none starts a
    packed document that transformers detected; it does not look for packing when a KV cache is passed, so
    position_ids given by the caller are read once per forward (one host-device sync). Without them (the model
    numbers the tokens itself) the layout is the regular one, known without reading any tensor: no sync.
    """
    holder = mask if mask is not None else position_ids
    if holder is None:  # no mask and no positions: the regular layout, a few aranges
        return _layout_from_mask(None, None, batch, length, device)
    # inference tensors (torch.inference_mode, e.g. an in_eval S2 evaluation) have no version counter to key on:
    # their layout is built per layer, in a dict that lives for this call only
    cached = not holder.is_inference()
    layouts = getattr(holder, _LAYOUTS, None) if cached else {}
    if layouts is None:
        layouts = {}
        setattr(holder, _LAYOUTS, layouts)
    # the tensor's version counter in every key: a tensor changed in place is read again
    version = holder._version if cached else 0
    regular = ("regular", version, batch, length, str(device))
    if mask is None and (regular in layouts or (_S2_FORWARD.get() and not _POSITIONS_GIVEN.get())):
        key, args = regular, (None, None)
    else:
        key, args = (mask is None, version, batch, length, str(device)), (mask, position_ids)
    if key not in layouts:
        layouts[key] = _layout_from_mask(*args, batch, length, device)
    return layouts[key]


def s2_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface entry: S2 in training mode, transformers' SDPA in eval mode.

    query (B, Hq, L, D), key/value (B, Hkv, L, D) -> ((B, L, Hq, D), None).
    """
    settings = getattr(module, "s2_settings", _DEFAULT_SETTINGS)
    if not (module.training or settings.in_eval):
        return sdpa_attention_forward(module, query, key, value, _full_mask(attention_mask), dropout=dropout,
                                      scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError(
            f"{type(module).__name__} uses attention logit soft-capping, which S2-Attn (SDPA-based) cannot apply. "
            "Train this architecture with attention='full'."
        )
    if not getattr(module, "is_causal", True):
        raise ValueError(f"S2-Attn is for causal decoders; {type(module).__name__} is not causal.")
    b, _, length, _ = query.shape
    if key.shape[2] != length:
        raise ValueError(
            f"S2-Attn runs on whole sequences without a KV cache, but got {length} queries for {key.shape[2]} keys. "
            "Call model.eval() with in_eval=False (the default) for generation, or train with use_cache=False."
        )
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and position_ids.shape[-1] != length:
        position_ids = None
    layout = _forward_layout(attention_mask, position_ids, b, length, query.device)
    out = s2_attention(
        query, key, value, settings.group_size_for(length),
        shift=settings.shift, scale=scaling, dropout=dropout, sliding_window=kwargs.get("sliding_window"),
        backend=settings.backend, layout=layout,
    )  # (B, Hq, L, D)
    return out.transpose(1, 2), None  # (B, L, Hq, D), as transformers expects


def register() -> None:
    """Register "s2_sdpa" with transformers (idempotent; done on `import longlora`)."""
    AttentionInterface.register(S2_ATTENTION, s2_attention_forward)
    AttentionMaskInterface.register(S2_ATTENTION, s2_mask)


def attention_modules(model) -> list[torch.nn.Module]:
    """The modules that call transformers' attention interface (LlamaAttention, GPTNeoXAttention, ...)."""
    return [m for m in base_model(model).modules()
            if type(m).__name__.endswith("Attention") and hasattr(m, "config") and hasattr(m, "layer_idx")]


def check_s2_support(model) -> None:
    """Raise a ValueError naming the architecture when S2-Attn cannot run on it."""
    base = base_model(model)
    config = base.config
    arch = type(base).__name__
    configs = [config] + [getattr(config, k) for k in ("text_config",) if getattr(config, k, None) is not None]
    for cfg in configs:
        for attr, what in _UNSUPPORTED_FEATURES.items():
            if getattr(cfg, attr, None) is not None:
                raise ValueError(
                    f"{arch} uses {what} ({attr}={getattr(cfg, attr)}), which S2-Attn cannot honour. "
                    "Train it with attention='full'."
                )
    if not getattr(base, "_supports_attention_backend", False) or not attention_modules(base):
        raise ValueError(
            f"{arch} does not route its attention through transformers' AttentionInterface, so S2-Attn cannot be "
            "switched on. Supported: RoPE decoders such as Llama, Mistral, Qwen2/3, Gemma, Gemma-3, Phi-3, GPT-NeoX."
        )


def enable_s2_attention(model, group_size: int | None = None, group_size_ratio: float = 0.25, *, shift: bool = True,
                        backend: str = "auto", in_eval: bool = False):
    """Switch a loaded model (or PEFT model) to S2-Attn for training; eval mode keeps full attention. Returns it.

    group_size=None uses group_size_ratio x the current sequence length (the paper's default 1/4); an int fixes it.
    in_eval=True applies S2 in eval mode too (to measure a model under its training attention; no generation).
    """
    settings = S2Settings(group_size=group_size, group_size_ratio=group_size_ratio, shift=shift, backend=backend,
                          in_eval=in_eval)
    register()
    base = set_attention(model, S2_ATTENTION, settings)
    _remove_forward_hooks(base)

    tokens = []  # the context variables' tokens of each forward in progress (a stack: forwards may nest)

    def entering(module, args, kwargs):  # tells s2_mask whether this forward's layers run S2
        given = kwargs.get("position_ids") is not None or len(args) > 2  # forward(input_ids, attention_mask, positions)
        tokens.append((_S2_FORWARD.set(module.training or settings.in_eval), _POSITIONS_GIVEN.set(given)))

    def leaving(module, args, output):  # always_call: also when the forward raised
        flag, given = tokens.pop()
        _POSITIONS_GIVEN.reset(given)
        _S2_FORWARD.reset(flag)

    base._longlora_hooks = (base.register_forward_pre_hook(entering, with_kwargs=True),
                            base.register_forward_hook(leaving, always_call=True))
    return model


def set_attention(model, implementation: str, settings: S2Settings):
    """Check the model supports S2, switch it to the registered attention `implementation` and give every attention
    layer `settings`; returns the transformers model (under a PEFT wrapper too)."""
    check_s2_support(model)
    base = base_model(route_forward_through_hooks(model))
    base.set_attn_implementation(implementation)
    for module in attention_modules(model):
        module.s2_settings = settings
    return base


def _remove_forward_hooks(base) -> None:
    for handle in getattr(base, "_longlora_hooks", ()):
        handle.remove()
    base._longlora_hooks = ()


def disable_s2_attention(model):
    """Restore transformers' SDPA attention. Returns the model."""
    base_model(model).set_attn_implementation("sdpa")
    _remove_forward_hooks(base_model(model))
    for module in attention_modules(model):
        if hasattr(module, "s2_settings"):
            del module.s2_settings
    return model


def s2_enabled(model) -> bool:
    return getattr(base_model(model).config, "_attn_implementation", None) == S2_ATTENTION


register()
