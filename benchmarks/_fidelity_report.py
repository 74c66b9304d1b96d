"""The report of benchmarks/fidelity_gpu.py: the paper's numbers, the claims as perplexity gaps (this run, the
2.4M miniatures, the paper), the readings of the two questions and the plot.
"""

from __future__ import annotations

import json
from pathlib import Path

from _extension import plot_rows
from _fidelity_recipe import Plan

ROOT = Path(__file__).resolve().parents[1]

PAPER = dict(full_ft=8.08, lora_plus=8.12, lora=11.44, s2_full_eval=8.12, s2_own=8.64, short_full_eval=8.39,
             short_own=9.17)
"""Llama-2 7B extended to 32k, PG19 validation perplexity: Table 2 (S2-trained rows) and Table 6 (test with /
without full attention)."""

MINIATURES = {"2.4M, 100 steps": "ablation.json", "2.4M, 300 steps": "ablation_300steps.json"}
"""The embedded model's ablation runs (256 -> 1024), in docs/benchmarks/."""


# ------------------------------------------------------------------------------------------------------- report


def load_miniatures() -> dict[str, dict[str, dict]]:
    """{label: {row: summary entry}} of the embedded model's committed ablation runs (those present)."""
    found = {}
    for label, name in MINIATURES.items():
        path = ROOT / "docs" / "benchmarks" / name
        if path.is_file():
            found[label] = {s["row"]: s for s in json.loads(path.read_text())["summary"]}
    return found


def claims(by_row: dict[str, dict], target: int) -> dict[str, float | None]:
    """The comparisons the paper's claims rest on, as % perplexity gaps (positive: the first row is worse)."""
    full, own = f"ppl_{target}", f"ppl_{target}_trained_attention"

    def gap(a: str, b: str, key_a: str = full, key_b: str = full) -> float | None:
        if a not in by_row or b not in by_row:
            return None
        return 100.0 * (by_row[a][key_a] / by_row[b][key_b] - 1.0)

    return {
        "s2_vs_full_attention_training": gap("lora_plus_s2", "lora_plus_full"),
        "s2_vs_full_finetune": gap("lora_plus_s2", "full_ft_full"),
        "no_shift_vs_shift_full_eval": gap("lora_plus_short", "lora_plus_s2"),
        "no_shift_vs_shift_own_attention": gap("lora_plus_short", "lora_plus_s2", own, own),
        "s2_own_attention_vs_full_eval": gap("lora_plus_s2", "lora_plus_s2", own, full),
        "lora_vs_lora_plus": gap("lora_full", "lora_plus_full"),
        "lora_plus_vs_full_finetune": gap("lora_plus_full", "full_ft_full"),
        "pi_only_vs_lora_plus": gap("pi_only", "lora_plus_full"),
    }


def paper_claims() -> dict[str, float | None]:
    p = PAPER

    def gap(a: float, b: float) -> float:
        return 100.0 * (a / b - 1.0)

    # Table 2's rows are all S2-trained, so its full fine-tune (8.08) stands in for full-attention training
    return {
        "s2_vs_full_attention_training": gap(p["lora_plus"], p["full_ft"]),
        "s2_vs_full_finetune": gap(p["lora_plus"], p["full_ft"]),
        "no_shift_vs_shift_full_eval": gap(p["short_full_eval"], p["s2_full_eval"]),
        "no_shift_vs_shift_own_attention": gap(p["short_own"], p["s2_own"]),
        "s2_own_attention_vs_full_eval": gap(p["s2_own"], p["s2_full_eval"]),
        "lora_vs_lora_plus": gap(p["lora"], p["lora_plus"]),
        "lora_plus_vs_full_finetune": gap(p["lora_plus"], p["full_ft"]),
        "pi_only_vs_lora_plus": None,
    }


def print_claims(table: dict[str, dict[str, float | None]]) -> None:
    columns = list(table)
    print("\nclaims as perplexity gaps in % (first row named vs second; positive: the first is worse)")
    print(f"{'comparison':<34}" + "".join(f"{c:>18}" for c in columns))
    for name in table[columns[0]]:
        cells = [table[c].get(name) for c in columns]
        print(f"{name:<34}" + "".join(f"{'-':>18}" if v is None else f"{v:>+17.1f}%" for v in cells))


def readings(summary: list[dict], target: int) -> list[str]:
    """The two questions of the issue, answered mechanically from the numbers (seed spread included)."""
    by = {s["row"]: s for s in summary}
    full, own = f"ppl_{target}", f"ppl_{target}_trained_attention"
    out = []
    if "lora_plus_s2" in by and "lora_plus_full" in by:
        s2, ref = by["lora_plus_s2"], by["lora_plus_full"]
        g = 100.0 * (s2[full] / ref[full] - 1.0)
        out.append(f"LoRA+ + S2 under full attention vs LoRA+ trained with full attention: {s2[full]:.3f} vs "
                   f"{ref[full]:.3f} ({g:+.1f} %): the paper's claim (at most 2 % worse) "
                   f"{'holds' if g <= 2.0 else 'does NOT hold'} here "
                   f"(seed stdev {s2['stdev']:.3f} / {ref['stdev']:.3f})")
    if "lora_plus_s2" in by and "lora_plus_short" in by:
        s2, short = by["lora_plus_s2"], by["lora_plus_short"]
        for key, what in ((full, "full-attention eval"), (own, "own attention")):
            d = short[key] - s2[key]
            out.append(f"shift vs no shift ({what}): {s2[key]:.3f} vs {short[key]:.3f}: "
                       f"{'the shift' if d > 0 else 'no shift'} is better by {abs(d):.3f} "
                       f"({100.0 * abs(d) / max(s2[key], short[key]):.1f} %; seed stdev at full attention "
                       f"{s2['stdev']:.3f} / {short['stdev']:.3f})")
    return out


def plot(summary: list[dict], plan: Plan, base: dict, path: Path) -> None:
    title = (f"LongLoRA at {base['parameters'] / 1e6:.1f}M parameters: {plan.base_length} -> {plan.target} tokens "
             "(lower is better)")
    plot_rows(summary, [plan.base_length, plan.target], path, title=title,
              xlabel=f"held-out perplexity on Python sources (full-attention evaluation; base ppl@{plan.base_length} "
                     f"{base[f'heldout_ppl_{plan.base_length}']:.2f})")



def _line(measured: dict, plan: Plan) -> str:
    t, b = plan.target, plan.base_length
    return (f"ppl@{t} {measured[f'ppl_{t}']:.3f} (ppl@{b} {measured[f'ppl_{b}']:.3f}, @{t} with its training "
            f"attention {measured[f'ppl_{t}_trained_attention']:.3f}), passkey@{t} {measured['passkey']:.2f}")
