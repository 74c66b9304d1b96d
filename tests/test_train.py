"""`longlora train` end to end on a tiny Llama (context 64 -> 256): loss, S2 during training only, saved adapter,
rope factor, resume equals an uninterrupted run, options, and clear errors before any heavy work."""

import json
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback

import longlora.integration
from longlora.cli import main as cli_main
from longlora.config import TrainConfig, load_config
from longlora.checkpoints import COMPLETE, latest_complete_checkpoint
from longlora.config import RUN_CONFIG
from longlora.train import cmd_train, compute_dtype, load_dtype, run_training
from launch import torchrun
from tiny_models import save_tiny_model, stdlib_corpus

FAST = dict(context_length=256, max_steps=4, save_steps=2, per_device_train_batch_size=2,
            gradient_accumulation_steps=1, learning_rate=3e-3, warmup_steps=0, logging_steps=1, seed=7,
            max_blocks=16)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    save_tiny_model(root / "base", "llama")
    stdlib_corpus(root / "corpus", n_files=3)
    return root


def train_args(workspace, out, **overrides):
    options = dict(FAST, model=str(workspace / "base"), data=str(workspace / "corpus"), output_dir=str(out))
    options.update(overrides)
    args = []
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def test_train_extends_context_with_s2_and_saves_a_loadable_adapter(workspace, tmp_path, monkeypatch):
    calls = {"s2": 0}
    real_s2 = longlora.integration.s2_attention

    def counting_s2(*args, **kwargs):
        calls["s2"] += 1
        return real_s2(*args, **kwargs)

    monkeypatch.setattr(longlora.integration, "s2_attention", counting_s2)
    out = tmp_path / "run"
    result = cmd_train(train_args(workspace, out, max_steps=8, save_steps=4))
    summary = result.summary
    assert calls["s2"] == 8 * 2 * 2  # steps x layers x (forward + checkpointed recompute)
    assert summary["last_loss"] < summary["first_loss"]
    assert summary["group_size"] == 64

    saved = AutoConfig.from_pretrained(out)
    assert saved.rope_parameters["rope_type"] == "linear" and saved.rope_parameters["factor"] == 4
    assert saved.max_position_embeddings == 256
    assert saved.rope_parameters["rope_theta"] == AutoConfig.from_pretrained(workspace / "base").rope_parameters[
        "rope_theta"]
    for directory in (out, out / "checkpoint-4", out / "checkpoint-8"):
        assert (directory / "adapter_model.safetensors").is_file()
        assert (directory / "tokenizer.json").is_file()
        assert (directory / RUN_CONFIG).is_file()
        weights = load_file(directory / "adapter_model.safetensors")
        assert any("embed_tokens" in k for k in weights) and any("norm" in k for k in weights)
        assert any("lora_A" in k for k in weights)
    assert (out / "checkpoint-8" / COMPLETE).is_file()
    assert yaml.safe_load((out / RUN_CONFIG).read_text())["context_length"] == 256
    assert (out / "loss.png").stat().st_size > 0

    # eval: full attention, and the adapter loads with plain PEFT on the interpolated config
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(workspace / "base", config=saved)
    model = PeftModel.from_pretrained(base, out).eval()
    before = calls["s2"]
    with torch.no_grad():
        logits = model(torch.randint(3, 300, (1, 200))).logits
    assert calls["s2"] == before
    assert torch.isfinite(logits).all()


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
            control.should_save = True


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(workspace, tmp_path):
    straight = tmp_path / "straight"
    run_training(load_config(TrainConfig, train_args(workspace, straight)))
    interrupted = tmp_path / "interrupted"
    run_training(load_config(TrainConfig, train_args(workspace, interrupted)), callbacks=[StopAt(2)])
    assert latest_complete_checkpoint(interrupted).endswith("checkpoint-2")
    # a half-written checkpoint (no completion marker) must be ignored by resume
    (interrupted / "checkpoint-3").mkdir()
    run_training(load_config(TrainConfig, train_args(workspace, interrupted, resume="auto")))
    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(interrupted / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit for bit on CPU
    # the summary describes all 4 steps, not the 2 of the resumed process
    summaries = [json.loads((d / "train_summary.json").read_text()) for d in (straight, interrupted)]
    for s in summaries:
        s.pop("seconds")
    assert summaries[0] == summaries[1] and summaries[1]["steps"] == 4 and len(summaries[1]["losses"]) == 4


@pytest.mark.parametrize(
    "options,compute,weights",
    [
        (dict(bf16=False), torch.float32, torch.float32),  # the CPU default: an fp32 run
        (dict(bf16=True), torch.bfloat16, torch.bfloat16),
        (dict(fp16=True), torch.float16, torch.float16),  # passed through to TrainingArguments
        (dict(fp16="true"), torch.float16, torch.float16),  # ... as the command line gives it
        (dict(bf16=True, dtype="float32"), torch.bfloat16, torch.float32),  # an explicit dtype wins
        (dict(bf16=False, dtype="bfloat16"), torch.float32, torch.bfloat16),
        (dict(bf16=True, finetune="full"), torch.bfloat16, torch.float32),  # full fine-tuning: fp32 weights
        (dict(bf16=True, quantization="4bit"), torch.bfloat16, torch.bfloat16),
    ],
)
def test_frozen_weights_load_in_the_runs_compute_dtype(options, compute, weights):
    config = load_config(TrainConfig, [], model="m", data="d", **options)
    assert compute_dtype(config) == compute
    assert load_dtype(config) == weights


class Inspect(TrainerCallback):
    """Records, at the start of training, every parameter's dtype and trainability, and during the first step the
    dtype of the hidden states entering each decoder layer."""

    def __init__(self):
        self.parameters, self.layer_inputs, self._hooks, self._seen = {}, [], [], set()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from transformers.modeling_layers import GradientCheckpointingLayer

        self.model = model
        self.parameters = {name: (p.dtype, p.requires_grad) for name, p in model.named_parameters()}
        for layer in (m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)):
            self._hooks.append(layer.register_forward_pre_hook(self._record, with_kwargs=True))

    def _record(self, module, args, kwargs):
        # once per layer: before transformers 5.23 a layer's forward hooks run inside its checkpoint, so they fire
        # again when the backward recomputes it
        if module not in self._seen:
            self._seen.add(module)
            self.layer_inputs.append((args[0] if args else kwargs["hidden_states"]).dtype)

    def on_step_end(self, args, state, control, **kwargs):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_bf16_run_keeps_the_frozen_base_in_bf16_and_the_trainables_in_fp32(workspace, tmp_path, tied):
    """A bf16 run on CPU (the Trainer's bf16 autocast): frozen weights bfloat16, LoRA + embed/norm copies float32,
    bfloat16 hidden states into every decoder layer, a float32 adapter, and `merge` matches base + adapter."""
    from longlora.adapters import trainable_parameter_names
    from longlora.merge import merge_and_check

    base = workspace / "base"
    if tied:
        base = workspace / "tied_base"
        if not base.exists():
            save_tiny_model(base, "llama", tie_word_embeddings=True)
    out = tmp_path / "bf16"
    inspect = Inspect()
    result = run_training(load_config(TrainConfig, train_args(workspace, out, model=base, bf16="true", max_steps=2,
                                                               save_steps=2)), callbacks=[inspect])
    assert result.summary["steps"] == 2 and all(torch.isfinite(torch.tensor(loss)) for _, loss in
                                                 result.summary["losses"])
    trainable = {name for name, (_, grad) in inspect.parameters.items() if grad}
    assert trainable == set(trainable_parameter_names(inspect.model))
    assert sum(".lora_" in n for n in trainable) == 2 * 4 * 2  # layers x q/k/v/o x A/B
    assert {n for n in trainable if ".lora_" not in n} == {
        "base_model.model.model.embed_tokens.modules_to_save.default.weight",
        "base_model.model.model.norm.modules_to_save.default.weight",
        *(f"base_model.model.model.layers.{i}.{norm}.modules_to_save.default.weight"
          for i in range(2) for norm in ("input_layernorm", "post_attention_layernorm"))}
    for name, (dtype, grad) in inspect.parameters.items():
        assert dtype == (torch.float32 if grad else torch.bfloat16), name
    embedding = inspect.model.get_base_model().model.embed_tokens.modules_to_save["default"].weight
    head = inspect.model.get_base_model().lm_head
    assert ((head.modules_to_save["default"] if tied else head).weight is embedding) is tied
    # the first step's forward: every decoder layer's input (what gradient checkpointing keeps) is bfloat16
    assert inspect.layer_inputs == [torch.bfloat16] * 2

    saved = load_file(out / "adapter_model.safetensors")
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}
    assert "base_model.model.model.embed_tokens.weight" in saved and "base_model.model.model.norm.weight" in saved

    _, report = merge_and_check(adapter=out, output=tmp_path / "merged", dtype="float32")
    assert report.max_logit_diff < 1e-4
    from peft import PeftModel

    config = AutoConfig.from_pretrained(out)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, config=config, dtype=torch.float32), out).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(3, 300, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_yaml_file_and_command_line_overrides(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": "m", "data": "d", "context_length": 1024, "attention": "short",
                                   "gradient_checkpointing": False, "report_to": "tensorboard"}))
    config = load_config(TrainConfig, [str(cfg), "--context-length", "2048", "--lora-targets", "q_proj,v_proj",
                                       "--no-gradient-checkpointing", "--bf16", "false", "--learning-rate", "1e-5"])
    assert config.context_length == 2048
    assert config.attention == "short"
    assert config.lora_targets == ["q_proj", "v_proj"]
    assert config.gradient_checkpointing is False and config.bf16 is False
    assert config.learning_rate == 1e-5
    assert config.training_args == {"report_to": "tensorboard"}
    assert config.group_size() == 512


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(attention="sparse"), "attention must be one of"),
        (dict(finetune="qlora"), "finetune must be one of"),
        (dict(gradient_checkpointing="maybe"), "true or false"),
        (dict(context_length="long"), "integer"),
        (dict(group_size_ratio=0), "group_size_ratio"),
        (dict(max_steps=0), "max_steps"),
        (dict(not_an_option=1), "unknown option"),
    ],
)
def test_bad_options_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(TrainConfig, [], model="m", data="d", **overrides)


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing_model", "not found"),
        ("missing_data", "no such file|does not exist|not found"),
        ("empty_corpus", "empty|no documents|no text"),
        ("short_corpus", "shorter than one block|fewer tokens|tokens"),
        ("below_original", "below the model's original context"),
        ("no_rope", "RoPE|rotary"),
    ],
)
def test_bad_input_fails_before_heavy_work_and_writes_nothing(workspace, tmp_path, case, message):
    out = tmp_path / "out"
    model, data = workspace / "base", workspace / "corpus"
    extra = {}
    if case == "missing_model":
        model = tmp_path / "nope"
    elif case == "missing_data":
        data = tmp_path / "nope.txt"
    elif case == "empty_corpus":
        data = tmp_path / "empty"
        data.mkdir()
        (data / "a.txt").write_text("")
    elif case == "short_corpus":
        data = tmp_path / "short.txt"
        data.write_text("x = 1\n")
    elif case == "below_original":
        extra["context_length"] = 32
    elif case == "no_rope":
        from transformers import GPT2Config, GPT2LMHeadModel

        from tiny_models import tiny_tokenizer

        model = tmp_path / "gpt2"
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=320, n_positions=64)).save_pretrained(
            model)
        tiny_tokenizer().save_pretrained(model)
    args = train_args(workspace, out, model=model, data=data, **extra)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        cmd_train(args)
    assert not out.exists() or not any(out.iterdir())


def test_non_empty_output_dir_needs_resume_or_overwrite(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something.txt").write_text("keep me")
    assert cli_main(["train"] + train_args(workspace, out)) == 2
    assert "--resume" in capsys.readouterr().err


def test_cli_help_lists_options(capsys):
    assert cli_main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--context-length" in text and "--group-size-ratio" in text and "paper" in text


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on CPU")
def test_two_process_data_parallel_matches_one_process_with_doubled_batch(workspace, tmp_path):
    """A real 2-process DDP run (torchrun, gloo) logs the same losses as one process with twice the batch."""
    # two blocks: every step's global batch holds both, whatever order each sampler draws them in
    common = dict(max_steps=2, save_steps=100, gradient_checkpointing=False, max_blocks=2)
    one = tmp_path / "one"
    config_one = load_config(TrainConfig, train_args(workspace, one, per_device_train_batch_size=2, **common))
    config_one.training_args["use_cpu"] = True  # the device of the 2-process run below, also on a CUDA machine
    run_training(config_one)
    two = tmp_path / "two"
    # CPU ranks with gloo even where CUDA exists (two ranks on one GPU break gloo: "Connection closed by peer")
    torchrun(2, ["-m", "longlora.cli", "train"] + train_args(
        workspace, two, per_device_train_batch_size=1, ddp_backend="gloo", **common), timeout=600)
    a = load_file(one / "adapter_model.safetensors")
    b = load_file(two / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-4)
    losses_one = json.loads((one / "train_summary.json").read_text())["losses"]
    losses_two = json.loads((two / "train_summary.json").read_text())["losses"]
    assert len(losses_one) == len(losses_two) == 2
    for (s1, l1), (s2, l2) in zip(losses_one, losses_two):
        assert s1 == s2
        assert l1 == pytest.approx(l2, rel=1e-4)
