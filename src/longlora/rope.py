"""Position Interpolation (LongLoRA part 4): stretch a RoPE model's positions to a longer context.

The paper's recipe is linear PI with factor ceil(target / original): Llama-2 4096 -> 32768 is factor 8. Position p
is then rotated as the original model rotated p / 8, so every position of the long context falls inside the range
the model was pretrained on. Dynamic NTK, YaRN and Llama-3-style scaling are offered as alternatives.

Everything here edits a transformers 5 config, never a model: the result is written into `config.rope_parameters`
(the dict transformers' rotary embeddings read: rope_type, factor, rope_theta, ...). Apply it before the model is
built or loaded, e.g. `AutoModelForCausalLM.from_pretrained(path, config=apply_position_interpolation(config, n))`,
and `save_pretrained` then records the scaling in config.json, so every consumer of the checkpoint sees it.
The legacy `config.rope_scaling` attribute is never assigned: in transformers 5 that replaces the dict and drops
rope_theta. The legacy keys are added to a *saved* config.json instead (`legacy_rope_fields`), for the readers that
know only them: transformers 4.x reads `rope_scaling` and a top-level `rope_theta` and ignores `rope_parameters`, so
without them a merged model loads there with no interpolation and the default theta, silently.
"""

from __future__ import annotations

import copy
import math
from typing import Any

SCALINGS = ("linear", "dynamic", "yarn", "llama3", "none")
"""Position-interpolation methods: linear PI (the paper), dynamic NTK, YaRN, Llama-3.1 style, or no RoPE change."""

# Llama-3.1's values for the llama3 rope type: wavelengths shorter than original/4 are kept, longer than
# original/1 are divided by the factor, and the band between is blended.
LLAMA3_LOW_FREQ_FACTOR = 1.0
LLAMA3_HIGH_FREQ_FACTOR = 4.0

# The rope_parameters entry that position interpolation scales when they are given per layer type (Gemma-3).
_GLOBAL_LAYER_TYPE = "full_attention"

# Configs whose transformers validation accepts only 'default' and 'longrope' RoPE (and rewrites 'yarn' into
# 'longrope' on load). Linear PI is written for them as the equivalent LongRoPE: one factor f for every frequency,
# for short and long inputs alike, with no attention scaling, i.e. inv_freq / f exactly as linear PI.
_LONGROPE_ONLY_MODEL_TYPES = {"phi3", "phi4_multimodal"}


def _rope_entry(config) -> dict[str, Any]:
    """The rope-parameters dict position interpolation reads and writes (raises for a model without RoPE).

    Per-layer-type configs (Gemma-3: {"sliding_attention": ..., "full_attention": ...}) are scaled in their
    full-attention entry only: sliding-window layers never see a position difference beyond their window, so their
    local RoPE needs no stretch. transformers does the same with a legacy `rope_scaling`, and the long-context
    Gemma-3 checkpoints ship their linear factor on the full-attention entry alone.
    """
    params = getattr(config, "rope_parameters", None)
    if not params:
        raise ValueError(
            f"{type(config).__name__} (model_type {getattr(config, 'model_type', '?')!r}) has no rotary position "
            "embedding (no rope_parameters), so position interpolation does not apply; LongLoRA's context extension "
            "needs a RoPE model (Llama, Mistral, Qwen, Gemma, Phi-3, GPT-NeoX, ...)"
        )
    nested_keys = _nested_keys(config, params)
    if not nested_keys:
        return params
    if params.get(_GLOBAL_LAYER_TYPE) is None:
        raise ValueError(
            f"{type(config).__name__} gives RoPE parameters per layer type ({', '.join(nested_keys)}) but none for "
            f"{_GLOBAL_LAYER_TYPE!r} layers; do not know which entry to scale"
        )
    return params[_GLOBAL_LAYER_TYPE]


def _nested_keys(config, params: dict[str, Any]) -> list[str]:
    """The keys of `params` that are layer types (per-layer-type RoPE), [] for one shared entry.

    transformers >= 5.2x answers this itself (`nested_rope_parameter_keys`, which also knows configs whose entries
    are named otherwise); earlier 5.x releases decide the same way from `config.layer_types`, as here.
    """
    if hasattr(config, "nested_rope_parameter_keys"):
        return list(config.nested_rope_parameter_keys(params))
    layer_types = set(getattr(config, "layer_types", None) or ())
    return [key for key in params if key in layer_types and isinstance(params[key], dict)]


def _rope_type(params: dict[str, Any]) -> str:
    """The entry's rope_type, with the uniform LongRoPE that stands for linear PI on Phi-3 reported as 'linear'."""
    rope_type = params.get("rope_type", "default")
    if rope_type == "longrope":
        factors = list(params.get("short_factor") or []) + list(params.get("long_factor") or [])
        if factors and len(set(factors)) == 1 and params.get("attention_factor") == 1.0:
            return "linear"
    return rope_type


def _rotary_dim(config, params: dict[str, Any]) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim * params.get("partial_rotary_factor", 1.0))


def _max_positions(config) -> int:
    value = getattr(config, "max_position_embeddings", None)
    if not value:
        raise ValueError(f"{type(config).__name__} has no max_position_embeddings; cannot tell its trained context")
    return int(value)


def _as_number(value: float) -> int | float:
    """8.0 -> 8 (factors read back from JSON are floats); non-integral values stay floats."""
    return int(value) if float(value).is_integer() else float(value)


def original_context_length(config) -> int:
    """The context the model was trained with before any scaling this config already carries.

    That is the `original_max_position_embeddings` an existing YaRN / Llama-3 / LongRoPE scaling records, else
    `max_position_embeddings`. (Linear and dynamic scalings record no original length; for them
    `max_position_embeddings` is the answer: the context a linearly extended model was extended to, and the
    reference length of dynamic NTK, which transformers keeps at the pretraining context.)
    """
    params = _rope_entry(config)
    recorded = params.get("original_max_position_embeddings")
    if _rope_type(params) != "default" and recorded:
        return int(recorded)
    return _max_positions(config)


def _covered_context(config) -> tuple[int, int | float]:
    """(positions the config already handles, its current factor; 1 when unscaled).

    A factor-f scaling over an original context o covers f * o positions; a config may also declare a longer
    `max_position_embeddings` than that (Llama-3.1: factor 8 over 8k, declared 128k), and that declaration wins.
    Linear scaling records no o, so its covered context is `max_position_embeddings`, which is what
    `apply_position_interpolation` writes.
    """
    params = _rope_entry(config)
    rope_type = _rope_type(params)
    max_positions = _max_positions(config)
    if rope_type == "default":
        return max_positions, 1
    factor = _as_number(params.get("factor") or 1)
    if rope_type == "linear":
        return max_positions, factor
    return max(max_positions, int(math.ceil(factor * original_context_length(config)))), factor


def rope_factor_for(config, context_length: int) -> int | float:
    """The RoPE factor that `apply_position_interpolation(config, context_length)` writes.

    For an unscaled model: ceil(context_length / original_context_length(config)) (paper: Llama-2 4096 -> 32768
    is 8; 4096 -> 10000 is 3, never a fraction). For an already scaled model, its factor times
    ceil(context_length / covered), where covered is the context its scaling already handles (see
    `apply_position_interpolation`, "Composition").
    """
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length <= 0:
        raise ValueError(f"context_length must be a positive integer number of tokens, got {context_length!r}")
    covered, factor = _covered_context(config)
    if context_length < covered:
        raise ValueError(_below_message(config, context_length, covered, factor))
    return _as_number(factor * math.ceil(context_length / covered))


def _below_message(config, context_length: int, covered: int, factor: int | float) -> str:
    params = _rope_entry(config)
    scaled = "" if factor == 1 else f" with its {_rope_type(params)} x{factor} RoPE scaling"
    return (
        f"context_length={context_length} is below the {covered} positions this model already handles{scaled}; "
        "position interpolation only stretches RoPE to a longer context. To train or evaluate at "
        f"{context_length} tokens, keep the model's RoPE as it is (scaling='none', or leave the context length "
        f"unset), or pass a context_length of at least {covered}."
    )


def apply_position_interpolation(config, context_length: int, scaling: str = "linear", factor: float | None = None):
    """A copy of `config` whose RoPE is stretched to `context_length` positions (the input is not modified).

    scaling: 'linear' (the paper's PI: positions divided by the factor), 'dynamic' (dynamic NTK: the RoPE base
        grows with the sequence length beyond the original context), 'yarn', 'llama3' (Llama-3.1's
        frequency-dependent scaling, low/high frequency factors 1 and 4), or 'none' (RoPE untouched: plain
        extrapolation past the trained context; for ablations or training at a length the model already handles).
    factor: the stretch to apply instead of ceil(context_length / covered context), a number >= 1, e.g. Meta's 8
        for Llama-3 8k -> 128k with 'llama3', or 1.5 to take a 32k linear x8 model to 48k (linear x12). For an
        unscaled model it is the factor written; for an already scaled one it multiplies the existing factor
        (see "Composition").

    What is written into `config.rope_parameters` (rope_theta, partial_rotary_factor and any other key is kept):
    - linear / dynamic: rope_type, factor;
    - yarn: rope_type, factor, original_max_position_embeddings (the pretraining context);
    - llama3: rope_type, factor, original_max_position_embeddings, low_freq_factor, high_freq_factor.
    `max_position_embeddings` becomes `context_length` (never lowered), except for 'dynamic': transformers' dynamic
    NTK uses `max_position_embeddings` as the pretraining length its formula stretches from (no stretch below it),
    so it stays at the original context there. A top-level `original_max_position_embeddings` (Phi-style configs),
    which transformers copies over the rope entry's, is kept equal to the one written.

    Phi-3's transformers config accepts only LongRoPE: there linear PI is written as the equivalent LongRoPE (the
    same factor for every frequency, short and long inputs alike, attention_factor 1), and the other scalings are
    refused.

    Per-layer-type RoPE (Gemma-3): only the full-attention ("global") entry is scaled; the sliding-window entry is
    left alone (its layers never attend further than the window, which the original RoPE already covers).

    Composition, for a config that already carries a scaling: the model is taken to handle `covered` positions
    already, where covered = factor x original context for dynamic / yarn / llama3 (or the declared
    `max_position_embeddings`, if larger) and the declared `max_position_embeddings` for linear (which records no
    original length). Extending to `context_length` stretches positions a further ceil(context_length / covered)
    times on top of what the existing scaling does, so the factor is multiplied by that and the recorded original
    context is kept. For linear PI this is exact: a model extended 4k -> 8k by linear x2 and then to 32k gets
    linear x8, the same as extending the 4k original by 8 at once. A context_length equal to covered keeps
    the RoPE as it is. Linear configs written by tools that left `max_position_embeddings` at the pretraining
    length (the original LongLoRA releases: 4096 with factor 8) look as if they covered only that: set their
    `max_position_embeddings` to the extended context first, or pass `factor`.
    The scaling type of an already scaled model is not switched (its weights were tuned for that RoPE): extending
    a yarn model needs scaling='yarn', and so on.

    Raises ValueError for a model without RoPE (GPT-2, OPT, ...), an unknown scaling, a context_length below the
    context the model already handles (use scaling='none' there), a factor below 1, or a config with another
    existing scaling (e.g. Phi-3's longrope).
    """
    if scaling not in SCALINGS:
        raise ValueError(f"unknown RoPE scaling {scaling!r}; choose one of {', '.join(SCALINGS)}")
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length <= 0:
        raise ValueError(f"context_length must be a positive integer number of tokens, got {context_length!r}")
    config = copy.deepcopy(config)
    params = _rope_entry(config)
    max_positions = _max_positions(config)

    if scaling == "none":
        if factor is not None:
            raise ValueError("scaling='none' leaves RoPE unchanged; a factor has no meaning there (drop it)")
        config.max_position_embeddings = max(max_positions, context_length)
        return config

    existing = _rope_type(params)
    longrope_only = getattr(config, "model_type", None) in _LONGROPE_ONLY_MODEL_TYPES
    if longrope_only and scaling != "linear":
        raise ValueError(
            f"{type(config).__name__} accepts only LongRoPE-style scaling in transformers, so only scaling='linear' "
            f"(written as the equivalent uniform LongRoPE) or 'none' can be applied to it, not {scaling!r}"
        )
    if existing not in ("default", scaling):
        if existing in SCALINGS:
            advice = f"extend it with scaling={existing!r}"
        else:
            advice = "this project extends only unscaled, linear, dynamic, yarn and llama3 RoPE"
        raise ValueError(
            f"this model already uses {existing!r} RoPE scaling (factor {params.get('factor')}); its weights were "
            f"tuned for it, so it is not switched to {scaling!r}: {advice}, or keep its RoPE with scaling='none'"
        )

    covered, existing_factor = _covered_context(config)
    if context_length < covered:
        raise ValueError(_below_message(config, context_length, covered, existing_factor))
    if factor is None:
        factor = math.ceil(context_length / covered)
    elif isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1:
        raise ValueError(f"the RoPE factor must be a number >= 1, got {factor!r}")
    factor = _as_number(existing_factor * factor)
    if factor == 1:
        # Nothing to interpolate (context_length == the original context, or an explicit factor of 1); llama3 and
        # yarn would reject a factor of 1 anyway.
        config.max_position_embeddings = max(max_positions, context_length)
        return config

    original = original_context_length(config)
    if longrope_only:
        # Linear PI as LongRoPE (see _LONGROPE_ONLY_MODEL_TYPES): every frequency divided by the factor.
        params.update(
            rope_type="longrope",
            factor=float(factor),
            short_factor=[float(factor)] * (_rotary_dim(config, params) // 2),
            long_factor=[float(factor)] * (_rotary_dim(config, params) // 2),
            attention_factor=1.0,
            original_max_position_embeddings=original,
        )
        config.original_max_position_embeddings = original  # transformers copies this over the entry's value
        config.max_position_embeddings = max(max_positions, context_length)
        config.validate_rope()
        return config

    params["rope_type"] = scaling
    params["factor"] = float(factor)  # transformers 4.x (and 5 before 5.6) warn about an int factor
    if scaling in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = original
        if getattr(config, "original_max_position_embeddings", None) is not None:
            config.original_max_position_embeddings = original  # Phi-3: transformers prefers this copy
    if scaling == "llama3":
        params.setdefault("low_freq_factor", LLAMA3_LOW_FREQ_FACTOR)
        params.setdefault("high_freq_factor", LLAMA3_HIGH_FREQ_FACTOR)
    if scaling != "dynamic":
        config.max_position_embeddings = max(max_positions, context_length)
    # transformers' own check of the keys each rope_type needs; our bug if it fails, so let it raise.
    config.validate_rope()
    return config


# Keys of a rope-parameters entry that transformers 4.x reads from the top level of config.json, not from
# `rope_scaling` (whose validation would flag them as unknown).
_TOP_LEVEL_ROPE_KEYS = ("rope_theta", "partial_rotary_factor")
# Scalings transformers 4.x and 5.x both read from a legacy `rope_scaling` dict with the same fields.
_LEGACY_SCALINGS = ("linear", "dynamic", "yarn", "llama3")


def legacy_rope_fields(values: dict[str, Any]) -> dict[str, Any]:
    """The legacy RoPE keys that go next to `rope_parameters` in a saved config.json (the dict `values`), so that
    readers of either form load the same RoPE. Returns {key: value}; a value of None means "remove this key".

    - one rope entry (Llama, Mistral, Qwen, ...): `rope_theta` (and `partial_rotary_factor`) at the top level, and for
      a linear / dynamic / yarn / llama3 scaling `rope_scaling` = the entry without those, with both `type` and
      `rope_type` (older readers know only `type`). yarn and llama3 carry `original_max_position_embeddings` (and
      llama3 its low/high frequency factors) in the entry already; dynamic NTK's reference length is
      `max_position_embeddings` in transformers 4 and 5 alike, which `apply_position_interpolation` leaves there.
    - per layer type (Gemma-3): transformers 4.x reads `rope_theta` (global layers), `rope_local_base_freq` (sliding
      layers) and a `rope_scaling` that applies to the global layers only, which is the full-attention entry.
    - GPT-NeoX: transformers 4.x names theta and the rotary fraction `rotary_emb_base` and `rotary_pct`.
    - Phi-3's LongRoPE (our linear PI there) has no legacy form with the same meaning (transformers 4 accepts
      exactly type/short_factor/long_factor and then derives an attention factor), so nothing is added for it.

    transformers 5 prefers `rope_scaling` over `rope_parameters` when both are present, so the two must agree; that
    is why this is computed from `rope_parameters` every time a config.json is written, never kept from before.
    """
    params = values.get("rope_parameters")
    if not isinstance(params, dict) or not params:
        return {}
    if values.get("model_type") in _LONGROPE_ONLY_MODEL_TYPES:
        return {}
    fields: dict[str, Any] = {}
    if isinstance(params.get(_GLOBAL_LAYER_TYPE), dict):  # per layer type (Gemma-3)
        entry = params[_GLOBAL_LAYER_TYPE]
        local = params.get("sliding_attention")
        if isinstance(local, dict) and "rope_theta" in local:
            fields["rope_local_base_freq"] = local["rope_theta"]
    elif any(isinstance(value, dict) for value in params.values()):
        return {}  # per-layer-type RoPE of another shape: no legacy form known
    else:
        entry = params
    for key in _TOP_LEVEL_ROPE_KEYS:
        if key in entry:
            fields[key] = entry[key]
    if values.get("model_type") == "gpt_neox":
        fields["rotary_emb_base"] = entry.get("rope_theta")
        fields["rotary_pct"] = entry.get("partial_rotary_factor", 1.0)
    rope_type = entry.get("rope_type", entry.get("type", "default"))
    if rope_type in _LEGACY_SCALINGS:
        scaling = {key: value for key, value in entry.items() if key not in _TOP_LEVEL_ROPE_KEYS}
        scaling["rope_type"] = scaling["type"] = rope_type
        fields["rope_scaling"] = scaling
    else:
        fields["rope_scaling"] = None  # unscaled (or a type without a legacy form): no stale scaling may remain
    return fields
