"""torchrun worker for tests/test_sp_composition.py: sequence parallelism under FSDP / DeepSpeed ZeRO vs one process.

The world of W ranks is split into W/N data-parallel groups of N sequence-parallel ranks (`data_parallel_groups`);
the parameter wrapper (FSDP2 `fully_shard`, FSDP1, DeepSpeed ZeRO-2/3) shards the parameters over all W ranks and
averages gradients over them. Each group trains on its own sequence(s), each rank on its chunk. Every rank also
trains, by itself and without communication, the reference: the same model on all groups' sequences in one batch
with plain S2-Attn. Rank 0 writes, per case, the loss and the largest difference of every trainable parameter's
gradient (first step) and weight (after the last step) from the reference's.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from sp_worker import build, make_batch, run_cases  # noqa: E402

from longlora.adapters import base_model  # noqa: E402
from longlora.integration import enable_s2_attention  # noqa: E402
from longlora.sequence_parallel import (  # noqa: E402
    data_parallel_groups, enable_sequence_parallel, sequence_parallel_loss, shard_batch,
)

LR = 0.05
MOMENTUM = 0.9  # SGD with momentum: per-parameter optimizer state, sharded by the wrapper (Adam's update
# would turn fp32 rounding in near-zero gradients into lr-sized differences)
MAX_NORM = 0.5  # gradient clipping, below the tiny models' gradient norms (~1): the norm over the shards is tested


def _concat(batches: list[dict]) -> dict:
    """The data-parallel groups' batches as one batch of all their rows (the single process's batch)."""
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def _optimizer(params):
    return torch.optim.SGD([p for p in params if p.requires_grad], lr=LR, momentum=MOMENTUM)


def _layers(model):
    return base_model(model).model.layers


def wrap_fsdp2(model, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))  # parameters sharded over all ranks, as accelerate's FSDP does
    for layer in _layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = _optimizer(model.parameters())

    def full(p, grad: bool):
        t = p.grad if grad else p.detach()
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    def step():
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_NORM)
        optimizer.step()

    return model, optimizer, full, lambda loss: loss.backward(), step, optimizer.zero_grad


def wrap_fsdp1(model, world: int):
    import functools

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    layer_cls = type(_layers(model)[0])
    # use_orig_params: frozen base weights and trainable adapters share one flat parameter per layer
    wrapped = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({layer_cls}), use_orig_params=True,
                   device_id=torch.device("cpu"))
    optimizer = _optimizer(wrapped.parameters())
    names = {id(p): n for n, p in wrapped.named_parameters()}

    def gather(grad: bool) -> dict:
        with FSDP.summon_full_params(wrapped, with_grads=grad, writeback=False):
            return {names[id(p)]: (p.grad if grad else p.detach()).clone()
                    for p in wrapped.parameters() if p.requires_grad}

    def step():
        wrapped.clip_grad_norm_(MAX_NORM)
        optimizer.step()

    return wrapped, optimizer, gather, lambda loss: loss.backward(), step, optimizer.zero_grad


def wrap_deepspeed(model, world: int, stage: int):
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": MAX_NORM,
              "steps_per_print": 10 ** 9}
    if stage == 3:  # gather every parameter on use (no persistence shortcut for tiny tensors)
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    def full(p, grad: bool):
        return safe_get_full_grad(p) if grad else safe_get_full_fp32_param(p)

    return engine, optimizer, full, engine.backward, engine.step, lambda: None


def run_case(case: dict, rank: int, world: int) -> dict:
    sp = case["sp"]
    group, index, count = data_parallel_groups(sp)
    model = build(case["arch"], case.get("seed", 0), case.get("config", {}))
    ref = copy.deepcopy(model)
    enable_s2_attention(ref, group_size=case["group_size"])
    enable_sequence_parallel(model, group, group_size=case["group_size"])
    if case.get("checkpointing"):  # the halo exchange then runs again inside the backward
        for m in (model, ref):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref_opt = _optimizer(ref.parameters())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    initial = {n: p.detach().clone() for n, p in ref.named_parameters() if p.requires_grad}

    wrap = case["wrap"]
    if wrap == "fsdp2":
        engine, optimizer, full, backward, step, zero_grad = wrap_fsdp2(model, world)
    elif wrap == "fsdp1":
        engine, optimizer, full, backward, step, zero_grad = wrap_fsdp1(model, world)
    else:
        engine, optimizer, full, backward, step, zero_grad = wrap_deepspeed(model, world, {"zero2": 2,
                                                                                          "zero3": 3}[wrap])

    module = engine if wrap == "fsdp2" else engine.module  # fully_shard keeps the model; the others wrap it

    def read(grad: bool) -> dict:
        if wrap == "fsdp1":
            got = full(grad)
            return {n.replace("_fsdp_wrapped_module.", ""): t for n, t in got.items()}
        return {n: full(p, grad) for n, p in module.named_parameters() if p.requires_grad}

    losses, ref_losses, norms, grad_diff, max_grad = [], [], [], 0.0, 0.0
    for s in range(case.get("steps", 2)):
        gen = [torch.Generator().manual_seed(1000 * s + d) for d in range(count)]
        batches = [make_batch(case["layout"], case["length"], g) for g in gen]  # one per data-parallel group
        full_batch = _concat(batches)
        ref_loss = ref(**full_batch, use_cache=False).loss
        ref_loss.backward()

        shard = shard_batch(batches[index], module)
        n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)  # every group's scored tokens
        # each rank's share of the whole step's mean token loss, x world: the wrapper averages over all ranks
        loss = sequence_parallel_loss(engine, shard, scale=world, num_items=n_items)
        backward(loss)
        total = loss.detach().clone() / world
        dist.all_reduce(total)
        losses.append(float(total))
        ref_losses.append(float(ref_loss.detach()))
        if s == 0:
            grads = read(True)
            ref_grads = dict(ref.named_parameters())
            assert sorted(grads) == sorted(trainable), (sorted(grads)[:3], trainable[:3])
            for n, g in grads.items():
                r = ref_grads[n].grad
                grad_diff = max(grad_diff, float((g - r).abs().max()))
                max_grad = max(max_grad, float(r.abs().max()))
        step()
        zero_grad()
        ref_norm = float(torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.requires_grad], MAX_NORM))
        norms.append(ref_norm)
        ref_opt.step()
        ref_opt.zero_grad()
    weights = read(False)
    ref_params = dict(ref.named_parameters())
    weight_diff = max(float((w - ref_params[n].detach()).abs().max()) for n, w in weights.items())
    moved = min(float((ref_params[n].detach() - w).abs().max()) for n, w in initial.items())
    return {"case": case, "losses": losses, "ref_losses": ref_losses,
            "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
            "max_grad_diff": grad_diff, "max_grad": max_grad, "max_weight_diff": weight_diff,
            "min_weight_moved": moved, "ref_grad_norms": norms, "n_trainable": len(trainable), "groups": count}


def main():
    cases = json.loads(sys.argv[2])
    if any(c["wrap"].startswith("zero") for c in cases):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    run_cases(run_case, sys.argv[1], cases)


if __name__ == "__main__":
    main()
