"""A torchrun worker that fails on purpose in one rank (tests/test_ranks.py): every rank joins a gloo
group and all-reduces once; rank --fail raises a ValueError that says so, the others then wait in a
barrier for it (and are stopped by torchrun)."""

import argparse

import torch
import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--fail", type=int, required=True)
args = parser.parse_args()
dist.init_process_group("gloo")
total = torch.ones(1)
dist.all_reduce(total)
if dist.get_rank() == args.fail:
    raise ValueError(f"rank {args.fail} of {int(total.item())} fails here on purpose")
dist.barrier()
dist.destroy_process_group()
