"""One model's block of the allocation MILP, priced and solved on its own (HiGHS, directly or via OR-Tools).

Kept apart from the decomposition loop because it is what worker processes run: the decomposition
solves dozens of these per pass, and on a multi-core machine it farms them out (`BlockPool`).
Each block's OR-Tools model is built once per process and later solves only change the priced
objective coefficients of its replica columns. Each solve is bounded by a node count, never by a
clock, so its answer does not depend on load.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from optimizer import allocation_highs
from optimizer.allocation_formulation import Formulation
from optimizer.allocation_highs import HighsBlockProgram
from optimizer.allocation_ortools import SparseProgram

BLOCK_NODE_LIMIT = 2_000


@dataclass
class BlockResult:
    index: int
    x: np.ndarray
    bound: float  # proven lower bound of the priced block problem


class BlockModels:
    """Every block's model, built on first use and then only re-priced: in HiGHS itself where SciPy
    ships its bindings (optimizer.allocation_highs: its own dual bound, less CPU), else in OR-Tools."""

    def __init__(self, form: Formulation, direct: bool | None = None):
        self.form = form
        self.direct = allocation_highs.available() if direct is None else direct
        self._models: dict[int, HighsBlockProgram | SparseProgram] = {}

    def get(self, index: int) -> HighsBlockProgram | SparseProgram:
        model = self._models.get(index)
        if model is None:
            b = self.form.blocks[index]
            kind = HighsBlockProgram if self.direct else SparseProgram
            model = kind(b.cost, b.col_lb, b.col_ub, b.integrality, b.matrix, b.row_lb, b.row_ub)
            self._models[index] = model
        return model


def solve_block(models: BlockModels, index: int, prices: np.ndarray, relative_gap: float,
                cutoff: float | None = None) -> BlockResult:
    """The block's MILP at `prices`; `cutoff`: the priced cost of a column known for it (see solve_milp)."""
    form = models.form
    block = form.blocks[index]
    priced = form.priced_cost(block, prices)
    model = models.get(index)
    columns = np.arange(block.col_n.start, block.col_n.stop)
    model.set_cost(columns, priced[block.col_n])
    with quiet_stdout():
        if isinstance(model, HighsBlockProgram):
            res = model.solve_milp(relative_gap, node_limit=BLOCK_NODE_LIMIT, cutoff=cutoff)
        else:
            res = model.solve_milp(relative_gap, node_limit=BLOCK_NODE_LIMIT, small=True, cutoff=cutoff)
    if res.x is None:
        raise RuntimeError(f"model {block.model}: per-model MILP found no solution ({res.message})")
    x = res.x.copy()
    x[block.col_n] = np.rint(x[block.col_n])
    return BlockResult(index=index, x=x, bound=min(res.bound, float(priced @ x)))


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Silence C-level stdout: HiGHS prints some debug lines there whatever its options, and the CLI writes JSON."""
    try:
        fd = os.dup(1)
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        libc.fflush(None)
        os.dup2(devnull, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(fd, 1)
        os.close(fd)
        os.close(devnull)


_FORKED: tuple[BlockModels, float] | None = None


def _solve_forked(task: tuple[int, np.ndarray, float | None]) -> BlockResult:
    models, gap = _FORKED
    return solve_block(models, task[0], task[1], gap, task[2])


class BlockPool:
    """Solves blocks in forked worker processes when there are cores to spare, else in-process.

    Forked workers inherit the formulation, so a task is only (block index, prices). Results come
    back in submission order, so the caller's decisions do not depend on which worker was faster.
    """

    def __init__(self, form: Formulation, relative_gap: float, workers: int | None = None):
        self.form, self.gap = form, relative_gap
        self.models = BlockModels(form)
        self.workers = _usable_cpus() if workers is None else workers
        self._pool = None

    def solve(self, indices: list[int], prices: np.ndarray, deadline: float | None = None,
              cutoffs: dict[int, float] | None = None) -> Iterator[BlockResult]:
        """Results in the order of `indices`; with workers, every task is handed out before this returns.

        Past ``deadline`` (a ``time.perf_counter()`` instant) the results stop: no new in-process
        solve starts, and waiting for a worker's next result gives up at the deadline; the results
        other workers had finished by then still come (in order), rather than being thrown away
        behind one slow model. `cutoffs`: per block, the priced cost of a column known for it.
        """
        tasks = [(i, prices, (cutoffs or {}).get(i)) for i in indices]
        if self._pool is None and self.workers > 1 and len(tasks) > 1 and _can_fork():
            global _FORKED
            _FORKED = (self.models, self.gap)
            self._pool = multiprocessing.get_context("fork").Pool(self.workers)
        if self._pool is None or len(tasks) <= 1:
            return (solve_block(self.models, i, p, self.gap, c) for i, p, c in tasks
                    if deadline is None or time.perf_counter() <= deadline)
        return _until([self._pool.apply_async(_solve_forked, (task,)) for task in tasks], deadline)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> BlockPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _until(pending: list, deadline: float | None) -> Iterator[BlockResult]:
    for k, result in enumerate(pending):
        wait = None if deadline is None else max(deadline - time.perf_counter(), 0.0)
        try:
            yield result.get(wait)
        except multiprocessing.TimeoutError:
            yield from (later.get() for later in pending[k + 1:] if later.ready())
            return


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _can_fork() -> bool:
    """Fork only a single-threaded process: a forked copy of a threaded one (the operator's event
    loop, HTTP clients) can inherit a lock some other thread held and hang."""
    return "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1
