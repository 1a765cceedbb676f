"""Each operator's record in a run: what it proposed, what was refused, evaluated, kept, and
the share of draws it gets now. `evo status` prints it; `evo status --json` hands it over."""

from __future__ import annotations

from evo.breeder import effective_weights
from evo.population import PENDING, Population
from evo.recorder import Counters


def operator_rows(configured: dict[str, float], counters: Counters, population: Population) -> list[dict]:
    """One dict per operator that is configured or did anything, by name. `weight` is None for
    an operator no longer configured (a resume changed the config)."""
    effective = effective_weights(configured, counters.recent)
    total = sum(effective[n] for n, w in configured.items() if w > 0) or 1.0
    individuals = list(population.individuals.values())
    names = sorted(set(counters.proposed) | set(counters.refusals) | {i.operator for i in individuals} | set(configured))
    rows = []
    for name in names:
        members = [i for i in individuals if i.operator == name and i.status != PENDING]
        weight = None
        if name in configured:
            weight = {"configured": configured[name], "now": effective[name],
                      "share": effective[name] / total if configured[name] > 0 else 0.0}
        rows.append({"operator": name, "proposed": counters.proposed.get(name, 0),
                     "refused": sum(counters.refusals.get(name, {}).values()), "evaluated": len(members),
                     "ok": sum(i.evaluated_ok for i in members), "improved": counters.improved.get(name, 0),
                     "weight": weight})
    return rows
