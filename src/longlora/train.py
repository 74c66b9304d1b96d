"""One Trainer setup shared by `longlora train` (context extension) and `longlora sft` (long instruction tuning).

The data path reads top to bottom: options -> checks (before any heavy work) -> base config + position interpolation
-> tokenizer -> data -> model -> LoRA+ -> S2-Attn -> Trainer -> atomic checkpoints -> final adapter.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import TrainConfig, save_config

logger = logging.getLogger(__name__)

RUN_CONFIG = "longlora_config.yaml"
"""The resolved options, saved in the output directory and in every checkpoint."""
SUMMARY = "train_summary.json"
COMPLETE = ".longlora_complete"
"""Marker written last into a checkpoint; resume ignores checkpoints without it."""


@dataclass
class TrainResult:
    output_dir: Path
    summary: dict[str, Any]


# --------------------------------------------------------------------------------------------------------------------
# Checks that run before anything heavy
# --------------------------------------------------------------------------------------------------------------------


def _model_source(config: TrainConfig) -> tuple[str, dict[str, str]]:
    """(model directory or hub id, {"gguf_file": ...} when loading a GGUF checkpoint)."""
    from .modeling import _check_model_source, _gguf_source

    _check_model_source(config.model)
    model, gguf = _gguf_source(config.model, config.gguf_file)
    return model, ({"gguf_file": gguf} if gguf else {})


def check_paths(config: TrainConfig) -> None:
    """A missing model, a non-resumable non-empty output_dir, QLoRA without CUDA: errors up front.

    (A missing or empty corpus is reported by the data step, which also runs before the model loads.)
    """
    _model_source(config)
    out = Path(config.output_dir)
    if out.exists() and any(out.iterdir()) and not config.resume and not config.overwrite_output_dir:
        raise ValueError(
            f"output_dir {out} is not empty. Pass --resume auto to continue its run, "
            "--overwrite-output-dir true to reuse it, or choose another --output-dir."
        )
    if config.quantization == "4bit":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("quantization 4bit (QLoRA, bitsandbytes) needs a CUDA GPU; none is available here")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise ValueError("quantization 4bit needs bitsandbytes: pip install 'longlora[qlora]'") from err


def _load_base_config(config: TrainConfig):
    """The base model's config with position interpolation applied (raises early for non-RoPE / too-short targets)."""
    from transformers import AutoConfig

    from .rope import apply_position_interpolation, original_context_length

    model_path, gguf = _model_source(config)
    base = AutoConfig.from_pretrained(model_path, **gguf)
    original = original_context_length(base)
    if config.context_length < original:
        raise ValueError(
            f"context_length {config.context_length} is below the model's original context ({original}); "
            "LongLoRA extends context: choose a context_length >= the original."
        )
    if config.rope_scaling == "none":
        scaled = apply_position_interpolation(base, config.context_length, scaling="none")
    else:
        scaled = apply_position_interpolation(base, config.context_length, scaling=config.rope_scaling,
                                              factor=config.rope_factor)
    return scaled, original


# --------------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------------


def _use_bf16(config: TrainConfig) -> bool:
    import torch

    if config.bf16 is not None:
        return config.bf16
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def load_training_model(config: TrainConfig, model_config):
    """Base weights under the interpolated config, made trainable (LoRA+ / LoRA / full) and switched to S2."""
    import torch
    from transformers import AutoModelForCausalLM

    from .adapters import apply_lora_plus, format_trainable_counts, trainable_parameter_counts
    from .integration import check_s2_support, enable_s2_attention
    from .modeling import resolve_dtype

    model_path, gguf = _model_source(config)
    kwargs: dict[str, Any] = dict(config=model_config, attn_implementation="sdpa", **gguf)
    if config.quantization == "4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
    kwargs["dtype"] = resolve_dtype(config.dtype) if config.dtype != "auto" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if config.attention != "full":
        check_s2_support(model)  # a clear error before the adapters and data work
    model.config.use_cache = False  # training: no KV cache (and transformers' packing detection needs none)
    if config.quantization == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    model = apply_lora_plus(
        model, finetune=config.finetune, rank=config.lora_rank, alpha=config.lora_alpha,
        dropout=config.lora_dropout, targets=config.lora_targets, trainable=tuple(config.trainable),
    )
    if config.gradient_checkpointing and config.finetune == "lora":
        # the frozen embedding gives no grad-requiring input to checkpointed layers otherwise
        model.enable_input_require_grads()
    if config.attention != "full":
        enable_s2_attention(model, group_size=config.s2_group_size(), group_size_ratio=config.group_size_ratio,
                            shift=config.attention == "s2")
    logger.info(format_trainable_counts(trainable_parameter_counts(model)))
    print(format_trainable_counts(trainable_parameter_counts(model)), flush=True)
    return model


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


def load_tokenizer(config: TrainConfig):
    from transformers import AutoTokenizer

    model_path, gguf = _model_source(config)
    tokenizer = AutoTokenizer.from_pretrained(model_path, **gguf)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_pretraining_data(config: TrainConfig, tokenizer):
    """Corpus -> EOS-joined blocks of context_length tokens (the paper's recipe)."""
    from .data import load_documents, tokenize_and_block

    documents = load_documents(config.data, text_field=config.text_field, split=config.split,
                               dataset_config=config.dataset_config, streaming=config.streaming)
    blocks = tokenize_and_block(documents, tokenizer, config.context_length, packing=config.packing,
                                num_proc=config.num_proc)
    if config.max_blocks is not None:
        blocks = blocks.take(config.max_blocks) if config.streaming else blocks.select(
            range(min(config.max_blocks, len(blocks))))
    if not config.streaming:
        print(f"data: {len(blocks)} blocks of {config.context_length} tokens", flush=True)
    return blocks, None  # default collator stacks input_ids / labels / position_ids


# --------------------------------------------------------------------------------------------------------------------
# Trainer with atomic checkpoints that are complete adapters
# --------------------------------------------------------------------------------------------------------------------


def _write_run_files(directory: str | Path, model, tokenizer, config: TrainConfig) -> None:
    """What makes a checkpoint (or the final output) self-contained: tokenizer, interpolated config, options."""
    from .modeling import finalize_saved_files, model_config

    tokenizer.save_pretrained(directory)
    if config.finetune != "full":
        # the base config *with* position interpolation: merge and eval read the trained context from it
        model_config(model).save_pretrained(directory)
    finalize_saved_files(directory)  # legacy RoPE keys for transformers 4.x readers, no junk tokenizer keys
    save_config(config, Path(directory) / RUN_CONFIG)


def _make_trainer_class():
    from transformers import Trainer
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class LongLoRATrainer(Trainer):
        """Trainer whose checkpoints are written into a staging directory and renamed when complete."""

        def __init__(self, *args, run_config: TrainConfig, run_tokenizer, **kwargs):
            super().__init__(*args, **kwargs)
            self._run_config = run_config
            self._run_tokenizer = run_tokenizer
            self._staging: str | None = None

        def _get_output_dir(self, trial):
            return self._staging or super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial):
            run_dir = super()._get_output_dir(trial)
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            self._staging = os.path.join(run_dir, ".staging")
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging = None
            staged = os.path.join(run_dir, ".staging", name)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                _write_run_files(staged, self.model, self._run_tokenizer, self._run_config)
                Path(staged, COMPLETE).write_text(f"{time.time()}\n")
                final = os.path.join(run_dir, name)
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.replace(staged, final)  # the checkpoint appears whole or not at all
                shutil.rmtree(os.path.join(run_dir, ".staging"), ignore_errors=True)
                from transformers.trainer_utils import rotate_checkpoints

                rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
            self.accelerator.wait_for_everyone()

    return LongLoRATrainer


def latest_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest checkpoint-N directory holding the completion marker (interrupted ones are skipped)."""
    out = Path(output_dir)
    if not out.is_dir():
        return None
    done = [p for p in out.glob("checkpoint-*") if p.is_dir() and (p / COMPLETE).exists()
            and p.name.split("-")[-1].isdigit()]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


def _resume_from(config: TrainConfig) -> str | None:
    if not config.resume:
        return None
    if config.resume == "auto":
        found = latest_complete_checkpoint(config.output_dir)
        if found is None:
            print(f"resume auto: no complete checkpoint in {config.output_dir}; starting from scratch", flush=True)
        return found
    if not (Path(config.resume) / COMPLETE).exists() and not Path(config.resume, "trainer_state.json").exists():
        raise ValueError(f"resume: {config.resume!r} is not a complete checkpoint directory")
    return config.resume


def training_arguments(config: TrainConfig):
    from transformers import TrainingArguments

    import torch

    extra = dict(config.training_args)
    extra.setdefault("report_to", "none")
    # without use_cpu, accelerate does not treat a CPU torchrun launch as distributed: every rank would train alone
    extra.setdefault("use_cpu", not torch.cuda.is_available())
    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing; 5.0 only knows the old name
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    extra[f"{prefix}_checkpointing"] = config.gradient_checkpointing
    extra[f"{prefix}_checkpointing_kwargs"] = {"use_reentrant": False}
    return TrainingArguments(
        output_dir=config.output_dir,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        bf16=_use_bf16(config),
        seed=config.seed,
        data_seed=config.seed,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        logging_steps=config.logging_steps,
        remove_unused_columns=False,
        **extra,
    )


def run_training(config: TrainConfig, build_data: Callable | None = None, callbacks: list | None = None) -> TrainResult:
    """The whole run. `build_data(config, tokenizer) -> (train_dataset, collator)` differs between train and sft;
    `callbacks` are extra transformers TrainerCallbacks."""
    from transformers import set_seed

    from .adapters import trainable_parameter_counts
    from .io import write_json

    build_data = build_data or build_pretraining_data
    check_paths(config)
    model_config, original = _load_base_config(config)
    tokenizer = load_tokenizer(config)
    resume = _resume_from(config)
    args = training_arguments(config)
    # empty / too-short corpora fail here, before the model loads; rank 0 tokenises, the others read its cache
    with args.main_process_first(desc="building the training data"):
        dataset, collator = build_data(config, tokenizer)
    factor = (model_config.rope_parameters or {}).get("factor") if isinstance(model_config.rope_parameters,
                                                                              dict) else None
    print(f"context: {original} -> {config.context_length} tokens (rope {config.rope_scaling}, factor {factor}); "
          f"attention {config.attention}, group size {config.group_size()} in training", flush=True)

    set_seed(config.seed)
    model = load_training_model(config, model_config)
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    save_config(config, Path(config.output_dir) / RUN_CONFIG)
    trainer_cls = _make_trainer_class()
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, data_collator=collator,
                          callbacks=callbacks, run_config=config, run_tokenizer=tokenizer)
    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    elapsed = time.time() - started

    save_final(trainer, tokenizer, config)
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    summary = dict(
        model=config.model, context_length=config.context_length, original_context=original, rope_factor=factor,
        attention=config.attention, group_size=config.group_size(), finetune=config.finetune,
        steps=trainer.state.global_step, train_loss=result.training_loss, seconds=elapsed,
        first_loss=losses[0][1] if losses else None, last_loss=losses[-1][1] if losses else None,
        losses=losses, trainable=trainable_parameter_counts(model),
    )
    if trainer.args.should_save:  # the main process writes; the others only train
        write_json(Path(config.output_dir) / SUMMARY, summary)
        if losses:
            _plot_losses(losses, Path(config.output_dir) / "loss.png", title=f"{config.attention} / {config.finetune}")
    print(f"done: {trainer.state.global_step} steps in {elapsed:.0f}s, loss {summary['first_loss']} -> "
          f"{summary['last_loss']}; adapter in {config.output_dir}", flush=True)
    return TrainResult(output_dir=Path(config.output_dir), summary=summary)


def save_final(trainer, tokenizer, config: TrainConfig) -> None:
    """The final adapter (or full model) + tokenizer + config, staged then moved into output_dir file by file."""
    out = Path(config.output_dir)
    staging = out / ".final.staging"
    shutil.rmtree(staging, ignore_errors=True)
    trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        _write_run_files(staging, trainer.model, tokenizer, config)
        for item in sorted(staging.iterdir()):
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        staging.rmdir()


def _plot_losses(losses, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_path

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in losses], [v for _, v in losses])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def cmd_train(args: list[str] | None = None, **overrides) -> TrainResult:
    """`longlora train [CONFIG.yaml] [--key value ...]`."""
    from .config import load_config

    return run_training(load_config(TrainConfig, args, **overrides))
