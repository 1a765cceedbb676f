"""What a run found: the status summary and the exported champion."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from evo.engine import Counters
from evo.population import Population
from evo.progress import clock
from evo.store import RunStore, StoreError


def load_population(store: RunStore) -> tuple[Population, Counters]:
    individuals, state = store.load()
    population = Population(1, len(individuals) or 1)
    for individual in individuals:
        population.add(individual)
    return population, Counters(**state["counters"])


def status_text(run_dir: str | Path, top: int = 5) -> str:
    store = RunStore(run_dir)
    info = store.run_info()
    population, counters = load_population(store)
    lines = [
        f"run: {store.dir}",
        f"evaluations: {counters.evaluations}   births: {counters.births}   duplicates skipped: {counters.duplicates}   "
        f"time used: {clock(counters.elapsed_seconds)}   data: {info['data_fingerprint']}",
        "",
        "best variants:",
        f"  {'id':<8} {'val_bpb':>9} {'operator':<10} {'parent':<8} hypothesis",
    ]
    for individual in population.ranked()[:top]:
        parent = individual.parents[0] if individual.parents else "-"
        lines.append(f"  {individual.id:<8} {individual.val_bpb:>9.4f} {individual.operator:<10} {parent:<8} {individual.hypothesis[:70]}")
    lines += ["", "by status: " + ", ".join(f"{k} {v}" for k, v in sorted(counters.by_status.items()))]
    pending = population.pending()
    if pending:
        lines.append(f"in flight or queued (re-run on resume): {', '.join(i.id for i in pending)}")
    lines += ["", f"  {'operator':<10} {'proposed':>9} {'refused':>8} {'evaluated':>10} {'ok':>5} {'improved':>9}"]
    operators = sorted(set(counters.proposed) | set(counters.refusals) | {i.operator for i in population.individuals.values()})
    for name in operators:
        members = [i for i in population.individuals.values() if i.operator == name and i.status != "pending"]
        refused = sum(counters.refusals.get(name, {}).values())
        lines.append(f"  {name:<10} {counters.proposed.get(name, 0):>9} {refused:>8} {len(members):>10} "
                     f"{sum(i.evaluated_ok for i in members):>5} {counters.improved.get(name, 0):>9}")
    lines += _llm_lines(store, population)
    return "\n".join(lines)


def _llm_lines(store: RunStore, population: Population) -> list[str]:
    path = store.dir / "llm_usage.json"
    if not path.is_file():
        return []
    usage = json.loads(path.read_text())
    lines = ["", f"LLM: {usage['requests']} requests, {usage['total_tokens']:,} tokens "
                 f"({usage['prompt_tokens']:,} prompt, {usage['completion_tokens']:,} completion)"]
    for model, m in sorted(usage["by_model"].items()):
        children = [i for i in population.individuals.values() if json.loads(i.details).get("llm", {}).get("model") == model]
        latency = [json.loads(i.details)["llm"]["latency_s"] for i in children]
        mean = f", mean latency {sum(latency) / len(latency):.1f}s" if latency else ""
        lines.append(f"  {model}: {m['requests']} requests, {m['total_tokens']:,} tokens, {len(children)} children{mean}")
    return lines


def export(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    store = RunStore(run_dir)
    population, _ = load_population(store)
    champion = population.best()
    if champion is None:
        raise StoreError(f"{store.dir} has no successfully evaluated variant yet; nothing to export")
    out = Path(out_dir) if out_dir else store.dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.py").write_text(champion.code)
    seed_code = (store.dir / "seed.py").read_text()
    diff = difflib.unified_diff(seed_code.splitlines(True), champion.code.splitlines(True), "seed/train.py", f"{champion.id}/train.py")
    (out / "seed.diff").write_text("".join(diff))
    lineage = [
        {"id": i.id, "operator": i.operator, "val_bpb": i.val_bpb, "hypothesis": i.hypothesis, "status": i.status}
        for i in population.lineage(champion.id)
    ]
    metadata = {
        "id": champion.id,
        "val_bpb": champion.val_bpb,
        "metrics": json.loads(champion.metrics),
        "eval_seed": champion.eval_seed,
        "lineage": lineage,
        "run": store.run_info(),
        "config": (store.dir / "config.yaml").read_text(),
    }
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2))
    return out
