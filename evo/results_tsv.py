"""RUN_DIR/results.tsv: one line per finished evaluation, for people and other tools.

Like autoresearch's results.tsv, but for a population: every child's first evaluation and every
run the guard asked for (the seed's noise runs and anchor run, a candidate's re-runs, transfer
runs at a larger budget), oldest first. It is derived from the checkpoint (the population and the guard's
records) and rewritten with it, so it is as current as `evo status` and right again after a
resume. Nothing reads it back: the Parquet checkpoint stays the one source of truth.

Free text (hypothesis, reason) has backslash, tab, newline and carriage return escaped as \\\\, \\t,
\\n and \\r, so every evaluation is exactly one line and `cut`, `awk` or
`csv.reader(f, delimiter="\\t", quoting=csv.QUOTE_NONE)` read it as it is.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from evo.guard import NOISE, RERUN, TRANSFER, Guard, Sample
from evo.population import PENDING, Individual, Population
from trainer.files import write_atomic

FILE_NAME = "results.tsv"
COLUMNS = ("time", "id", "kind", "parent", "operator", "seed", "status", "val_bpb", "heldout_bpb", "steps",
           "seconds", "verdict", "hypothesis", "reason")
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def escape(value) -> str:
    """One TSV field: None is empty, floats get fixed precision, text stays on one line."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value).translate(_ESCAPES)


def _when(timestamp: float | None) -> str:
    """Local time with its UTC offset (ISO 8601), e.g. 2025-03-01T14:02:11+0100."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(timestamp)) if timestamp else ""


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _row(individual: Individual, kind: str, seed: int, status: str, val_bpb, heldout_bpb, steps, seconds,
         finished_at: float | None, reason: str) -> dict:
    return {
        "time": _when(finished_at), "id": individual.id, "kind": kind, "parent": ",".join(individual.parents),
        "operator": individual.operator, "seed": seed, "status": status, "val_bpb": val_bpb,
        "heldout_bpb": heldout_bpb, "steps": steps, "seconds": _seconds(seconds), "verdict": individual.verdict,
        "hypothesis": individual.hypothesis, "reason": reason,
    }


def _guard_kind(sample: Sample, record_id: str, guard: Guard, transfer: bool) -> str:
    """Samples from before results.tsv existed carry no kind: the seed's are its noise runs."""
    if sample.kind:
        return sample.kind
    if transfer:
        return TRANSFER
    return NOISE if guard.champions and record_id == guard.champions[0] else RERUN


def rows(population: Population, guard: Guard) -> list[dict]:
    """Every finished evaluation as a dict of COLUMNS (values not yet escaped), oldest first."""
    out = []  # (sort time, order of creation, row)
    individuals = population.individuals
    for individual in list(individuals.values()):
        if individual.status == PENDING:
            continue
        train_seconds = individual.train_seconds
        if train_seconds is None:  # checkpoints from before the field: ok runs have it in metrics
            train_seconds = json.loads(individual.metrics or "{}").get("train_seconds")
        out.append((individual.finished_at or 0.0, len(out), _row(
            individual, "child", individual.eval_seed, individual.status, individual.val_bpb, None,
            individual.steps, train_seconds, individual.finished_at, individual.reason)))
    for record_id, record in list(guard.records.items()):
        individual = individuals.get(record_id)
        if individual is None:
            continue
        for transfer, samples in ((False, record.samples), (True, record.transfer), (False, record.audit),
                                  (False, record.anchor)):
            for sample in samples:
                # An old sample without a time goes right after its variant's first evaluation.
                when = sample.finished_at or individual.finished_at or 0.0
                out.append((when, len(out), _row(
                    individual, _guard_kind(sample, record_id, guard, transfer), sample.seed, sample.status,
                    sample.val_bpb, sample.heldout_bpb, sample.steps, sample.train_seconds, sample.finished_at,
                    sample.reason)))
    out.sort(key=lambda item: (item[0], item[1]))
    return [row for _, _, row in out]


def render(table: list[dict]) -> str:
    lines = ["\t".join(COLUMNS)] + ["\t".join(escape(row[c]) for c in COLUMNS) for row in table]
    return "\n".join(lines) + "\n"


def write(run_dir: str | Path, population: Population, guard: Guard) -> None:
    write_atomic(Path(run_dir) / FILE_NAME, render(rows(population, guard)))
