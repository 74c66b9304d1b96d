"""Run options as dataclasses, read from YAML and `--key value` overrides, saved next to every output.

Keys are the dataclass field names (a dash may stand for an underscore). Keys that are not ours but are fields of
`transformers.TrainingArguments` (report_to, deepspeed, fsdp, ...) pass through to it; anything else is an error
that lists the known options.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ATTENTIONS = ("s2", "full", "short")
FINETUNES = ("lora_plus", "lora", "full")
ROPE_SCALINGS = ("linear", "dynamic", "yarn", "llama3", "none")
QUANTIZATIONS = (None, "4bit")


@dataclass
class TrainConfig:
    """Options of `longlora train` (defaults: the paper's recipe, docs/method.md)."""

    PACKINGS: typing.ClassVar[tuple[str, ...]] = ("concat", "documents")

    model: str = ""
    """Base model: a local directory, a hub id or a .gguf file."""
    data: str = ""
    """Corpus: a text file, a directory of text files, JSONL/Parquet with a text field, or a HF dataset name."""
    output_dir: str = "runs/longlora"
    """Where checkpoints and the final adapter go."""
    context_length: int = 8192
    """Target context: training block length and the position-interpolated range."""
    attention: str = "s2"
    """s2 (shifted sparse attention) | full (ordinary causal attention) | short (groups without shift)."""
    group_size_ratio: float = 0.25
    """S2 group size as a fraction of the sequence length (paper: 1/4)."""
    rope_scaling: str = "linear"
    """Position interpolation kind: linear (the paper's) | dynamic | yarn | llama3 | none."""
    rope_factor: float | None = None
    """RoPE scaling factor; default ceil(context_length / the model's original context)."""
    finetune: str = "lora_plus"
    """lora_plus (LoRA + trainable embeddings and norms) | lora (attention LoRA only) | full (every weight)."""
    lora_rank: int = 8
    """LoRA rank r."""
    lora_alpha: int = 16
    """LoRA alpha."""
    lora_dropout: float = 0.0
    """LoRA dropout."""
    lora_targets: list[str] | None = None
    """Module names LoRA wraps; default: the attention projections of the architecture."""
    trainable: list[str] = field(default_factory=lambda: ["embed", "norm"])
    """Extra fully-trained modules with lora_plus: embed, norm."""
    learning_rate: float = 2e-5
    """Peak learning rate (paper: 2e-5; 1e-5 for 70B)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    lr_scheduler_type: str = "constant_with_warmup"
    """Any transformers scheduler name."""
    max_steps: int = 1000
    """Optimiser steps."""
    per_device_train_batch_size: int = 1
    """Blocks per device per micro-batch."""
    gradient_accumulation_steps: int = 8
    """Micro-batches per optimiser step."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward (needed for long contexts)."""
    bf16: bool | None = None
    """bfloat16 mixed precision; default: on where the hardware supports it."""
    seed: int = 42
    """Seed of initialisation, data order and dropout."""
    save_steps: int = 100
    """Checkpoint every N steps."""
    save_total_limit: int | None = None
    """Keep at most N checkpoints."""
    logging_steps: int = 1
    """Log the loss every N steps."""
    resume: str | None = None
    """'auto' resumes from the latest complete checkpoint in output_dir; or a checkpoint directory."""
    packing: str = "concat"
    """concat (documents joined with EOS, the paper's) | documents (position_ids keep document boundaries)."""
    text_field: str = "text"
    """Field holding the text in JSONL/Parquet/HF datasets."""
    split: str = "train"
    """Dataset split."""
    dataset_config: str | None = None
    """HF dataset configuration name."""
    streaming: bool = False
    """Stream the corpus instead of tokenising it all first (for corpora larger than memory)."""
    num_proc: int | None = None
    """Tokenisation processes (default: automatic)."""
    max_blocks: int | None = None
    """Use at most this many blocks (for quick experiments)."""
    quantization: str | None = None
    """4bit: QLoRA, the frozen projections in NF4 (bitsandbytes >= 0.49: CUDA or CPU); merge dequantizes them."""
    gguf_file: str | None = None
    """A GGUF file inside `model` to load (dequantised)."""
    dtype: str = "auto"
    """Weights dtype when loading: auto (the run's compute dtype: bf16 / fp16 runs, else float32) | float32 |
    bfloat16 | float16."""
    overwrite_output_dir: bool = False
    """Allow writing into a non-empty output_dir that holds no resumable run."""
    sequence_parallel: int = 1
    """Ranks sharing one sequence (each holds context_length/N tokens; only S2's halo is exchanged); 1 = off."""
    tiled_loss: bool = True
    """Compute the training loss over chunks of tokens: no (length x vocabulary) logits tensor (longlora.memory)."""
    tiled_mlp: str | bool = "auto"
    """Run each MLP over tiles of tokens: auto (from longlora.memory.TILED_MLP_AUTO_TOKENS tokens) | true | false."""
    offload_checkpoints: bool = False
    """Keep each checkpointed layer input in host memory until its recompute (needs gradient_checkpointing)."""
    training_args: dict[str, Any] = field(default_factory=dict)
    """Other transformers.TrainingArguments fields, passed through (report_to, deepspeed, fsdp, ...)."""

    def __post_init__(self):
        _coerce_fields(self)
        if not self.model:
            raise ValueError("model is required: a local model directory, a hub id or a .gguf file (--model ...)")
        if not self.data:
            raise ValueError("data is required: a text file, a directory, JSONL/Parquet or a dataset name (--data ...)")
        check_choice("attention", self.attention, ATTENTIONS)
        check_choice("finetune", self.finetune, FINETUNES)
        check_choice("rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        check_choice("quantization", self.quantization, QUANTIZATIONS)
        check_choice("packing", self.packing, self.PACKINGS)
        if self.context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {self.context_length}")
        if not 0 < self.group_size_ratio <= 1:
            raise ValueError(f"group_size_ratio must be in (0, 1], got {self.group_size_ratio} (paper: 0.25)")
        if self.rope_factor is not None and self.rope_factor < 1:
            raise ValueError(f"rope_factor must be >= 1, got {self.rope_factor}")
        for name in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "save_steps",
                     "lora_rank", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sequence_parallel < 1:
            raise ValueError(f"sequence_parallel must be >= 1, got {self.sequence_parallel}")
        if self.sequence_parallel > 1:  # chunks must line up with S2 groups: an early error naming the valid N
            if self.attention == "full":
                raise ValueError("sequence_parallel > 1 shards S2-Attn; use attention s2 or short")
            from .sequence_parallel import check_sequence_parallel

            check_sequence_parallel(self.context_length, self.group_size(), self.sequence_parallel)
        from .memory import normalize_tiled_mlp

        self.tiled_mlp = normalize_tiled_mlp(self.tiled_mlp)
        if self.offload_checkpoints and not self.gradient_checkpointing:
            raise ValueError("offload_checkpoints moves the inputs that gradient checkpointing keeps: set "
                             "gradient_checkpointing true, or offload_checkpoints false")
        if self.finetune == "full" and self.quantization:
            raise ValueError("quantization (QLoRA) needs a LoRA finetune; use finetune lora_plus or lora")

    def group_size(self) -> int:
        """The S2 group size used for training blocks: ratio x context_length, even."""
        from .attention import group_size_from_ratio

        return group_size_from_ratio(self.context_length, self.group_size_ratio)

    def s2_group_size(self) -> int | None:
        """Group size handed to S2: None = ratio x each batch's length (the paper's pre-training behaviour)."""
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_choice(name, value, choices):
    """A ValueError naming the option and its allowed values unless `value` is one of `choices`."""
    if value not in choices:
        shown = ", ".join(str(c) for c in choices)
        raise ValueError(f"{name} must be one of {shown}; got {value!r}")


# --------------------------------------------------------------------------------------------------------------------
# Reading options: YAML file + command-line overrides
# --------------------------------------------------------------------------------------------------------------------


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Turn a YAML/CLI value into the field's type (strings from the command line, lists from commas)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(value, args[0], name)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return [_coerce(v, typing.get_args(tp)[0], name) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
        if not math.isfinite(as_float) or as_float != int(as_float):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if tp is str:
        return str(value)
    return value


def _coerce_fields(obj) -> None:
    for name, tp in _field_types(type(obj)).items():
        setattr(obj, name, _coerce(getattr(obj, name), tp, name))


def training_argument_names() -> set[str]:
    """The fields of the installed transformers' TrainingArguments (they pass through `longlora train`/`sft`)."""
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


def parse_overrides(args: list[str]) -> tuple[str | None, dict[str, Any]]:
    """`[CONFIG.yaml] --key value --flag --key=value ...` -> (yaml path or None, {key: raw value})."""
    config_path = None
    if args and not args[0].startswith("-"):
        config_path, args = args[0], args[1:]
    values: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: options are --key value (or a YAML file first)")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
            i += 2
        else:  # a bare flag: --gradient-checkpointing, --no-gradient-checkpointing
            value = not key.startswith("no-")
            key = key[3:] if key.startswith("no-") else key
            i += 1
        values[key.replace("-", "_")] = value
    return config_path, values


RUN_CONFIG = "longlora_config.yaml"
"""The resolved options, saved in the output directory and in every checkpoint."""


def load_config(cls, args: list[str] | None = None, **overrides):
    """Build `cls` from an optional YAML file, `--key value` arguments and keyword overrides (in that order)."""
    import yaml

    config_path, cli_values = parse_overrides(list(args or []))
    values: dict[str, Any] = {}
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ValueError(f"config file {config_path!r} not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"{config_path} is not valid YAML{where}: {problem}; fix the file (option: value "
                             "per line)") from None
        except UnicodeDecodeError:
            raise ValueError(f"{config_path} is not a text (UTF-8) file; pass a YAML config") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_path}: expected a mapping of option: value")
        values.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
    values.update(cli_values)
    values.update({k: v for k, v in overrides.items()})
    ours = {f.name for f in dataclasses.fields(cls)}
    passthrough = dict(values.pop("training_args", None) or {})
    unknown = []
    hf_names = None
    for key in list(values):
        if key in ours:
            continue
        hf_names = hf_names if hf_names is not None else training_argument_names()
        if key in hf_names:
            passthrough[key] = values.pop(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"unknown option(s): {', '.join(sorted(unknown))}. Options: {', '.join(sorted(ours - {'training_args'}))}"
            " (and any transformers.TrainingArguments field)"
        )
    return cls(**values, training_args=passthrough)


def save_config(config, path: str | os.PathLike) -> None:
    """Write the resolved options as YAML (atomically)."""
    import yaml

    from .io import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
