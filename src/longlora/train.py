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

from .checkpoints import (
    COMPLETE, SUMMARY, checkpoint_step, damaged_safetensors, final_files, kill_point, resume_from, summary_of,
    write_run_files,
)
from .config import RUN_CONFIG, TrainConfig, save_config
from .io import move_into, replace_directory

logger = logging.getLogger(__name__)

@dataclass
class TrainResult:
    output_dir: Path
    summary: dict[str, Any]


# --------------------------------------------------------------------------------------------------------------------
# Checks that run before anything heavy
# --------------------------------------------------------------------------------------------------------------------


def _model_source(config: TrainConfig) -> tuple[str, dict[str, str]]:
    """(model directory or hub id, {"gguf_file": ...} when loading a GGUF checkpoint)."""
    from .modeling import check_model_source, gguf_source

    check_model_source(config.model)
    model, gguf = gguf_source(config.model, config.gguf_file)
    return model, ({"gguf_file": gguf} if gguf else {})


def check_paths(config: TrainConfig) -> None:
    """A missing model, a non-resumable non-empty output_dir, QLoRA without a usable bitsandbytes: errors up front.

    (A missing or empty corpus is reported by the data step, which also runs before the model loads.)
    """
    model, _ = _model_source(config)
    damaged = damaged_safetensors([model]) if Path(model).is_dir() else None
    if damaged:
        raise ValueError(f"model weights {damaged}: re-create or re-download the model")
    out = Path(config.output_dir)
    if out.exists() and any(out.iterdir()) and not config.resume and not config.overwrite_output_dir:
        raise ValueError(
            f"output_dir {out} is not empty. Pass --resume auto to continue its run, "
            "--overwrite-output-dir true to reuse it, or choose another --output-dir."
        )
    if config.quantization == "4bit":
        from .quantization import check_bitsandbytes

        check_bitsandbytes(_training_device(config))


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
    if _flag(config.training_args.get("fp16")):
        return False  # fp16 mixed precision asked for (TrainingArguments takes one of the two)
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _flag(value) -> bool:
    """A passed-through TrainingArguments boolean, given in YAML (true) or on the command line ("true")."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1", "on")
    return bool(value)


def _training_device(config: TrainConfig) -> str:
    """Where the Trainer puts the model: CUDA when there is a GPU and use_cpu is not passed through, else CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() and not _flag(config.training_args.get("use_cpu")) else "cpu"


def compute_dtype(config: TrainConfig):
    """The run's compute dtype: bfloat16 for a bf16 run, float16 for `fp16: true` (passed to TrainingArguments),
    else float32 (the CPU default). The frozen weights are loaded in it (see `load_dtype`) and QLoRA's 4-bit layers
    compute in it."""
    import torch

    if _use_bf16(config):
        return torch.bfloat16
    if _flag(config.training_args.get("fp16")):
        return torch.float16
    return torch.float32


def load_dtype(config: TrainConfig):
    """The dtype the base weights load in: the `dtype` option when given; for `finetune: full` float32 (every
    weight is trained, and trained weights are kept in float32); else the run's compute dtype: a bf16 run's frozen
    base takes 2 bytes a weight, not 4, and its activations stay in bfloat16 (`keep_trainables_in_float32`)."""
    import torch

    from .modeling import resolve_dtype

    if config.dtype != "auto":
        return resolve_dtype(config.dtype)
    if config.finetune == "full":
        return torch.float32
    return compute_dtype(config)


def load_training_model(config: TrainConfig, model_config):
    """Base weights under the interpolated config, made trainable (LoRA+ / LoRA / full) and switched to S2.

    The frozen base is in `load_dtype(config)` (the run's compute dtype by default); under mixed precision the
    trained parameters (LoRA, embedding and norm copies) are float32 and the activations stay in the base's dtype
    (`keep_trainables_in_float32`). With quantization 4bit the attention and MLP projections are bitsandbytes NF4
    layers computing in the run's compute dtype, on CUDA or on the CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .adapters import (
        apply_lora_plus,
        format_trainable_counts,
        keep_trainables_in_float32,
        trainable_parameter_counts,
    )
    from .integration import check_s2_support, enable_s2_attention

    model_path, gguf = _model_source(config)
    weights_dtype, compute = load_dtype(config), compute_dtype(config)
    kwargs: dict[str, Any] = dict(config=model_config, attn_implementation="sdpa", dtype=weights_dtype, **gguf)
    if config.quantization == "4bit":
        from .quantization import qlora_quantization_config

        kwargs["quantization_config"] = qlora_quantization_config(compute)
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if config.quantization == "4bit":
        from .quantization import keep_4bit_layers_unpacked

        keep_4bit_layers_unpacked(model)
    if config.attention != "full":
        check_s2_support(model)  # a clear error before the adapters and data work
    model.config.use_cache = False  # training: no KV cache (and transformers' packing detection needs none)
    # (no peft.prepare_model_for_kbit_training for 4-bit: it casts every unquantized weight, frozen ones included, to
    # float32; the freezing it also does is get_peft_model's, and the Trainer enables gradient checkpointing)
    model = apply_lora_plus(
        model, finetune=config.finetune, rank=config.lora_rank, alpha=config.lora_alpha,
        dropout=config.lora_dropout, targets=config.lora_targets, trainable=tuple(config.trainable),
    )
    if config.finetune != "full" and compute != torch.float32:
        # mixed precision: float32 trainables, their outputs back in the frozen weights' dtype (the compute dtype
        # unless --dtype says otherwise)
        keep_trainables_in_float32(model, weights_dtype)
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


def _make_trainer_class():
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class LogAtCheckpoints(TrainerCallback):
        """Log the loss at every checkpoint and at the last step (besides every logging_steps): the loss of the
        steps before a checkpoint is then in its trainer_state.json, so a resumed run's log history (and the
        summary made from it) is the uninterrupted run's."""

        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save or state.global_step >= state.max_steps:
                control.should_log = True
            return control

    class LongLoRATrainer(Trainer):
        """Trainer whose checkpoints are written into a staging directory and renamed when complete."""

        def __init__(self, *args, run_config: TrainConfig, run_tokenizer, run_summary: Callable, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(LogAtCheckpoints)
            self._run_config = run_config
            self._run_tokenizer = run_tokenizer
            self._run_summary = run_summary  # TrainerState -> the summary of the run up to that state
            self._staging: str | None = None

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            kill_point(f"mid-step-{self.state.global_step + 1}")
            return loss

        def _get_output_dir(self, trial):
            return self._staging or super()._get_output_dir(trial)

        def _save_optimizer_and_scheduler(self, output_dir):
            super()._save_optimizer_and_scheduler(output_dir)
            kill_point(f"checkpoint-{self.state.global_step}-optimizer")

        def _save_checkpoint(self, model, trial):
            run_dir = super()._get_output_dir(trial)
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            staging = os.path.join(run_dir, ".staging")
            staged = os.path.join(staging, name)
            if self.args.should_save:
                shutil.rmtree(staged, ignore_errors=True)  # files of an attempt killed earlier
                os.makedirs(staged)
                kill_point(f"{name}-staging")
            self.accelerator.wait_for_everyone()
            self._staging = staging
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging = None
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                write_run_files(staged, self.model, self._run_tokenizer, self._run_config)
                from .io import write_json

                write_json(Path(staged, SUMMARY), self._run_summary(self.state))
                Path(staged, COMPLETE).write_text(f"{time.time()}\n")
                # the checkpoint appears whole or not at all; an older one of the same step (a resume that went
                # back) is moved into the staging folder and deleted with it
                replace_directory(staged, os.path.join(run_dir, name), aside=os.path.join(staging, f"{name}.old"))
                shutil.rmtree(staging, ignore_errors=True)
                from transformers.trainer_utils import rotate_checkpoints

                rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
            self.accelerator.wait_for_everyone()

    return LongLoRATrainer


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
    same_name = ("output_dir", "learning_rate", "weight_decay", "warmup_steps", "lr_scheduler_type", "max_steps",
                 "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "save_steps",
                 "save_total_limit", "logging_steps")  # TrainConfig fields passed on as they are
    return TrainingArguments(
        **{name: getattr(config, name) for name in same_name},
        bf16=_use_bf16(config),
        data_seed=config.seed,
        save_strategy="steps",
        remove_unused_columns=False,
        **extra,
    )


def _attach_deepspeed_comm(args) -> None:
    """DeepSpeed's communication layer over the process group accelerate made (a CPU launch: accelerate starts
    torch.distributed itself and leaves deepspeed.comm uninitialised, so ZeRO-3's from_pretrained sees 1 rank)."""
    import torch.distributed as dist

    if args.deepspeed and dist.is_available() and dist.is_initialized():
        import deepspeed.comm

        if not deepspeed.comm.is_initialized():
            deepspeed.comm.init_distributed(dist_backend=dist.get_backend())


def run_training(config: TrainConfig, build_data: Callable | None = None, callbacks: list | None = None) -> TrainResult:
    """The whole run. `build_data(config, tokenizer) -> (train_dataset, collator)` differs between train and sft;
    `callbacks` are extra transformers TrainerCallbacks."""
    from transformers import set_seed

    from .adapters import trainable_parameter_counts

    build_data = build_data or build_pretraining_data
    check_paths(config)
    resume = resume_from(config)
    if resume is not None:
        step = checkpoint_step(resume)
        if step > config.max_steps:
            raise ValueError(f"resume: {resume} is at step {step}, beyond max_steps {config.max_steps}; raise "
                             "--max-steps or choose another --output-dir")
        if step == config.max_steps:
            # the Trainer would take one more step from here: the finished checkpoint is the final output instead
            return _finish_from_checkpoint(config, Path(resume))
    model_config, original = _load_base_config(config)
    tokenizer = load_tokenizer(config)
    args = training_arguments(config)
    # empty / too-short corpora fail here, before the model loads; rank 0 tokenises, the others read its cache
    with args.main_process_first(desc="building the training data"):
        dataset, collator = build_data(config, tokenizer)
    factor = (model_config.rope_parameters or {}).get("factor") if isinstance(model_config.rope_parameters,
                                                                              dict) else None
    print(f"context: {original} -> {config.context_length} tokens (rope {config.rope_scaling}, factor {factor}); "
          f"attention {config.attention}, group size {config.group_size()} in training", flush=True)

    if config.offload_checkpoints:  # before the model loads: the host must hold every layer's checkpoint
        from .memory import check_host_memory

        tokens = config.per_device_train_batch_size * config.context_length // config.sequence_parallel
        check_host_memory(model_config, tokens, itemsize=2 if args.bf16 or args.fp16 else 4)

    set_seed(config.seed)
    _attach_deepspeed_comm(args)
    model = load_training_model(config, model_config)
    from .memory import apply_memory_plan

    apply_memory_plan(model, tiled_loss=config.tiled_loss, tiled_mlp=config.tiled_mlp,
                      offload_checkpoints=config.offload_checkpoints)
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    save_config(config, Path(config.output_dir) / RUN_CONFIG)
    trainable = trainable_parameter_counts(model)
    # seconds: the training time behind the result, summed over the runs a resumed run is made of
    seconds_before = (summary_of(resume).get("seconds") or 0.0) if resume else 0.0
    started = time.time()

    def run_summary(state) -> dict[str, Any]:
        return _summary(config, original, factor, trainable, state, seconds_before + time.time() - started)

    trainer_cls = _make_trainer_class()
    if config.sequence_parallel > 1:  # groups of N ranks share a sequence, each rank holding one chunk
        from .sequence_parallel import setup_sequence_parallel

        trainer_cls = setup_sequence_parallel(model, trainer_cls, config.sequence_parallel, config.s2_group_size(),
                                              config.group_size_ratio, shift=config.attention == "s2")
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, data_collator=collator,
                          callbacks=callbacks, run_config=config, run_tokenizer=tokenizer, run_summary=run_summary)
    trainer.train(resume_from_checkpoint=resume)
    save_final(trainer, tokenizer, config)
    summary = run_summary(trainer.state)
    if trainer.args.should_save:  # the main process writes; the others only train
        _write_summary(config, summary)
    _print_done(config, summary)
    return TrainResult(output_dir=Path(config.output_dir), summary=summary)


def _summary(config: TrainConfig, original, factor, trainable, state, seconds: float | None) -> dict[str, Any]:
    """The run up to `state`: built from the Trainer's log history, which a resumed run carries over from its
    checkpoint, so that it describes every step and not only those of the last resume."""
    losses = [(h["step"], h["loss"]) for h in state.log_history if "loss" in h]
    # each logged loss is the mean over the steps since the previous log (the Trainer's own train_loss likewise)
    total, previous = 0.0, 0
    for step, loss in losses:
        total += loss * (step - previous)
        previous = step
    return dict(
        model=config.model, context_length=config.context_length, original_context=original, rope_factor=factor,
        attention=config.attention, group_size=config.group_size(), finetune=config.finetune,
        steps=state.global_step, train_loss=total / previous if previous else None, seconds=seconds,
        first_loss=losses[0][1] if losses else None, last_loss=losses[-1][1] if losses else None,
        losses=losses, trainable=trainable,
    )


def _write_summary(config: TrainConfig, summary: dict[str, Any]) -> None:
    """train_summary.json (+ loss.png), written last: its presence marks a complete final output."""
    from .io import write_json

    out = Path(config.output_dir)
    if summary["losses"]:
        from .plots import plot_losses

        plot_losses(summary["losses"], out / "loss.png", title=f"{config.attention} / {config.finetune}")
    write_json(out / SUMMARY, summary)


def _print_done(config: TrainConfig, summary: dict[str, Any]) -> None:
    print(f"done: {summary['steps']} steps in {summary['seconds'] or 0:.0f}s, loss {summary['first_loss']} -> "
          f"{summary['last_loss']}; adapter in {config.output_dir}", flush=True)


def _finish_from_checkpoint(config: TrainConfig, checkpoint: Path) -> TrainResult:
    """A resume from a checkpoint at max_steps: nothing to train. The final output is that checkpoint's weights,
    tokenizer and configs (the same bytes the uninterrupted run saved); already there, nothing is written."""
    out = Path(config.output_dir)
    step = checkpoint_step(checkpoint)
    summary = summary_of(checkpoint)
    done = summary_of(out)
    if done.get("steps") == step and all(
            (out / f.name).exists() and (f.is_dir() or (out / f.name).stat().st_size == f.stat().st_size)
            for f in final_files(checkpoint) if f.name != RUN_CONFIG):
        print(f"already complete: {out} holds the final output of step {step} (max_steps {config.max_steps}); "
              "nothing to do. Raise --max-steps to train further.", flush=True)
        return TrainResult(output_dir=out, summary=done)
    print(f"resume: {checkpoint.name} is the last step ({step} = max_steps); saving it as the final output "
          "without training", flush=True)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, the main process writes
        (out / SUMMARY).unlink(missing_ok=True)
        staging = out / ".final.staging"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for f in final_files(checkpoint):
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, staging / f.name)
        save_config(config, staging / RUN_CONFIG)  # this run's options, as a trained run's final output has
        move_into(staging, out, after_first=lambda: kill_point("final-save"))
        if not summary:  # a checkpoint from an older version: the trainer state still has the losses
            from transformers import TrainerState

            state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
            summary = _summary(config, None, None, None, state, None)
        _write_summary(config, summary)
    _print_done(config, summary)
    return TrainResult(output_dir=out, summary=summary)


def save_final(trainer, tokenizer, config: TrainConfig) -> None:
    """The final adapter (or full model) + tokenizer + config, staged then moved into output_dir file by file."""
    out = Path(config.output_dir)
    staging = out / ".final.staging"
    if trainer.args.should_save:
        (out / SUMMARY).unlink(missing_ok=True)  # a summary marks a complete final output: written again after
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        write_run_files(staging, trainer.model, tokenizer, config)
        move_into(staging, out, after_first=lambda: kill_point("final-save"))


def cmd_train(args: list[str] | None = None, **overrides) -> TrainResult:
    """`longlora train [CONFIG.yaml] [--key value ...]`."""
    from .config import load_config

    return run_training(load_config(TrainConfig, args, **overrides))
