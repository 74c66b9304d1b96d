"""S2-aware sequence parallelism: sharded loss and gradients equal one process on the whole sequence.

The multi-process checks run tests/sp_worker.py under torchrun (gloo, CPU); each launch bundles many cases
(architectures x layouts x both regimes) because a launch costs seconds. The chunk/halo bookkeeping is a pure
function, tested in-process against the group arithmetic written out independently.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import torchrun
from longlora.sequence_parallel import aligned_length, check_sequence_parallel, plan_chunks, valid_world_sizes

HERE = Path(__file__).parent


def _expected_halo(rank: int, chunk: int, group: int) -> tuple[int, int]:
    """Tokens before rank's chunk that its plain / shifted groups hold, from the group arithmetic of a regular row."""
    start = rank * chunk
    plain = start % group
    shifted = min(start, (start + group // 2) % group)  # shifted groups start at -G/2 + kG (the first is cut at 0)
    return plain, shifted


@pytest.mark.parametrize("length,group,world", [(64, 16, 2), (64, 8, 4), (64, 16, 4), (64, 32, 4), (64, 64, 4),
                                                (128, 32, 8), (96, 48, 2)])
def test_plan_halos_follow_the_groups(length, group, world):
    chunk = length // world
    for rank in range(world):
        plan = plan_chunks(None, None, 1, length, group, world, rank)
        assert plan.halo == tuple(_expected_halo(r, chunk, group) for r in range(world))
        if chunk >= group:  # halo regime: exactly G/2 tokens of the shifted half from the previous rank
            assert plan.halo[rank] == ((0, group // 2) if rank else (0, 0))
        for half in (0, 1):
            sends, recvs = plan.transfers(half)
            # what I receive covers my halo exactly, and each peer sends me what I receive from it
            assert sum(z - a for _, a, z in recvs) == plan.halo[rank][half]
            for src, a, z in recvs:
                their_sends = plan_chunks(None, None, 1, length, group, world, src).transfers(half)[0]
                assert [(z2 - a2) for dst, a2, z2 in their_sends if dst == rank] == [z - a]
            if chunk < group:  # a group spans ranks: never more than the ranks of its own group
                assert all(rank - src < group // chunk for src, _, _ in recvs)


def test_plan_with_padding_and_packing_moves_the_groups():
    # left padding of 5: row's groups start at token 5, so the plain half now needs 5 tokens of the previous chunk
    mask = torch.ones(1, 64, dtype=torch.long)
    mask[0, :5] = 0
    plan = plan_chunks(mask, None, 1, 64, 16, 2, 1)
    assert plan.halo[1] == ((32 - 5) % 16, (32 - 5 + 8) % 16)
    # a document starting at 30: its first plain group [30, 46) straddles the chunk start 32
    pos = torch.cat([torch.arange(30), torch.arange(34)])[None]
    plan = plan_chunks(None, pos, 1, 64, 16, 2, 1)
    assert plan.halo[1] == (2, 2)


def test_aligned_length_pads_to_the_next_valid_split():
    assert aligned_length(64, 16, 2) == 64
    assert aligned_length(60, 16, 2) == 64  # chunks of 32 = 2 groups
    assert aligned_length(60, 16, 4) == 64  # chunks of 16 = 1 group
    assert aligned_length(30, 16, 4) == 32  # chunks of 8 = half a group
    assert aligned_length(20, 16, 4) == 32  # chunks of 5 -> 8 (the next divisor of 16)
    assert aligned_length(100, 32, 3) == 192  # chunks of 34 -> 64
    for length, g, n in ((60, 16, 2), (30, 16, 4), (20, 16, 4), (100, 32, 3)):
        assert check_sequence_parallel(aligned_length(length, g, n), g, n)


def test_invalid_world_size_names_the_valid_ones():
    assert valid_world_sizes(64, 16) == [1, 2, 4, 8, 16, 32, 64]
    assert check_sequence_parallel(64, 16, 8) == 8
    assert valid_world_sizes(96, 32) == [1, 3, 6, 12, 24, 48, 96]
    with pytest.raises(ValueError, match=r"valid numbers of ranks here: \[3, 6, 12, 24, 48, 96\]"):
        check_sequence_parallel(96, 32, 4)  # chunks of 24: neither a multiple nor a divisor of 32
    with pytest.raises(ValueError, match="equal chunks"):
        check_sequence_parallel(64, 16, 3)


def _launch(world: int, cases: list[dict], tmp_path) -> list[dict]:
    out = tmp_path / f"sp{world}.json"
    torchrun(world, [HERE / "sp_worker.py", out, json.dumps(cases)])
    return json.loads(out.read_text())


def _cases(halo_groups, span_groups):
    cases = []
    for arch in ("llama", "qwen2"):  # tiny llama: 4 query / 2 key-value heads (GQA); qwen2: GQA with q/k/v bias
        for layout in ("plain", "padding", "packed"):
            for g in halo_groups + span_groups:
                cases.append({"arch": arch, "layout": layout, "length": 64, "group_size": g})
    # a length that does not split (a fixed group size pads it to 64), padded and packed
    cases += [{"arch": "llama", "layout": layout, "length": 60, "group_size": halo_groups[0]}
              for layout in ("padding", "packed")]
    # one key/value head shared by the plain and the shifted query heads (both halves need it)
    cases.append({"arch": "llama", "layout": "packed", "length": 64, "group_size": halo_groups[0],
                  "config": {"num_key_value_heads": 1}})
    # regular batches through the general path, and through the CUDA path's code (reference kernel)
    cases += [{"arch": "llama", "layout": "plain", "length": 64, "group_size": g, "path": path}
              for path in ("sdpa", "varlen") for g in halo_groups + span_groups]
    cases += [{"arch": "qwen2", "layout": layout, "length": 64, "group_size": g, "path": "sdpa"}
              for layout in ("padding", "packed") for g in (halo_groups[0], span_groups[0])]
    cases.append({"arch": "llama", "layout": "plain", "length": 64, "group_size": halo_groups[0], "path": "varlen",
                  "config": {"num_key_value_heads": 1}})
    # rows with whole chunks of padding
    cases += [{"arch": "llama", "layout": "long_padding", "length": 64, "group_size": g}
              for g in (halo_groups[0], span_groups[0])]
    # the chunked loss of longlora.memory (tiled_loss) on each rank's chunk
    cases += [{"arch": "llama", "layout": layout, "length": 64, "group_size": halo_groups[0], "tiled_loss": True}
              for layout in ("plain", "packed")]
    # the no-shift ablation ("short" attention): every head plain
    cases += [{"arch": "llama", "layout": layout, "length": 64, "group_size": span_groups[0], "shift": False}
              for layout in ("plain", "packed")]
    return cases


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on CPU")
@pytest.mark.parametrize("world,halo_groups,span_groups", [(2, [16, 32], [64]), (4, [8, 16], [32, 64])])
def test_sharded_loss_and_gradients_equal_one_process(world, halo_groups, span_groups, tmp_path):
    cases = _cases(halo_groups, span_groups)
    results = _launch(world, cases, tmp_path)
    assert [r["case"] for r in results] == cases  # every case ran (a failing case ends the launch)
    for r in results:
        case = r["case"]
        assert "error" not in r, r
        assert r["zero_ref_grads"] == [], case  # every trainable parameter is exercised
        assert r["n_trainable"] > 10
        assert r["loss_diff"] <= 2e-6 * max(1.0, r["ref_loss"]), case
        assert r["max_grad_diff"] <= 1e-6 * max(1.0, r["max_grad"]), (case, r["max_grad_diff"])
        chunk, g = r["chunk"], case["group_size"]
        # on CPU every batch takes the row prefix in every layer (2) of every rank, on the varlen path regular
        # batches do; the general path never does
        path = case.get("path", "auto")
        prefix_path = path == "auto" or (path == "varlen" and case["layout"] == "plain")
        assert r["prefix_fetches"] == [2 if prefix_path else 0] * world, case
        if case.get("path") == "varlen":  # a kernel call over the halo in each layer of every rank that has one
            assert [c > 0 for c in r["prefix_calls"]] == [max(h) > 0 for h in r["halo"]], case
        if not case.get("shift", True):
            if case["layout"] == "plain":  # no shifted groups: both halves' halo is the plain one
                assert [tuple(h) for h in r["halo"]] == [(s * chunk % g,) * 2 for s in range(world)]
        elif case["layout"] == "plain" and case["length"] == 64:
            assert [tuple(h) for h in r["halo"]] == [_expected_halo(s, chunk, g) for s in range(world)]
            # bytes the exchange sent, counted in its send calls: per layer the K and V of every halo token of the
            # half's key/value heads, fp32; the backward sends the same amount back
            kv_half = 1  # tiny models: 2 key/value heads, one per half (or 1, shared by both halves)
            per_token = 2 * kv_half * 16 * 4 * 2  # (K, V) x heads x head_dim x fp32 x 2 layers
            expected = sum(sum(h) for h in r["halo"]) * per_token
            fwd = sum(s[0] for s in r["bytes_sent"])
            bwd = sum(s[1] for s in r["bytes_sent"])
            assert fwd == bwd == expected, (case, r["bytes_sent"])
            if chunk >= g:  # one G/2 halo of half the key/value heads per chunk boundary, nothing else
                assert fwd == (world - 1) * (g // 2) * per_token
                assert r["bytes_sent"][-1][0] == 0 and r["bytes_sent"][0][1] == 0
    max_diff = max(r["max_grad_diff"] for r in results)
    print(f"N={world}: {len(results)} cases, max |grad diff| {max_diff:.2e}, "
          f"max |loss diff| {max(r['loss_diff'] for r in results):.2e}")


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on CPU")
@pytest.mark.parametrize("nproc", [2, 4])
def test_train_with_sequence_parallel_gives_the_same_adapter(tmp_path, nproc):
    """`longlora train --sequence-parallel 2` = one process on whole sequences (weights, losses).

    2 processes: one group, one block per step. 4 processes: two data-parallel groups (DDP over all 4 ranks), each
    on its own block, against one process with both blocks in its batch (full blocks: equal token counts).
    """
    from safetensors.torch import load_file

    from longlora.config import TrainConfig, load_config
    from longlora.train import run_training
    from tiny_models import save_tiny_model, stdlib_corpus

    save_tiny_model(tmp_path / "base", "llama")
    stdlib_corpus(tmp_path / "corpus", n_files=2)
    # one block per step (the same block every step), gradient checkpointing on (the halo exchange is recomputed)
    groups = nproc // 2
    options = dict(model=tmp_path / "base", data=tmp_path / "corpus", context_length=256, max_steps=3,
                   save_steps=100, per_device_train_batch_size=1, gradient_accumulation_steps=1, learning_rate=3e-3,
                   warmup_steps=0, logging_steps=1, seed=7, max_blocks=groups,
                   packing="documents" if groups == 1 else "concat")

    def args(out, **extra):
        return [x for k, v in dict(options, output_dir=out, **extra).items()
                for x in (f"--{k.replace('_', '-')}", str(v))]

    run_training(load_config(TrainConfig, args(tmp_path / "one", per_device_train_batch_size=groups)))
    proc = torchrun(nproc, ["-m", "longlora.cli", "train"] + args(tmp_path / "two", sequence_parallel=2,
                                                                  ddp_backend="gloo"))
    assert f"sequence parallel: {groups} group(s) of 2 ranks" in proc.stdout
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-4)
    one = json.loads((tmp_path / "one" / "train_summary.json").read_text())["losses"]
    two = json.loads((tmp_path / "two" / "train_summary.json").read_text())["losses"]
    assert [s for s, _ in one] == [s for s, _ in two] == [1, 2, 3]
    assert [v for _, v in two] == pytest.approx([v for _, v in one], rel=1e-5)


def test_config_rejects_a_sequence_parallel_size_that_cuts_groups(tmp_path):
    from longlora.config import TrainConfig

    with pytest.raises(ValueError, match=r"valid numbers of ranks here: \[2, 4, 8"):
        TrainConfig(model="m", data="d", context_length=256, sequence_parallel=3)
    with pytest.raises(ValueError, match="attention s2 or short"):
        TrainConfig(model="m", data="d", context_length=256, sequence_parallel=2, attention="full")
    assert TrainConfig(model="m", data="d", context_length=256, sequence_parallel=8).sequence_parallel == 8


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on CPU")
def test_benchmark_smoke(tmp_path):
    """benchmarks/sequence_parallel.py --smoke: tables printed, JSON + PNG written, gloo bytes = dry-run bytes."""
    out = tmp_path / "sp.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, str(HERE.parent / "benchmarks" / "sequence_parallel.py"), "--smoke",
                           "--output", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "S2/ring" in proc.stdout and "peak ratio" in proc.stdout
    data = json.loads(out.read_text())
    (row,) = data["bytes"]
    assert (row["length"], row["ranks"], row["group_size"]) == (65536, 8, 16384)
    # 7B, N=8 (chunks of 8k, groups of 16k spanning 2 ranks): every rank sends or receives one 8k-token chunk of
    # half the key/value heads (16 heads x 128 x K,V x bf16) per layer
    assert row["s2_fwd_max"] == 8192 * 16 * 128 * 2 * 2
    assert row["ring_fwd"] == 7 * 8192 * 32 * 128 * 2 * 2
    assert row["s2_over_ring"] <= row["group_over_length"]
    rows = data["gloo"]
    assert [(r["layout"], r["ranks"]) for r in rows] == [("regular", 1), ("regular", 2), ("packed", 1), ("packed", 2)]
    for two in rows[1::2]:
        assert two["sent_fwd_per_rank"] == two["dry_run_fwd_per_rank"]  # real gloo calls = the dry run's count
        assert sum(two["sent_bwd_per_rank"]) == sum(two["sent_fwd_per_rank"]) > 0
        assert 0 < two["peak_ratio_max_rank"] < 1
    # the regular batch (the CPU kernels' prefix path) holds half the single process's tensors plus the halo; the
    # only excess are the loss and its gradient seed, scalars every process has (4 bytes each)
    assert rows[1]["excess_bytes_max_rank"] <= 8
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on CPU")
def test_sft_with_sequence_parallel_and_accumulation_gives_the_same_adapter(tmp_path):
    """`longlora sft --sequence-parallel 2`: records of different lengths (padded to aligned chunks), two
    micro-batches per step weighted by their token counts, as in one process."""
    from safetensors.torch import load_file

    from longlora.config import load_config
    from longlora.sft import SFTConfig, build_sft_data
    from longlora.train import run_training
    from tiny_models import save_tiny_model

    save_tiny_model(tmp_path / "base", "llama")
    records = [{"instruction": "Summarise the module.", "input": "def add(a, b):\n    return a + b\n" * 6,
                "output": "It adds."},
               {"instruction": "Name the language.", "output": "Python."}]
    (tmp_path / "records.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    options = dict(model=tmp_path / "base", data=tmp_path / "records.jsonl", context_length=256, max_steps=2,
                   save_steps=100, per_device_train_batch_size=1, gradient_accumulation_steps=2, learning_rate=3e-3,
                   warmup_steps=0, logging_steps=1, seed=7, packing="documents")

    def args(out, **extra):
        return [x for k, v in dict(options, output_dir=out, **extra).items()
                for x in (f"--{k.replace('_', '-')}", str(v))]

    run_training(load_config(SFTConfig, args(tmp_path / "one")), build_data=build_sft_data)
    torchrun(2, ["-m", "longlora.cli", "sft"] + args(tmp_path / "two", sequence_parallel=2, ddp_backend="gloo"))
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-4)
    one = json.loads((tmp_path / "one" / "train_summary.json").read_text())["losses"]
    two = json.loads((tmp_path / "two" / "train_summary.json").read_text())["losses"]
    assert [v for _, v in two] == pytest.approx([v for _, v in one], rel=1e-5)
