"""The facts `evo report` shows, read from a run directory without touching it.

The checkpoint is read as `evo status` reads it (no lock: a run may still be writing; the store's
atomic replace and its previous-checkpoint fallback make every read a consistent snapshot).
Everything here is plain data (dicts, lists, numbers); drawing and HTML live elsewhere.
"""

from __future__ import annotations

import difflib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from evo.config import load_config
from evo.guard import Guard
from evo.population import PENDING, Individual, Population
from evo.recorder import Counters
from evo.report import champion_of, load_population
from evo.store import RunStore, StoreError


@dataclass
class RunFacts:
    store: RunStore
    info: dict
    population: Population
    counters: Counters
    guard: Guard
    workers: int
    kept: set[str] = field(default_factory=set)  # ids selection currently keeps (island members)

    @property
    def individuals(self) -> list[Individual]:
        return sorted(self.population.individuals.values(), key=lambda i: i.birth)

    @property
    def start(self) -> float:
        """Wall-clock origin of the run: its creation, or the first birth if run.json lacks it."""
        births = [i.created_at for i in self.population.individuals.values() if i.created_at]
        return self.info.get("created") or (min(births) if births else 0.0)


def read_run(run_dir: str | Path) -> RunFacts:
    store = RunStore(run_dir)
    info = store.run_info()
    population, counters, guard = load_population(store)
    config = load_config(store.dir / "config.yaml")
    individuals = list(population.individuals.values())
    kept = {m.id for island in range(population.n_islands) for m in population.members(island)}
    slots = {i.device for i in individuals if i.device}
    workers = config.workers.count if isinstance(config.workers.count, int) else max(1, len(slots))
    return RunFacts(store, info, population, counters, guard, workers, kept)


def evaluations(facts: RunFacts) -> list[dict]:
    """Every finished first evaluation: minutes since the start, val_bpb (None if it failed), its fate."""
    out = []
    for i in facts.individuals:
        if i.status == PENDING or i.finished_at is None:
            continue
        fate = "failed" if not i.evaluated_ok else "kept" if i.id in facts.kept else "dropped"
        out.append({"id": i.id, "minutes": (i.finished_at - facts.start) / 60, "val_bpb": i.val_bpb,
                    "fate": fate, "status": i.status})
    return out


def champion_steps(facts: RunFacts) -> list[dict]:
    """Each champion in turn, from when it took over: re-run means and spread on val and held-out."""
    steps = []
    for champion_id in facts.guard.champions:
        record, individual = facts.guard.records[champion_id], facts.population.individuals.get(champion_id)
        stats = record.stats()
        if stats is None or individual is None:
            continue
        steps.append({"id": champion_id, "minutes": (_promoted_at(facts, individual) - facts.start) / 60, **stats})
    return steps


def _promoted_at(facts: RunFacts, individual: Individual) -> float:
    """When its last re-run finished (the verdict came then), from the runner's result files; a
    run whose executor writes none (the fake one) falls back to the first evaluation's time."""
    folder = facts.store.variant_dir(individual.id)
    times = [p.stat().st_mtime for p in folder.glob("rerun-*/result.json")] if individual.operator != "seed" else []
    return max(times) if times else (individual.finished_at or facts.start)


def guard_rows(facts: RunFacts) -> list[dict]:
    """Every individual the guard re-ran, in birth order, with its numbers and verdict."""
    rows = []
    for record in facts.guard.records.values():
        individual = facts.population.individuals.get(record.id)
        stats = record.stats() or {}
        rows.append({"id": record.id, "operator": individual.operator if individual else "?",
                     "birth": individual.birth if individual else 0, "first_val": record.first_val,
                     "ok": len(record.ok()), "done": len(record.samples), "expected": record.expected,
                     "val_mean": stats.get("val_mean"), "val_std": stats.get("val_std"),
                     "held_mean": stats.get("held_mean"), "held_std": stats.get("held_std"),
                     "p_value": record.p_value, "verdict": record.verdict or "awaiting re-runs"})
    return sorted(rows, key=lambda r: r["birth"])


def lineage_steps(facts: RunFacts) -> list[dict]:
    """The champion's line from the seed down: who begat whom, by which operator, why, and the diff."""
    champion, _ = champion_of(facts.population, facts.guard)
    if champion is None:
        return []
    steps = []
    for individual in reversed(facts.population.lineage(champion.id)):
        parent = facts.population.individuals.get(individual.parents[0]) if individual.parents else None
        steps.append({
            "id": individual.id, "operator": individual.operator, "parents": list(individual.parents),
            "val_bpb": individual.val_bpb, "score": facts.population.score(individual),
            "score_label": facts.population.score_label(individual), "verdict": individual.verdict,
            "hypothesis": individual.hypothesis or describe(individual.details),
            "diff": _diff(facts.store, parent, individual) if parent is not None else [],
        })
    return steps


def describe(details_json: str) -> str:
    """An operator's details in one line, for a child that stated no hypothesis."""
    details = {k: v for k, v in json.loads(details_json or "{}").items() if k != "llm"}
    return "; ".join(f"{k}: {v}" for k, v in details.items())


def _diff(store: RunStore, parent: Individual, child: Individual) -> list[str]:
    try:
        before, after = store.code(parent.id, parent.code_hash), store.code(child.id, child.code_hash)
    except StoreError as e:  # a report still shows the rest when one file is gone
        return [f"(no diff: {e})"]
    return list(difflib.unified_diff(before.splitlines(), after.splitlines(), f"{parent.id}/train.py",
                                     f"{child.id}/train.py", lineterm=""))


def family(facts: RunFacts) -> list[dict]:
    """Every individual as a node of the family tree: birth, island, parents, how it did."""
    champions = set(facts.guard.champions)
    return [{"id": i.id, "birth": i.birth, "island": i.island, "parents": list(i.parents), "val_bpb": i.val_bpb,
             "failed": i.status not in ("ok", PENDING), "pending": i.status == PENDING, "champion": i.id in champions}
            for i in facts.individuals]


def operator_rows(facts: RunFacts) -> list[dict]:
    """Per operator: proposed, refused (by reason), evaluated, ok, improved, promoted, LLM use."""
    c = facts.counters
    promoted = {r.id for r in facts.guard.records.values() if r.verdict == "promoted"}
    names = sorted(set(c.proposed) | set(c.refusals) | {i.operator for i in facts.individuals})
    rows = []
    for name in names:
        members = [i for i in facts.individuals if i.operator == name and i.status != PENDING]
        latencies = [json.loads(i.details).get("llm", {}).get("latency_s") for i in members]
        latencies = [x for x in latencies if isinstance(x, (int, float))]
        rows.append({
            "operator": name, "proposed": c.proposed.get(name, 0),
            "refused": sum(c.refusals.get(name, {}).values()),
            "refusals": sorted(c.refusals.get(name, {}).items(), key=lambda kv: (-kv[1], kv[0])),
            "evaluated": len(members), "ok": sum(i.evaluated_ok for i in members),
            "improved": c.improved.get(name, 0), "promoted": sum(i.id in promoted for i in members),
            "llm_tokens": sum(i.llm_tokens for i in members),
            "llm_latency_s": sum(latencies) / len(latencies) if latencies else None,
        })
    return rows


def time_facts(facts: RunFacts) -> dict:
    """Where the time went: evaluation seconds by status, guard re-runs, and how busy the workers were."""
    by_status: Counter = Counter()
    counts: Counter = Counter()
    for i in facts.individuals:
        if i.status != PENDING and i.wall_seconds is not None:
            by_status[i.status] += i.wall_seconds
            counts[i.status] += 1
    guard_seconds, guard_timed = _guard_seconds(facts)
    elapsed = facts.counters.elapsed_seconds
    busy = sum(by_status.values()) + guard_seconds
    return {
        "elapsed_seconds": elapsed, "workers": facts.workers,
        "busy_fraction": busy / (elapsed * facts.workers) if elapsed > 0 else None,
        "by_status": [(s, counts[s], by_status[s]) for s in sorted(by_status, key=lambda s: -by_status[s])],
        "guard_runs": facts.counters.guard_runs, "guard_seconds": guard_seconds, "guard_timed": guard_timed,
    }


def _guard_seconds(facts: RunFacts) -> tuple[float, int]:
    """Wall seconds of the guard's runs, from the result files the runner wrote beside each variant."""
    total, timed = 0.0, 0
    for record_id in facts.guard.records:
        for path in facts.store.variant_dir(record_id).glob("*-*/result.json"):
            try:
                total += float(json.loads(path.read_text()).get("wall_seconds") or 0.0)
                timed += 1
            except (OSError, ValueError):  # being written right now: counted next time
                continue
    return total, timed
