"""StepBatches: a step's micro-batches are the same whatever `data.num_workers`; with workers
they are read in loader processes."""

from __future__ import annotations

import os

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
