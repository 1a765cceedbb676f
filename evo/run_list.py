"""Which runs exist and what each is doing: `evo runs [DIR]`, and the state in `evo status`.

A run is running while its engine holds RUN_DIR/engine.lock (evo/lock.py: the kernel drops the
lock with the process, so a kill -9 never leaves a run that looks alive). Otherwise the
checkpoint says how the engine last stopped: on its own (finished: a limit reached, nothing left
to breed), or cancelling work that stays queued (stopped: Ctrl-C, max_hours, an outage). A
checkpoint with no stop recorded belongs to an engine that was killed or crashed; `evo resume`
continues any of them.
"""

from __future__ import annotations

import time
from pathlib import Path

from evo.lock import holder
from evo.progress import clock
from evo.report import champion_of, champion_score, load_population
from evo.store import POPULATION, RunStore, StoreError

RUNNING, FINISHED, STOPPED, RESUMABLE, UNREADABLE = "running", "finished", "stopped", "resumable", "unreadable"


def run_state(run_dir: str | Path, state: dict) -> dict:
    """{"state", "reason"} and, while running, the engine's "pid" and "host"; `state` is the
    checkpoint's engine state (RunStore.load)."""
    engine = holder(run_dir)
    if engine is not None:
        where = f" on {engine['host']}" if engine.get("host") else ""
        return {"state": RUNNING, "reason": f"engine pid {engine.get('pid', '?')}{where}",
                "pid": engine.get("pid"), "host": engine.get("host")}
    stop = state.get("stop")
    if stop is None:
        return {"state": RESUMABLE, "reason": "no stop recorded: the engine was killed or crashed"}
    return {"state": STOPPED if stop["hard"] else FINISHED, "reason": stop["reason"], "stopped_at": stop.get("at")}


def run_summary(run_dir: str | Path) -> dict:
    """One line's worth of facts about a run directory."""
    store = RunStore(run_dir)
    info = store.run_info()
    loaded = store.load()
    population, counters, guard = load_population(store, loaded)
    state = loaded[1]
    champion, stats = champion_of(population, guard)
    summary = {"run": str(store.dir), **run_state(store.dir, state), "evaluations": counters.evaluations,
               "champion": None, "val_bpb": None, "val_bpb_is": None, "created": info.get("created"),
               "updated": (store.dir / POPULATION).stat().st_mtime}
    if champion is not None:
        value, label = champion_score(champion, stats)
        summary.update(champion=champion.id, val_bpb=value, val_bpb_is=label)
    return summary


def list_runs(folder: str | Path) -> list[dict]:
    """Every run directory in `folder` (or `folder` itself if it is one), by name. A run that
    cannot be read is listed as unreadable with the reason, never skipped in silence."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StoreError(f"no folder {folder}: runs live in the config's run.dir (default: runs), "
                         "so give that folder, e.g. `evo runs path/to/runs`")
    candidates = [folder] if (folder / "run.json").is_file() else sorted(p for p in folder.iterdir() if (p / "run.json").is_file())
    out = []
    for run_dir in candidates:
        try:
            out.append(run_summary(run_dir))
        except (StoreError, OSError, ValueError, KeyError) as e:
            out.append({"run": str(run_dir), "state": UNREADABLE, "reason": str(e), "evaluations": None,
                        "champion": None, "val_bpb": None, "val_bpb_is": None, "created": None, "updated": None})
    return out


def runs_text(folder: str | Path, now: float | None = None) -> str:
    runs = list_runs(folder)
    if not runs:
        return f"no runs in {folder} (a run directory holds run.json)"
    now = time.time() if now is None else now
    header = ("run", "state", "evaluations", "champion", "val_bpb", "age", "updated", "why")
    rows = [header]
    for r in runs:
        score = f"{r['val_bpb']:.4f} ({r['val_bpb_is']})" if r["val_bpb"] is not None else "-"
        rows.append((r["run"], r["state"], "-" if r["evaluations"] is None else str(r["evaluations"]),
                     r["champion"] or "-", score, _ago(r["created"], now), _ago(r["updated"], now), r["reason"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows)


def _ago(timestamp: float | None, now: float) -> str:
    return "-" if timestamp is None else clock(max(0.0, now - timestamp)) + " ago"
