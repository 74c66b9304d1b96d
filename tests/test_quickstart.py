"""The README's first command, end to end in its --fast form: embedded base -> train 4x -> eval -> merge.

Builds the embedded model into the user cache on first use (minutes; later runs reuse it), so it is marked slow.
"""

import json

import pytest

from longlora.cli import main

pytestmark = pytest.mark.slow


def test_quickstart_fast_extends_the_embedded_model(tmp_path):
    out = tmp_path / "quickstart"
    assert main(["quickstart", "--fast", "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    ppl = summary["perplexity"]
    long = str(summary["lengths"][-1])
    # extension works: the trained model beats position interpolation alone at 4x the base context
    assert ppl["extended (LongLoRA)"][long] < ppl["base + PI (no training)"][long]
    assert summary["extended_beats_pi_only"] is True
    for name in ("perplexity.png", "passkey_heatmap.png", "merged/config.json", "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    merged = json.loads((out / "merged" / "config.json").read_text())
    assert merged["max_position_embeddings"] == 1024
    assert merged["rope_parameters"]["factor"] == 4
