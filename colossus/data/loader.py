"""Batches of (inputs, targets) from a flat token stream, deterministic and resumable.

The stream is cut into windows of seq_len + 1 tokens starting every seq_len tokens (so the
target of one window's last position is the next window's first input, and no token is wasted).
Each epoch visits the windows in a seeded permutation; each optimizer step takes the next
global_batch of them, and data-parallel rank r takes the r-th contiguous slice. The batches of
a step over all ranks are therefore exactly the single-process batch, whatever the layout.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from colossus.errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor]
_STATE_KEYS = ("epoch", "cursor", "seed", "n_windows", "global_batch")


def count_windows(n_tokens: int, seq_len: int) -> int:
    return max(0, (n_tokens - 1) // seq_len)


def _rank_slice(batch: int, dp_rank: int, dp_size: int, what: str) -> slice:
    """The contiguous part of a `batch`-sized global batch that belongs to dp_rank."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
    if batch <= 0 or batch % dp_size:
        raise UserError(f"{what}={batch} must be a positive multiple of the {dp_size} data-parallel ranks; pick a multiple of {dp_size}")
    per_rank = batch // dp_size
    return slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)


def gather_windows(tokens: np.ndarray, window_ids: np.ndarray, seq_len: int) -> Batch:
    """Inputs and targets, int64 [len(window_ids), seq_len], read with one fancy-indexing gather."""
    offsets = window_ids.astype(np.int64)[:, None] * seq_len + np.arange(seq_len + 1)
    windows = np.asarray(tokens[offsets])
    return torch.from_numpy(windows[:, :-1].astype(np.int64)), torch.from_numpy(windows[:, 1:].astype(np.int64))


class TokenLoader:
    """Shuffled training batches for one data-parallel rank; see the module docstring."""

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        global_batch: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
    ) -> None:
        if seed < 0:
            raise UserError(f"train.seed={seed} must be >= 0 (it seeds the data order)")
        self.tokens = tokens
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.seed = seed
        self.n_windows = count_windows(len(tokens), seq_len)
        if self.n_windows == 0:
            raise UserError(f"the training data has {len(tokens)} tokens, fewer than model.seq_len + 1 = {seq_len + 1}; add data or lower model.seq_len")
        self._mine = _rank_slice(global_batch, dp_rank, dp_size, "train.global_batch")
        self.epoch = 0
        self.cursor = 0  # position in this epoch's permutation of the next window to use
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, permutation), recomputed per epoch

    def _permutation(self) -> np.ndarray:
        if self._perm is None or self._perm[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm = (self.epoch, rng.permutation(self.n_windows))
        return self._perm[1]

    def _next_global_ids(self, need: int) -> np.ndarray:
        """The next `need` window ids of the shuffled stream, advancing epochs as needed."""
        parts = []
        while need:
            take = min(need, self.n_windows - self.cursor)
            parts.append(self._permutation()[self.cursor : self.cursor + take])
            self.cursor += take
            need -= take
            if self.cursor == self.n_windows:
                self.epoch, self.cursor = self.epoch + 1, 0
        return np.concatenate(parts)

    def next_batch(self) -> Batch:
        """This rank's (inputs, targets) for the next step, int64 [global_batch // dp_size, seq_len]."""
        return gather_windows(self.tokens, self.next_window_ids(), self.seq_len)

    def next_window_ids(self) -> np.ndarray:
        """This rank's window ids for the next step (advancing the position): the cheap half of
        next_batch, so that a prefetcher can hand the gather to another thread."""
        return self._next_global_ids(self.global_batch)[self._mine]

    def next_shared_batch(self, participant: int, participants: int) -> Batch:
        """This rank's batch of a step shared by `participants` replica groups that each read
        global_batch windows (this loader's batch is its group's): the step takes the next
        participants x global_batch windows of the stream, and group `participant` the participant-th
        global_batch of them. A group that is missing from a step leaves no hole: the groups that are
        there read the windows that follow, and the stream continues after them."""
        if not 0 <= participant < participants:
            raise ValueError(f"participant {participant} is outside [0, {participants})")
        ids = self._next_global_ids(self.global_batch * participants)
        ours = ids[participant * self.global_batch:(participant + 1) * self.global_batch]
        return gather_windows(self.tokens, ours[self._mine], self.seq_len)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "n_windows": self.n_windows, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where a saved loader stopped. The position counts windows, not steps, so a
        resumed run may even change global_batch; a different seed or data cannot continue."""
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise UserError(f"the checkpoint's data-loader state lacks {', '.join(missing)}; it was not written by this loader")
        if int(state["seed"]) != self.seed or int(state["n_windows"]) != self.n_windows:
            raise UserError(
                f"the data changed since the checkpoint (seed {state['seed']} -> {self.seed}, "
                f"windows {state['n_windows']} -> {self.n_windows}); resume with the same data, model.seq_len and train.seed"
            )
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor < self.n_windows:
            raise UserError(f"the checkpoint's data-loader position (epoch {epoch}, cursor {cursor}) is invalid; the checkpoint is damaged")
        self.epoch, self.cursor = epoch, cursor

    def close(self) -> None:
        """Nothing to release (the prefetching loader has a thread to stop)."""


class PrefetchingLoader:
    """A TokenLoader whose next `depth` batches are gathered (and, for a GPU, pinned) by a background
    thread while the current step runs. It is the same loader to its caller: the same batches in
    the same order, and state_dict() is the position after the last batch handed out, not after the
    ones built ahead, so a checkpoint resumes exactly. The ids are drawn here, on the caller's
    thread; the thread only copies tokens (numpy and pin_memory release the GIL while they copy)."""

    def __init__(self, loader: TokenLoader, depth: int = 2, pin_memory: bool = False) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth {depth} must be >= 1 (use the TokenLoader itself for none)")
        self.loader = loader
        self.depth = depth
        self.pin_memory = pin_memory
        self._ahead: deque[tuple[Future, dict[str, int]]] = deque()  # (batch being built, position after it)
        self._position = loader.state_dict()
        # No torch.set_num_threads(1) here (torch's DataLoader does it in its pin thread): it would also
        # set the thread count that every thread started later begins with.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="colossus-prefetch")

    def _build(self, window_ids: np.ndarray) -> Batch:
        inputs, targets = gather_windows(self.loader.tokens, window_ids, self.loader.seq_len)
        if self.pin_memory:  # page-locked, so that the copy to the GPU can overlap compute (non_blocking)
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        return inputs, targets

    def _fill(self) -> None:
        while len(self._ahead) < self.depth:
            ids = self.loader.next_window_ids()
            self._ahead.append((self._worker.submit(self._build, ids), self.loader.state_dict()))

    def next_batch(self) -> Batch:
        self._fill()
        future, self._position = self._ahead.popleft()
        self._fill()  # start the next one before waiting on this one
        return future.result()

    def state_dict(self) -> dict[str, int]:
        return dict(self._position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._drop_ahead()
        self.loader.load_state_dict(state)
        self._position = self.loader.state_dict()

    def _drop_ahead(self) -> None:
        for future, _ in self._ahead:
            future.cancel()
        for future, _ in self._ahead:
            if not future.cancelled():
                future.exception()  # wait, so no copy is still running; its error does not matter now
        self._ahead.clear()
        self.loader.load_state_dict(self._position)

    def close(self) -> None:
        """Stop the thread; batches built ahead are dropped (the position stays where the caller is)."""
        self._drop_ahead()
        self._worker.shutdown(wait=True)


def make_loader(tokens: np.ndarray, seq_len: int, global_batch: int, dp_rank: int = 0, dp_size: int = 1,
                seed: int = 0, prefetch: int = 0, pin_memory: bool = False) -> TokenLoader | PrefetchingLoader:
    """The training loader: plain, or with `prefetch` batches built ahead in a background thread."""
    loader = TokenLoader(tokens, seq_len, global_batch, dp_rank, dp_size, seed)
    return PrefetchingLoader(loader, prefetch, pin_memory) if prefetch > 0 else loader


def validation_batches(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    n_batches: int,
    dp_rank: int = 0,
    dp_size: int = 1,
) -> list[Batch]:
    """This rank's share of the first n_batches * batch_size validation windows, in order and
    unshuffled, so every evaluation scores the same text. With fewer windows, fewer batches (or
    one smaller batch, still divisible by dp_size so every rank gets the same shapes)."""
    mine = _rank_slice(batch_size, dp_rank, dp_size, "validation batch size")
    available = count_windows(len(tokens), seq_len)
    if available >= batch_size:
        n_batches = max(1, min(n_batches, available // batch_size))
    else:
        batch_size = available - available % dp_size
        if batch_size == 0:
            raise UserError(
                f"the validation split has {len(tokens)} tokens, not {dp_size} windows of model.seq_len + 1 = {seq_len + 1}; "
                "add data or raise data.val_fraction"
            )
        n_batches = 1
        mine = _rank_slice(batch_size, dp_rank, dp_size, "validation batch size")
    batches = []
    for index in range(n_batches):
        ids = np.arange(index * batch_size, (index + 1) * batch_size)[mine]
        batches.append(gather_windows(tokens, ids, seq_len))
    return batches
