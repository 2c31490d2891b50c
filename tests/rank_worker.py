"""A torchrun worker that fails on purpose in one rank (tests/test_ranks.py): every rank joins a gloo
group and all-reduces once; rank --fail raises a ValueError that says so, the others then wait in a
barrier for it (and are stopped by torchrun)."""

import argparse
import os
import sys
import traceback

import torch
import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--fail", type=int, required=True)
args = parser.parse_args()
dist.init_process_group("gloo")
total = torch.ones(1)
dist.all_reduce(total)
if dist.get_rank() == args.fail:
    try:
        raise ValueError(f"rank {args.fail} of {int(total.item())} fails here on purpose")
    except ValueError:
        # Exit 1 at once, as an uncaught exception would, but without the interpreter's teardown: with
        # the group alive and its peers being stopped by torchrun, gloo's threads can abort that teardown
        # ("terminate called without an active exception", SIGABRT; seen once in a loaded full suite).
        # Destroying the group first is no better here: the peers then fail at the same moment.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
dist.barrier()
dist.destroy_process_group()
