"""Perplexity protocols against explicit per-window loops on a tiny random Llama, token sources, CLI function."""

import json
import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from longlora.evaluate import cmd_eval_perplexity, evaluate_perplexity, load_token_stream, perplexity, save_token_bin
from longlora.evaluate.perplexity import window_starts

VOCAB = 96
WORDS = "the grass is green sky blue sun yellow here we go there and back again".split()


def tiny_llama(positions=256, seed=0):
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=positions, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_tokenizer():
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "[UNK]", ".", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]", pad_token="<pad>"
    )


def random_tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, size=n).astype(np.int64)


def window_loss(model, ids, labels=None):
    """Mean next-token loss of one window via the model's own loss (labels -100 are not scored)."""
    ids = torch.as_tensor(ids)[None]
    labels = ids.clone() if labels is None else torch.as_tensor(labels)[None]
    with torch.no_grad():
        return model(input_ids=ids, labels=labels).loss.item()


def test_window_protocol_equals_explicit_loop():
    model, tokens = tiny_llama(), random_tokens(300)
    length, stride = 64, 48
    result = perplexity(model, tokens, length, protocol="window", stride=stride, batch_size=3, progress=False)

    starts = list(range(0, len(tokens) - length + 1, stride))  # 0, 48, ..., 192 (start + 64 <= 300)
    assert starts == [0, 48, 96, 144, 192]
    losses = [window_loss(model, tokens[s : s + length]) for s in starts]
    assert result["windows"] == len(starts)
    assert result["scored_tokens"] == len(starts) * (length - 1)
    assert result["nll"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(np.mean(losses)), rel=1e-5)
    assert result["protocol"] == "window" and result["length"] == length


def test_sliding_protocol_equals_explicit_loop():
    model, tokens = tiny_llama(), random_tokens(300, seed=1)
    n, length, stride = len(tokens), 64, 40
    result = perplexity(model, tokens, length, protocol="sliding", stride=stride, batch_size=2, progress=False)

    # The standard strided loop, with the last window clamped to a full window ending at the last token.
    total, scored, prev_end, windows = 0.0, 0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + length, n)
        start = end - length
        new = end - prev_end  # tokens not scored by an earlier window
        labels = torch.as_tensor(tokens[start:end]).clone()
        labels[: length - new] = -100
        count = int((labels[1:] != -100).sum())  # the model shifts labels: position 0 is never a target
        total += window_loss(model, tokens[start:end], labels) * count
        scored += count
        windows += 1
        prev_end = end
        if end == n:
            break
    assert scored == n - 1  # every token but the first is scored exactly once
    assert result["scored_tokens"] == scored and result["windows"] == windows
    assert result["perplexity"] == pytest.approx(math.exp(total / scored), rel=1e-5)


def test_window_starts_rules():
    assert window_starts(10, 4, 3, "window") == [(0, 1), (3, 1), (6, 1)]
    # sliding: last window clamped to end at token 10; each window scores after the previous end
    assert window_starts(10, 4, 3, "sliding") == [(0, 1), (3, 1), (6, 1)]
    assert window_starts(11, 4, 3, "sliding") == [(0, 1), (3, 1), (6, 1), (7, 3)]
    assert window_starts(3, 4, 3, "window") == []


def test_documents_are_evaluated_separately_and_short_ones_skipped():
    model = tiny_llama()
    docs = [random_tokens(100, seed=2), random_tokens(20, seed=3), random_tokens(80, seed=4)]
    result = perplexity(model, docs, 64, stride=16, progress=False)
    expected = [window_loss(model, docs[0][s : s + 64]) for s in (0, 16, 32)] + [
        window_loss(model, docs[2][s : s + 64]) for s in (0, 16)
    ]
    assert result["windows"] == 5 and result["skipped_documents"] == 1 and result["documents"] == 2
    assert result["nll"] == pytest.approx(np.mean(expected), rel=1e-5)


def test_max_windows_and_max_tokens():
    model, tokens = tiny_llama(), random_tokens(300)
    assert perplexity(model, tokens, 64, stride=32, max_windows=2, progress=False)["windows"] == 2
    # first 128 tokens: windows at 0, 32, 64
    assert perplexity(model, tokens, 64, stride=32, max_tokens=128, progress=False)["windows"] == 3


@pytest.mark.parametrize("protocol", ["window", "sliding"])
def test_uniform_logits_give_vocabulary_size(protocol):
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: p = 1/V for every token
    result = perplexity(model, random_tokens(200), 64, protocol=protocol, stride=32, progress=False)
    assert result["perplexity"] == pytest.approx(VOCAB, rel=1e-5)
    assert result["nll"] == pytest.approx(math.log(VOCAB), rel=1e-6)


@pytest.mark.parametrize("dtype, high", [("uint16", 65535), ("uint32", 200_000)])
def test_bin_round_trip(tmp_path, dtype, high):
    tokens = np.random.default_rng(0).integers(0, high, size=1000)
    path = save_token_bin(tokens, tmp_path / f"val.{dtype}.bin", dtype=dtype)
    assert path.stat().st_size == 1000 * np.dtype(dtype).itemsize
    stream = load_token_stream(path, dtype=dtype)
    assert stream.kind == "bin" and len(stream.documents) == 1
    np.testing.assert_array_equal(stream.documents[0], tokens)
    assert len(load_token_stream(path, dtype=dtype, max_tokens=100).documents[0]) == 100


def test_bin_errors(tmp_path):
    with pytest.raises(ValueError, match="uint32"):
        save_token_bin([1, 70000], tmp_path / "x.bin", dtype="uint16")
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x00\x02")
    with pytest.raises(ValueError, match="multiple of 2"):
        load_token_stream(odd)
    with pytest.raises(FileNotFoundError):
        load_token_stream(tmp_path / "missing.bin")
    with pytest.raises(ValueError, match="tokenizer"):
        load_token_stream(tmp_path)  # text needs a tokenizer


def test_text_sources(tmp_path):
    tokenizer = tiny_tokenizer()
    (tmp_path / "a.txt").write_text("the sky is blue . " * 20)  # 100 words
    (tmp_path / "b.txt").write_text("the sun is yellow")  # 4 words: too short
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"text": "here we go " * 30}) + "\n" + json.dumps({"text": "there and back again " * 10}) + "\n"
    )
    (tmp_path / ".hidden.txt").write_text("the grass is green")
    stream = load_token_stream(tmp_path, tokenizer, min_length=30)
    assert [len(d) for d in stream.documents] == [101, 91, 41]  # BOS + words, files in sorted order
    assert stream.skipped == 1 and stream.kind == "text"
    assert all(d[0] == tokenizer.bos_token_id for d in stream.documents)
    single = load_token_stream(tmp_path / "a.txt", tokenizer)
    np.testing.assert_array_equal(single.documents[0], stream.documents[0])


def test_evaluate_perplexity_lengths_and_rope_factor_hint(tmp_path):
    model, tokenizer = tiny_llama(positions=128), tiny_tokenizer()
    (tmp_path / "doc.txt").write_text("the grass is green . the sky is blue . " * 30)
    results = evaluate_perplexity(model, tokenizer, tmp_path, [64, 32], stride=32, progress=False)
    assert [r["length"] for r in results] == [32, 64]
    assert all(r["perplexity"] > 1 and r["data"] == str(tmp_path) for r in results)
    with pytest.raises(ValueError, match="--rope-factor 2"):
        evaluate_perplexity(model, tokenizer, tmp_path, [64, 256], progress=False)


def test_token_ids_beyond_vocabulary_are_refused():
    with pytest.raises(ValueError, match="vocabulary"):
        perplexity(tiny_llama(), np.full(100, VOCAB + 5), 32, progress=False)


def test_cmd_eval_perplexity_writes_json_and_plot(tmp_path):
    for seed in (0, 1):
        tiny_llama(seed=seed).save_pretrained(tmp_path / f"m{seed}")
        tiny_tokenizer().save_pretrained(tmp_path / f"m{seed}")
    data = save_token_bin(random_tokens(400), tmp_path / "val.bin")
    out = tmp_path / "eval" / "ppl.json"
    report = cmd_eval_perplexity(
        [f"base={tmp_path / 'm0'}", str(tmp_path / "m1")], data=str(data), lengths=[32, 64], stride=64,
        max_windows=2, dtype="float32", output=out, device="cpu", progress=False,
    )
    assert set(report["models"]) == {"base", "m1"}
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert [r["windows"] for r in saved["models"]["base"]["results"]] == [2, 2]
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["ppl.json", "ppl.png"]  # no temp files left
