"""Executors turn a plan into launched processes (local) or jobs (Slurm, NeMo-Run).

Each implements base.Executor and is chosen by name from this registry; `get` imports only the
one chosen, so that a command pays for no other (NeMo-Run is an optional extra).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..status import StatusRow
    from ..store import Store
    from .base import Executor

# name (`phi4 run --executor NAME`, and `executor` in status.json) -> module, class
_REGISTRY = {
    "local": ("orchestrator.executors.local", "LocalExecutor"),
    "slurm": ("orchestrator.executors.slurm", "SlurmExecutor"),
    "nemo_run": ("orchestrator.executors.nemo_run", "NemoRunExecutor"),
}
NAMES = tuple(_REGISTRY)


def get(name: str) -> type[Executor]:
    """The executor class registered as `name` (KeyError for a name not registered)."""
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)


def status(store: Store, rows: list[StatusRow]) -> list[StatusRow]:
    """`phi4 status` rows, with what each executor knows of its stages that may not have
    ended (the records of the others are final: nothing is imported for them)."""
    from ..records import LIVE

    for name in sorted({r.executor for r in rows if r.state in LIVE and r.executor in NAMES}):
        rows = get(name).status(store, rows)
    return rows
