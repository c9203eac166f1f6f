"""What `phi4 run` shows while it works: a live table on a terminal, plain lines otherwise
(CI logs, pipes), so a log file gets one line per state change instead of redraw noise."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TextIO

from .records import State

_REFRESH_SECONDS = 0.25
_PLAIN_PROGRESS_SECONDS = 30.0  # a log line per running stage at most this often
_COLOURS = {State.RUNNING: "cyan", State.SUCCEEDED: "green", State.UP_TO_DATE: "green",
            State.FAILED: "red", State.BLOCKED: "yellow", State.CANCELLED: "magenta",
            State.PREEMPTED: "magenta", State.WAITING: "blue", State.PENDING: "white"}
_UNDERWAY = (State.RUNNING, State.WAITING, State.PENDING)


@dataclass
class Row:
    name: str
    state: State = State.PENDING
    detail: str = ""
    started: float | None = None
    ended: float | None = None

    def elapsed(self) -> str:
        if self.started is None:
            return ""
        took = (self.ended or time.time()) - self.started
        if took < 60:
            return f"{took:.1f}s"
        seconds = int(took)
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Display:
    def __init__(self, names: list[str], stream: TextIO | None = None, live: bool | None = None):
        self.stream = stream or sys.stdout
        self.rows = {name: Row(name) for name in names}
        self.live = self.stream.isatty() if live is None else live
        self._live = None
        self._last = 0.0
        self._printed: dict[str, float] = {}
        if self.live:
            from rich.console import Console
            from rich.live import Live

            # No refresh thread: the executor stays single-threaded (see executors/local.py).
            self._live = Live(self._table(), console=Console(file=self.stream),
                              auto_refresh=False, transient=False)
            self._live.start()

    def event(self, name: str, state: State, detail: str = "") -> None:
        row = self.rows.setdefault(name, Row(name))
        if state == State.RUNNING and row.started is None:
            row.started = time.time()
        if state not in _UNDERWAY:
            row.ended = time.time()
        row.state, row.detail = state, detail
        if self._live is None:
            took = f" ({row.elapsed()})" if row.ended and row.started else ""
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {state}{took}"
                  + (f"  {detail}" if detail else ""), file=self.stream, flush=True)
        else:
            self.refresh(force=True)

    def progress(self, name: str, detail: str) -> None:
        """Step/loss of a running stage: redrawn live; in plain mode an occasional line."""
        row = self.rows.get(name)
        if row is None or row.detail == detail:
            return
        row.detail = detail
        if self._live is not None:
            self.refresh()
        elif time.time() - self._printed.get(name, 0.0) >= _PLAIN_PROGRESS_SECONDS:
            self._printed[name] = time.time()
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {detail} ({row.elapsed()})",
                  file=self.stream, flush=True)

    def refresh(self, force: bool = False) -> None:
        if self._live is None or (not force and time.time() - self._last < _REFRESH_SECONDS):
            return
        self._last = time.time()
        self._live.update(self._table(), refresh=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.update(self._table(), refresh=True)
            self._live.stop()

    def _table(self):
        from rich.markup import escape
        from rich.table import Table

        table = Table(box=None, pad_edge=False)
        for column in ("stage", "state", "time", ""):
            table.add_column(column)
        for row in self.rows.values():
            colour = _COLOURS.get(row.state, "white")
            table.add_row(row.name, f"[{colour}]{row.state}[/]", row.elapsed(), escape(row.detail))
        return table
