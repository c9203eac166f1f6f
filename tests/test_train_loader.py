"""StepBatches: a step's micro-batches are the same whatever `data.num_workers`; with workers
they are read in loader processes."""

from __future__ import annotations

import os
import signal

import torch

from phi4core.train.data import StepBatches


class Probe:
    """Sample i holds i, and the process that read it."""

    def __len__(self) -> int:
        return 10_000

    def __getitem__(self, i: int) -> dict:
        return {"tokens": torch.tensor([i, i + 1]), "pid": torch.tensor(os.getpid())}


def _steps(workers: int, dp_rank: int) -> list[list[dict]]:
    loader = StepBatches(Probe(), 3, 7, global_batch=8, micro=2, dp_rank=dp_rank, dp=2,
                         block_mask=False, num_workers=workers)
    try:
        return [loader.next_step() for _ in range(4)]
    finally:
        loader.close()


def test_same_micro_batches_for_any_worker_count():
    for dp_rank in (0, 1):
        alone, workers = _steps(0, dp_rank), _steps(2, dp_rank)
        samples = [[mb["tokens"][:, 0].tolist() for mb in step] for step in alone]
        assert samples == [[mb["tokens"][:, 0].tolist() for mb in step] for step in workers]
        # step s holds samples [8s, 8s+8): this rank's half, in micro-batches of 2
        first = 3 * 8 + 4 * dp_rank
        assert samples[0] == [[first, first + 1], [first + 2, first + 3]]
        assert samples[-1][-1] == [6 * 8 + 4 * dp_rank + 2, 6 * 8 + 4 * dp_rank + 3]
        assert {int(p) for step in alone for mb in step for p in mb["pid"]} == {os.getpid()}
        readers = {int(p) for step in workers for mb in step for p in mb["pid"]}
        assert len(readers) == 2 and os.getpid() not in readers


def test_loader_processes_outlive_signals_sent_to_the_group():
    """Ctrl-C or a preemption signal reaching the loader processes does not end them: the
    trainer, which decides what the signal means, goes on reading its batches."""
    loader = StepBatches(Probe(), 0, 6, global_batch=4, micro=2, dp_rank=0, dp=1,
                         block_mask=False, num_workers=2)
    try:
        first = loader.next_step()
        readers = {int(p) for mb in first for p in mb["pid"]}
        assert os.getpid() not in readers
        for pid in readers:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
                os.kill(pid, sig)
        rest = [loader.next_step() for _ in range(5)]
    finally:
        loader.close()
    assert [mb["tokens"][:, 0].tolist() for mb in rest[-1]] == [[20, 21], [22, 23]]
