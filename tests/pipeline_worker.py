"""Run by tests/test_pipeline.py under torchrun with 2 ranks: one pipelined forward and backward of a
tied-embedding MoE (schedule 1f1b, or zbv whose V puts both ends on rank 0), and the same step in one
process on every rank; writes how far the tied embedding's gradients are from one process's.

usage: torchrun --nproc-per-node 2 tests/pipeline_worker.py SCHEDULE RESULT.json
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from colossus.layout import Layout
from colossus.modelconfig import ModelConfig
from colossus.models.grok import build_model
from colossus.parallel.init import materialize
from colossus.parallel.mesh import build_mesh
from colossus.parallel.parallelize import parallelize
from colossus.parallel.pipeline import Pipeline
from colossus.parallel.runtime import exit_without_teardown
from colossus.train.step import forward_backward

SEED = 3
MODEL = ModelConfig(name="micro", n_layers=4, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96, n_experts=4,
                    top_k=2, vocab_size=256, seq_len=32, embedding_multiplier=8.0)


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def main(schedule: str, result_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    tokens = torch.randint(0, MODEL.vocab_size, (4, MODEL.seq_len + 1), generator=torch.Generator().manual_seed(1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    device = torch.device("cpu")

    reference = build_model(MODEL, "cpu", seed=SEED)  # one process: the whole model, the tied weight used twice
    forward_backward(reference, x, y, 1, device, "fp32")
    expected = reference.embedding.weight.grad

    layout = Layout(pp=2, vpp=2 if schedule == "zbv" else 1, pp_schedule=schedule, mbs=1, gbs=4, precision="fp32")
    mesh = build_mesh(layout, "cpu")
    model = build_model(MODEL, "meta")
    stages = parallelize(model, layout, mesh, device)
    materialize(model, device, SEED)
    pipeline = Pipeline(model, stages, layout, mesh.pp, device)
    forward_backward(model, x, y, 1, device, "fp32", pipeline=pipeline)

    grads = [local(p.grad) for p in (model.embedding.weight if model.embedding is not None else None,
                                     model.output.weight if model.output is not None else None) if p is not None]
    differences = [float((g - expected).norm() / expected.norm()) for g in grads]
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, {"rank": rank, "differences": differences,
                                     "grads": [g.tolist() for g in grads]})
    if rank == 0:
        held = [torch.tensor(g) for r in results for g in r["grads"]]
        report = {"relative_difference": max(d for r in results for d in r["differences"]),
                  "gradient_norm": float(expected.norm()), "copies": len(held),
                  "copies_equal": len(held) == 2 and torch.equal(held[0], held[1])}
        with open(result_path, "w") as file:
            json.dump(report, file)
    dist.barrier()
    dist.destroy_process_group()
    exit_without_teardown(0)  # the mesh's gloo groups outlive destroy_process_group


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
