"""What a person watching a run sees: a live status line on a terminal, plain log lines elsewhere."""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass
class Snapshot:
    done: int
    limit: int | None
    standing: str  # champion and best first draw, in the words of `standing` below
    busy: int
    workers: int
    elapsed: float
    time_left: float | None  # None: unknown
    note: str = ""  # e.g. an LLM server that is down and being retried
    guard_left: int = 0  # guard runs queued or in flight (noise runs, re-runs, transfers)
    champion_id: str | None = None


def standing(champion_id: str | None, champion_value: float | None, champion_label: str,
             first_id: str | None, first_value: float | None, champion_on_seed: float | None = None) -> str:
    """The two numbers a run reports, one word each (README, "Reading the output"):
    champion: the guard's promoted variant, its re-run mean (or its first draw before re-runs),
    and, beside a re-run mean, its standing on the first draws' seed: the number each new first
    draw is compared with (a re-run mean averages other seeds);
    best first draw: the lowest single evaluation, which may be a lucky draw the guard refused."""
    on_seed = f"; {champion_on_seed:.4f} on the first draws' seed" if champion_on_seed is not None else ""
    champion = (f"champion {champion_value:.4f} ({champion_id}, {champion_label}{on_seed})"
                if champion_id is not None and champion_value is not None else "champion -")
    first = f"best first draw {first_value:.4f} ({first_id})" if first_id is not None else "best first draw -"
    return f"{champion} | {first}"


def clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def status_line(s: Snapshot) -> str:
    done = f"{s.done}/{s.limit}" if s.limit else str(s.done)
    left = clock(s.time_left) if s.time_left is not None else "?"
    guard = f" | guard runs left {s.guard_left}" if s.guard_left else ""
    return (f"evaluations {done}{guard} | {s.standing} | workers busy {s.busy}/{s.workers} | "
            f"elapsed {clock(s.elapsed)} | left ~{left}" + (f" | {s.note}" if s.note else ""))


class Display:
    """Log lines always; on a terminal also a live status line kept at the bottom (rich)."""

    def __init__(self, live: bool | None = None):
        self.live_enabled = sys.stdout.isatty() if live is None else live
        self._live = None
        self._text = None

    def __enter__(self):
        if self.live_enabled:
            from rich.console import Console
            from rich.live import Live
            from rich.text import Text

            self._text = Text("starting...")
            self._live = Live(self._text, console=Console(), refresh_per_second=2, transient=True)
            self._live.__enter__()
        return self

    def __exit__(self, *exc):
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None

    def log(self, line: str) -> None:
        if self._live is not None:
            self._live.console.print(line, markup=False, highlight=False)
        else:
            print(line, flush=True)

    def update(self, snapshot: Snapshot) -> None:
        if self._live is not None:
            from rich.text import Text

            self._live.update(Text(status_line(snapshot)))
