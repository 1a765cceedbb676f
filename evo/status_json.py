"""`evo status RUN_DIR --json`: the facts `evo status` prints, as one JSON document for scripts.

Numbers stay numbers (no rounding), absent values are null, and the keys are stable: a script
reads `doc["champion"]["val_mean"]`, never a line of text. Held-out numbers appear only as the
guard's re-run summaries, as in the text, with `heldout_consulted` (how many promotion decisions
have looked at held-out) beside them.
"""

from __future__ import annotations

import json

from evo.config import load_config
from evo.operator_table import operator_rows
from evo.population import PENDING
from evo.report import champion_of, champion_score, load_population
from evo.run_list import run_state
from evo.store import RunStore


def status_facts(run_dir, top: int = 5) -> dict:
    store = RunStore(run_dir)
    info = store.run_info()
    loaded = store.load()
    population, counters, guard = load_population(store, loaded)
    individuals = list(population.individuals.values())
    first = population.best_first_draw()
    return {
        "run": str(store.dir),
        **run_state(store.dir, loaded[1]),
        "data_fingerprint": info.get("data_fingerprint"),
        "counters": {"evaluations": counters.evaluations, "births": counters.births,
                     "duplicates": counters.duplicates, "guard_runs": counters.guard_runs,
                     "lost_jobs": counters.lost_jobs, "elapsed_seconds": counters.elapsed_seconds,
                     "by_status": counters.by_status, "smoke_failures": counters.smoke_failures},
        "champion": _champion(population, guard),
        "champions": list(guard.champions),
        "noise_floor_sigma": guard.sigma(),
        "best_first_draw": None if first is None else {"id": first.id, "val_bpb": first.val_bpb,
                                                        "operator": first.operator},
        "best": [{"id": i.id, "score": population.score(i), "score_is": population.score_label(i),
                  "operator": i.operator, "parents": i.parents, "verdict": i.verdict, "hypothesis": i.hypothesis,
                  **_trust(i.metrics)}
                 for i in population.ranked()[:top]],
        "candidates_not_promoted": [{"id": r.id, "verdict": r.verdict} for r in guard.records.values()
                                    if r.verdict and r.verdict not in ("champion", "promoted")],
        "overfitting_alarm": guard.overfitting_alarm(),
        "fresh_seed_check": guard.audit_summary(),
        "transfer": guard.transfer_summary(),
        "operators": operator_rows(load_config(store.dir / "config.yaml").operators, counters, population),
        "refusals": counters.refusals,
        "failed": [{"id": i.id, "operator": i.operator, "status": i.status, "reason": i.reason}
                   for i in sorted(individuals, key=lambda i: i.birth) if i.status not in (PENDING, "ok")],
        "in_flight_or_queued": [i.id for i in population.pending()],
        "llm_usage": _llm_usage(store),
    }


def _champion(population, guard) -> dict | None:
    champion, stats = champion_of(population, guard)
    if champion is None:
        return None
    value, label = champion_score(champion, stats)
    return {"id": champion.id, "operator": champion.operator, "first_draw_val_bpb": champion.val_bpb,
            "val_bpb": value, "val_bpb_is": label,
            **(stats or {}), **_trust(champion.metrics),
            "heldout_consulted": guard.heldout_consulted}  # beside every held-out number: how often selection looked


def _trust(metrics_json: str) -> dict:
    metrics = json.loads(metrics_json or "{}")
    return {"sealed": metrics.get("sealed", True), "sandbox": metrics.get("sandbox", "unknown")}


def _llm_usage(store: RunStore) -> dict | None:
    path = store.dir / "llm_usage.json"
    return json.loads(path.read_text()) if path.is_file() else None
