"""The README's first command, end to end in its --fast form: shipped embedded base -> train 4x -> eval -> merge
(a minute or two on CPU: marked slow), and its option checks."""

import json

import pytest

from longlora.cli import main

def test_rebuild_base_without_muon_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.delattr(torch.optim, "Muon", raising=False)
    assert main(["quickstart", "--rebuild-base", "--output", str(tmp_path / "q"), "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "torch.optim.Muon (torch >= 2.9)" in err and "without --rebuild-base" in err
    assert not (tmp_path / "q").exists()


def test_threads_must_be_positive(tmp_path, capsys):
    assert main(["quickstart", "--threads", "0", "--output", str(tmp_path / "q")]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_quickstart_fast_extends_the_embedded_model(tmp_path):
    out = tmp_path / "quickstart"
    assert main(["quickstart", "--fast", "--threads", "1", "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    ppl = summary["perplexity"]
    long = str(summary["lengths"][-1])
    # extension works: the trained model beats position interpolation alone at 4x the base context
    assert ppl["extended (LongLoRA)"][long] < ppl["base + PI (no training)"][long]
    assert summary["extended_beats_pi_only"] is True
    # passkey with both templates: base at 256, base + PI and extended at 1024
    assert {label: sorted(by) for label, by in summary["passkey"].items()} == {
        label: ["code", "paper"] for label in ("base", "base + PI (no training)", "extended (LongLoRA)")
    }
    assert list(summary["passkey"]["base"]["code"]) == ["256"]
    assert list(summary["passkey"]["extended (LongLoRA)"]["code"]) == ["1024"]
    records = json.loads((out / "passkey.json").read_text())["extended (LongLoRA)"]["code"]["records"]
    assert len(records) == 5 and all(900 < r["prompt_tokens"] <= 1024 for r in records)
    assert summary["threads"] == 1  # --threads
    for name in ("perplexity.png", "passkey_heatmap.png", "passkey_code_heatmap.png", "merged/config.json",
                 "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    merged = json.loads((out / "merged" / "config.json").read_text())
    assert merged["max_position_embeddings"] == 1024
    assert merged["rope_parameters"]["factor"] == 4
