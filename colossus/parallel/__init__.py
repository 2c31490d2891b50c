"""Parallelism applied to a plain model from outside: layout and mesh, tensor, expert and fully
sharded data parallelism, activation checkpointing and compilation (torch.distributed only)."""
