"""Worker for tests/test_tensor_parallel.py, launched with torchrun on gloo: trains small models for a
few AdamW steps under tensor parallelism (and FSDP2 over the data-parallel ranks when dp > 1) and,
in the same process, the same models as a single process on the whole global batch; writes the
per-step losses and gradient norms of both, the largest relative differences of the final weights,
and the result of a full-state-dict check, as JSON (rank 0).

usage: torchrun --nproc-per-node N tests/tp_worker.py --dp D --tp T --out result.json [--cases ...]
       [--fsdp] [--hsdp] [--ac] [--compile]   (N = D x T; the flags are for manual checks)
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict  # noqa: E402
from torch.distributed.tensor import DTensor, Replicate, Shard  # noqa: E402

from colossus.config import ModelConfig, TrainConfig  # noqa: E402
from colossus.layout import Layout  # noqa: E402
from colossus.models.grok import build_model  # noqa: E402
from colossus.models.moe import MoE  # noqa: E402
from colossus.parallel.runtime import exit_without_teardown  # noqa: E402
from colossus.parallel.mesh import build_mesh  # noqa: E402
from colossus.parallel.parallelize import apply_fsdp, apply_recompute, clip_grad_norm  # noqa: E402
from colossus.parallel.tensor import apply_tensor_parallel  # noqa: E402
from colossus.train.loss import cross_entropy, loss_context, training_loss  # noqa: E402
from colossus.train.optim import build_optimizer, build_scheduler  # noqa: E402

MOE = ModelConfig(name="tp-moe", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
                  n_experts=4, top_k=2, vocab_size=256, seq_len=32, embedding_multiplier=8.0)
DENSE = dataclasses.replace(MOE, name="tp-dense", n_experts=1, top_k=1, ffn_type="swiglu")
TRAIN = TrainConfig(steps=5, global_batch=4, micro_batch=4, lr=3e-3, warmup_steps=2, grad_clip=1.0, threads=1)
STEPS = 5
ODD = 7  # a sequence length that tp = 2 does not divide
SEED = 7

# name -> (model config, sequence_parallel, vocab_parallel)
CASES = {
    "moe": (MOE, False, False),
    "moe-sp-vp": (MOE, True, True),
    "dense": (DENSE, False, False),
    "dense-sp-vp": (DENSE, True, True),
    "moe-sp": (MOE, True, False),
    "dense-sp": (DENSE, True, False),
    "dense-vp": (DENSE, False, True),
    "dense-untied-sp-vp": (dataclasses.replace(DENSE, tie_embeddings=False), True, True),
    "moe-pre-sp-vp": (dataclasses.replace(MOE, norm="pre", attn_softcap=0.0), True, True),
}


def batches(cfg: ModelConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(SEED)
    out = []
    for _ in range(STEPS):
        data = torch.randint(0, cfg.vocab_size, (TRAIN.global_batch, cfg.seq_len + 1), generator=g)
        out.append((data[:, :-1], data[:, 1:]))
    return out


def reference(cfg: ModelConfig, dp: int) -> tuple[list[float], list[float], list[float], dict[str, torch.Tensor]]:
    """Single process: the global batch in dp contiguous chunks, loss = mean of the chunk losses."""
    model = build_model(cfg, seed=SEED)
    optimizer = build_optimizer(model, TRAIN, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, TRAIN)
    losses, ces, norms = [], [], []
    for x, y in batches(cfg):
        loss_sum = ce_sum = 0.0
        for xs, ys in zip(x.chunk(dp), y.chunk(dp)):
            loss = training_loss(model(xs), ys, cfg)
            (loss.total / dp).backward()
            loss_sum += loss.total.item() / dp
            ce_sum += loss.cross_entropy.item() / dp
        norms.append(clip_grad_norm(list(model.parameters()), TRAIN.grad_clip).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(loss_sum)
        ces.append(ce_sum)
    return losses, ces, norms, {k: v.detach().clone() for k, v in model.state_dict().items()}


def build_mixed_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    """build_optimizer, with each parameter group split into DTensor and plain parameters: torch's
    foreach AdamW cannot mix the two in one group, and tensor parallelism without FSDP leaves the
    router (and, without sequence or vocabulary parallelism, norms and embedding) plain."""
    optimizer = build_optimizer(model, TRAIN, torch.device("cpu"))
    groups = []
    for group in optimizer.param_groups:
        for want in (True, False):
            params = [p for p in group["params"] if isinstance(p, DTensor) == want]
            if params:
                groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    if len(groups) == len(optimizer.param_groups):
        return optimizer
    return torch.optim.AdamW(groups, lr=TRAIN.lr, betas=(TRAIN.beta1, TRAIN.beta2), eps=1e-8, foreach=True)


def dp_mean(value: torch.Tensor, group) -> float:
    total = value.detach().clone()
    if group is not None:
        dist.all_reduce(total, group=group)
        total /= dist.get_world_size(group)
    return total.item()


def check_structure(model: torch.nn.Module, sp: bool, vp: bool) -> list[str]:
    """Where the weights live right after apply_tensor_parallel (before FSDP)."""
    problems = []

    def expect(name: str, placement) -> None:
        param = model.get_parameter(name)
        got = param.placements if isinstance(param, DTensor) else "plain"
        if got != (placement,):
            problems.append(f"{name}: {got}, expected {placement}")

    for i, layer in model.layers.items():
        for w, placement in (("wq", Shard(0)), ("wk", Shard(0)), ("wv", Shard(0)), ("wo", Shard(1))):
            expect(f"layers.{i}.attention.{w}.weight", placement)
        if isinstance(layer.ffn, MoE):
            for w, placement in (("w_in", Shard(2)), ("w_up", Shard(2)), ("w_out", Shard(1))):
                if getattr(layer.ffn.experts, w) is not None:
                    expect(f"layers.{i}.ffn.experts.{w}", placement)
            if isinstance(layer.ffn.router.weight, DTensor):
                problems.append("the router should stay a plain (replicated) parameter")
        if sp:
            for name in ("attention_norm", "ffn_norm"):
                expect(f"layers.{i}.{name}.weight", Replicate())
    if vp:
        expect("embedding.weight", Shard(0))
    return problems


def parallel(cfg: ModelConfig, layout: Layout, mesh, sp: bool, vp: bool, fsdp: bool, extra: argparse.Namespace) -> dict:
    model = build_model(cfg, seed=SEED)
    apply_tensor_parallel(model, mesh.tp, sequence_parallel=sp, vocab_parallel=vp)
    problems = check_structure(model, sp, vp)
    seen_seq = []
    model.layers["1"].register_forward_pre_hook(lambda m, args: seen_seq.append(args[0].shape[1]))
    if extra.ac:
        apply_recompute(model, "full")
    if extra.compile:
        for layer in model.layers.values():
            layer.compile()
    if fsdp:
        apply_fsdp(model, layout, mesh, torch.device("cpu"))
        optimizer = build_optimizer(model, TRAIN, torch.device("cpu"))
    else:
        optimizer = build_mixed_optimizer(model)
    scheduler = build_scheduler(optimizer, TRAIN)
    dp_rank = mesh.dp.get_local_rank()
    dp_group = mesh.dp.get_group() if layout.dp > 1 else None
    losses, ces, norms = [], [], []
    for x, y in batches(cfg):
        xs, ys = x.chunk(layout.dp)[dp_rank], y.chunk(layout.dp)[dp_rank]
        out = model(xs)
        if isinstance(out.logits, DTensor) != vp:
            problems.append(f"logits {type(out.logits).__name__}: vocabulary-sharded DTensor logits exactly when vp")
        with loss_context(out.logits):
            loss = training_loss(out, ys, cfg)
            loss.total.backward()
        if isinstance(loss.total, DTensor) or isinstance(loss.cross_entropy, DTensor):
            problems.append("the loss came out as a DTensor")
        if torch.ops.aten._log_softmax.default in DTensor._op_dispatcher._custom_op_handlers:
            problems.append("loss_parallel was left enabled after the backward")
        norms.append(clip_grad_norm(list(model.parameters()), TRAIN.grad_clip).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(dp_mean(loss.total, dp_group))
        ces.append(dp_mean(loss.cross_entropy, dp_group))
    expected_seq = cfg.seq_len // layout.tp if sp else cfg.seq_len
    if set(seen_seq) != {expected_seq}:
        problems.append(f"blocks saw sequence lengths {set(seen_seq)}, expected {expected_seq}")

    # A length that tp does not divide (generation) gives the full logits (gathered if they are
    # vocabulary-sharded), and the evaluation's cross-entropy of them.
    x, y = batches(cfg)[0]
    with torch.no_grad():
        logits = model(x[:2, :ODD]).logits
        with loss_context(logits):
            odd_ce = cross_entropy(logits, y[:2, :ODD]).item()
        logits = logits.full_tensor() if isinstance(logits, DTensor) else logits
    if logits.shape != (2, ODD, cfg.vocab_size):
        problems.append(f"logits of an odd length: {tuple(logits.shape)}")

    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    return dict(losses=losses, ces=ces, norms=norms, model_sd=model_sd, optim_sd=optim_sd, logits=logits,
                odd_ce=odd_ce, problems=problems)


def shapes(tree) -> dict:
    """Flattened key -> shape (tensors) or type name (anything else) of a nested state dict."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = tuple(value.shape)
        else:
            flat[prefix] = type(value).__name__
    walk("", tree)
    return flat


def optim_layout(state: dict) -> tuple:
    """What of an optimizer state dict must not depend on the layout: per-parameter state keys and
    shapes, and the parameter names (param groups may be split differently)."""
    return shapes(state["state"]), sorted(name for group in state["param_groups"] for name in group["params"])


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dp", type=int, required=True)
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 over the dense mesh even when dp = 1")
    parser.add_argument("--hsdp", action="store_true", help="the dp ranks replicate (HSDP's outer dim) instead of shard")
    parser.add_argument("--ac", action="store_true", help="activation checkpointing of every block")
    parser.add_argument("--compile", action="store_true", help="torch.compile every block")
    args = parser.parse_args()
    # A rank killed by a signal (SIGABRT from "terminate called ..." in a gloo thread or a kernel,
    # SIGSEGV) prints every thread's Python stack to its own stderr first: where it died.
    faulthandler.enable(all_threads=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    if args.hsdp:
        layout = Layout(dp_replicate=args.dp, dp_shard=1, tp=args.tp, precision="fp32")
    else:
        layout = Layout(dp_shard=args.dp, tp=args.tp, precision="fp32")
    mesh = build_mesh(layout, "cpu")
    results = {}
    plain_state: dict[str, tuple] = {}
    rank = dist.get_rank()
    try:
        for name in args.cases:
            cfg, sp, vp = CASES[name]
            start = time.perf_counter()
            got = parallel(cfg, layout, mesh, sp, vp, fsdp=args.fsdp or layout.dp > 1, extra=args)
            problems = [None] * dist.get_world_size()
            dist.all_gather_object(problems, got["problems"])
            if rank != 0:
                continue  # rank 0 alone compares (the others wait for it in the next case's collectives)
            ref_losses, ref_ces, ref_norms, ref_weights = reference(cfg, args.dp)
            # The trained single-process model's logits, against the parallel generation-style call.
            ref_model = build_model(cfg, seed=SEED)
            ref_model.load_state_dict(ref_weights)
            x, y = batches(cfg)[0]
            with torch.no_grad():
                ref_logits = ref_model(x[:2, :ODD]).logits
                ref_odd_ce = cross_entropy(ref_logits, y[:2, :ODD]).item()
            if cfg.name not in plain_state:
                # The plain model's state dicts, for keys and shapes (the optimizer after a step, so it has state).
                plain = build_model(cfg, seed=SEED)
                plain_opt = build_optimizer(plain, TRAIN, torch.device("cpu"))
                x, y = batches(cfg)[0]
                training_loss(plain(x), y, cfg).total.backward()
                plain_opt.step()
                plain_state[cfg.name] = get_state_dict(plain, plain_opt, options=StateDictOptions(full_state_dict=True))
            plain_model_sd, plain_optim_sd = plain_state[cfg.name]
            results[name] = dict(
                ref_losses=ref_losses, losses=got["losses"], ref_norms=ref_norms, norms=got["norms"],
                loss_rel=max(rel(a, b) for a, b in zip(got["losses"], ref_losses)),
                ce_rel=max(rel(a, b) for a, b in zip(got["ces"], ref_ces)),
                norm_rel=max(rel(a, b) for a, b in zip(got["norms"], ref_norms)),
                weight_rel=max(((got["model_sd"][k].float() - v.float()).norm() / v.float().norm()).item()
                               for k, v in ref_weights.items()),
                logits_rel=((got["logits"] - ref_logits).norm() / ref_logits.norm()).item(),
                odd_ce_rel=rel(got["odd_ce"], ref_odd_ce),
                model_keys_match=shapes(got["model_sd"]) == shapes(plain_model_sd),
                optim_keys_match=optim_layout(got["optim_sd"]) == optim_layout(plain_optim_sd),
                full_tensors=all(not isinstance(v, DTensor) for v in got["model_sd"].values()),
                problems=[f"rank {r}: {p}" for r, ps in enumerate(problems) for p in ps],
                seconds=time.perf_counter() - start,
            )
    except Exception:
        # Report and leave at once: the other ranks may be waiting in a collective; torchrun stops them.
        error = f"rank {rank}: {traceback.format_exc()}"
        print(error, file=sys.stderr, flush=True)
        if rank == 0:
            with open(args.out, "w") as f:
                json.dump({"error": error}, f, indent=1)
        os._exit(1)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    # Ranks 1..N-1 get here while rank 0 is still comparing: wait for it, so that no rank tears its
    # connections down while a peer may still be in (or entering) a collective with it (as
    # colossus.parallel.runtime.Runtime.close does after a clean finish; the error path above exits
    # at once instead).
    dist.barrier()
    dist.destroy_process_group()
    exit_without_teardown(0)  # the mesh's gloo groups outlive destroy_process_group

if __name__ == "__main__":
    main()
