"""`longlora sft`: packed batches equal the records run alone, and a few steps on a tiny model reduce the loss."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

import longlora
from longlora.config import load_config
from longlora.data import IGNORE_INDEX, build_sft_dataset, sft_collator
from longlora.sft import SFTConfig, cmd_sft
from tiny_models import save_tiny_model, tiny_tokenizer

RECORDS = [
    {"instruction": "Summarise the module.", "input": "def add(a, b):\n    return a + b\n" * 6,
     "output": "It adds two numbers."},
    {"instruction": "What does it return?", "input": "def five():\n    return 5\n" * 3, "output": "Five."},
    {"instruction": "Name the language.", "output": "Python."},
]


def test_packed_batch_gives_the_same_loss_as_the_records_alone():
    tokenizer = tiny_tokenizer()
    examples, stats = build_sft_dataset(RECORDS, tokenizer, 256, "llama2")
    assert stats.kept == 3 and stats.dropped == 0
    torch.manual_seed(0)
    from tiny_models import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tokenizer),
                                                         max_position_embeddings=256))
    longlora.enable_s2_attention(model, group_size=16)
    model.config.use_cache = False
    model.train()
    rows = [examples[i] for i in range(len(examples))]
    packed = sft_collator(tokenizer, packing=True)(rows)
    with torch.no_grad():
        packed_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
        total_nll, total_tokens = 0.0, 0
        start = 0
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor([row["labels"]])
            alone = model(input_ids=ids).logits
            n = ids.shape[1]
            torch.testing.assert_close(packed_logits[0, start:start + n], alone[0], atol=1e-5, rtol=1e-5)
            scored = labels[0, 1:] != IGNORE_INDEX
            nll = torch.nn.functional.cross_entropy(alone[0, :-1][scored], labels[0, 1:][scored], reduction="sum")
            total_nll += nll.item()
            total_tokens += int(scored.sum())
            start += n
        packed_loss = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                            labels=packed["labels"]).loss
    assert packed_loss.item() == pytest.approx(total_nll / total_tokens, rel=1e-5)


@pytest.mark.parametrize("packing", ["documents", "pad"])
def test_sft_command_reduces_the_loss(tmp_path, packing):
    save_tiny_model(tmp_path / "base", "llama")
    data = tmp_path / "records.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in RECORDS * 4))
    out = tmp_path / "sft"
    result = cmd_sft(["--model", str(tmp_path / "base"), "--data", str(data), "--output-dir", str(out),
                      "--context-length", "128", "--max-steps", "8", "--per-device-train-batch-size", "4",
                      "--gradient-accumulation-steps", "1", "--learning-rate", "3e-3", "--warmup-steps", "0",
                      "--save-steps", "100", "--prompt-template", "alpaca", "--packing", packing])
    assert result.summary["last_loss"] < result.summary["first_loss"]
    assert result.summary["group_size"] == 32
    assert (out / "adapter_model.safetensors").is_file()


def test_sft_options_are_checked():
    with pytest.raises(ValueError, match="prompt_template"):
        load_config(SFTConfig, [], model="m", data="d", prompt_template="vicuna")
    with pytest.raises(ValueError, match="packing"):
        load_config(SFTConfig, [], model="m", data="d", packing="concat")
    args = load_config(SFTConfig, [], model="m", data="d", packing="pad").training_args
    assert args.get("train_sampling_strategy") == "group_by_length" or args.get("group_by_length") is True
    TrainingArguments(output_dir="unused", use_cpu=True, **args)  # a field this transformers has
