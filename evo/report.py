"""What a run found: the status summary and the exported champion."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from evo.config import load_config
from evo.explain import evaluation_size, reported_training, untrained_warning, vocab_size_of
from evo.recorder import RECENT_OUTCOMES, Counters, refusal_summary
from evo.guard import Guard
from evo.operator_table import operator_rows
from evo.population import Population
from evo.progress import clock
from evo.store import RunStore, StoreError
from evo.variants import resolve_id
from trainer.files import write_atomic


def load_population(store: RunStore, loaded: tuple[list, dict] | None = None) -> tuple[Population, Counters, Guard]:
    """The run as selection sees it, from the checkpoint (`loaded`: what store.load() returned)."""
    individuals, state = loaded if loaded is not None else store.load()
    config = load_config(store.dir / "config.yaml")
    population = Population(config.population.islands, config.population.size)  # members() as the engine saw them
    for individual in individuals:
        population.add(individual)
    population.migrants = state.get("migrants", population.migrants)
    guard = Guard(config.guard, log=lambda line: None, evaluation_seed=config.seed)
    if "guard" in state:
        guard.restore(state["guard"])
    population.attach_guard(guard)  # ranked and scored as selection ranks and scores them
    known = Counters.__dataclass_fields__
    return population, Counters(**{k: v for k, v in state["counters"].items() if k in known}), guard


def champion_of(population: Population, guard: Guard):
    """The guard's champion when it has one with re-runs; otherwise the best first draw."""
    if guard.champion is not None and guard.champion.stats() is not None:
        return population.individuals[guard.champion.id], guard.champion.stats()
    return population.best(), None


RERUN_MEAN, FIRST_DRAW = "re-run mean", "first draw, never re-run"


def champion_score(champion, stats) -> tuple[float | None, str]:
    """The champion's number and which number it is, the same in every report: the mean of the
    guard's re-runs where champion_of found them, else its single first draw."""
    return (stats["val_mean"], RERUN_MEAN) if stats else (champion.val_bpb, FIRST_DRAW)


def trust_note(metrics_json: str) -> str:
    """How a score was obtained, in words, when it is less than sealed and sandboxed."""
    metrics = json.loads(metrics_json or "{}")
    notes = []
    if metrics.get("sealed") is False:
        notes.append("UNSEALED: scored inside the variant's own process, which could forge it")
    if metrics.get("sandbox") == "none":
        notes.append("unsandboxed")
    return f"  [{'; '.join(notes)}]" if notes else ""


def champion_lines(population: Population, guard: Guard, store: RunStore | None = None) -> list[str]:
    champion, stats = champion_of(population, guard)
    if champion is None:
        return ["champion: none yet"]
    lines = _untrained_lines(population, guard, store, champion, stats)
    if stats is None:
        return [f"champion: {champion.id}, first draw val_bpb {champion.val_bpb:.4f} (not re-run: no noise floor yet)"
                + trust_note(champion.metrics)] + lines
    p = f", p={stats['p_value']:.3g}" if stats["p_value"] is not None else ""  # no p: the seed, already named by its operator
    lines = [
        f"champion: {champion.id} ({champion.operator}){p}" + trust_note(champion.metrics),
        f"  val_bpb  {stats['val_mean']:.4f} ± {stats['val_std']:.4f} over n={stats['n']} re-runs"
        + (f"; first draw {stats['first_val']:.4f}, gap {stats['first_draw_gap']:+.4f}" if stats["first_val"] is not None else ""),
        f"  held-out {stats['held_mean']:.4f} ± {stats['held_std']:.4f} {guard.heldout_note()}",
    ] + lines
    standing = guard.on_evaluation_seed(champion.id)
    if standing is not None:  # the re-run mean averages the guard's seeds; first draws share another
        how = " (the mean of its 2 draws there)" if guard.paired_estimate(champion.id) is not None and \
            champion.id == guard.champions[0] else ""
        lines.insert(2, f"  on the first draws' seed {standing:.4f}{how}: compare first draws with this, not with the re-run mean")
    measured = guard.measured_sigma()
    if measured is not None:
        floored = (f"; below guard.min_sigma, so the guard uses {guard.sigma():.4f}: identical noise runs cannot "
                   "make a difference significant") if measured < guard.s.min_sigma else ""
        others = guard.sigma_sources() - 1
        pooled = f", pooled with the re-runs of {others} candidate(s)" if others else ""
        lines.append(f"  noise floor: sigma {measured:.4f} val_bpb between the guard's seeds (the seed variant's noise "
                     f"runs{pooled}){floored}")
    if len(guard.champions) > 1:
        lines.append("  champions so far: " + " -> ".join(guard.champions))
    verdicts = [r for r in guard.records.values() if r.verdict and r.verdict not in ("champion", "promoted")]
    if verdicts:
        lines.append("  candidates not promoted: " + ", ".join(f"{r.id} ({r.verdict})" for r in verdicts))
    alarm = guard.overfitting_alarm()
    if alarm:
        lines.append("  " + alarm)
    lines += ["  " + line for line in guard.audit_summary() + guard.transfer_summary()]
    return lines


def _untrained_lines(population: Population, guard: Guard, store: RunStore | None, champion, stats) -> list[str]:
    """How much each evaluation scored, what the champion reports of its training, and a loud
    warning when the champion (or the seed) is no better than a uniform guess."""
    if store is None:
        return []
    vocab = vocab_size_of(store.run_info())
    metrics = json.loads(champion.metrics or "{}")
    log = store.variant_dir(champion.id) / "log.txt"
    facts = [f for f in (evaluation_size(metrics), reported_training(log)) if f]
    lines = [f"  each evaluation: {'; '.join(facts)}"] if facts else []
    value, _ = champion_score(champion, stats)
    warning = untrained_warning(f"the champion {champion.id}", value, metrics, vocab, log)
    return lines + ([f"  {'!' * 78}", f"  {warning}", f"  {'!' * 78}"] if warning else [])


def failed_lines(population: Population, limit: int = 10) -> list[str]:
    """Variants that failed, newest first, each with its status and the start of its reason."""
    failed = [i for i in population.individuals.values() if i.status not in ("ok", "pending")]
    failed.sort(key=lambda i: -i.birth)
    if not failed:
        return []
    lines = ["", f"failed variants ({len(failed)}; newest first{f', {limit} shown' if len(failed) > limit else ''}):"]
    for i in failed[:limit]:
        reason = " ".join(i.reason.split())
        lines.append(f"  {i.id:<8} {i.operator:<10} {i.status:<13} {reason[:100] + ('...' if len(reason) > 100 else '')}")
    return lines


def status_text(run_dir: str | Path, top: int = 5) -> str:
    store = RunStore(run_dir)
    info = store.run_info()
    population, counters, guard = load_population(store)
    lines = [
        f"run: {store.dir}",
        f"evaluations: {counters.evaluations}   births: {counters.births}   duplicates skipped: {counters.duplicates}   "
        f"time used: {clock(counters.elapsed_seconds)}   guard re-runs: {counters.guard_runs}   data: {info['data_fingerprint']}"
        + (f"   jobs re-queued after losing their machine: {counters.lost_jobs}" if counters.lost_jobs else ""),
        "",
        *champion_lines(population, guard, store),
        "",
        "best by selection score (what selection uses: the paired estimate where the guard re-ran it, the mean of 2 "
        "draws for the seed variant, else the first draw):",
        f"  {'id':<8} {'val_bpb':>9} {'which':<15} {'operator':<10} {'parent':<8} {'verdict':<20} hypothesis",
    ]
    for individual in population.ranked()[:top]:
        parent = individual.parents[0] if individual.parents else "-"
        lines.append(f"  {individual.id:<8} {population.score(individual):>9.4f} {population.score_label(individual):<15} "
                     f"{individual.operator:<10} {parent:<8} "
                     f"{individual.verdict:<20} {individual.hypothesis[:60]}{trust_note(individual.metrics)}")
    lines += ["", "by status: " + ", ".join(f"{k} {v}" for k, v in sorted(counters.by_status.items()))]
    lines += failed_lines(population)
    pending = population.pending()
    if pending:
        lines.append(f"in flight or queued (re-run on resume): {', '.join(i.id for i in pending)}")
    configured = load_config(store.dir / "config.yaml").operators
    lines += ["", f"  {'operator':<14} {'proposed':>9} {'refused':>8} {'evaluated':>10} {'ok':>5} {'improved':>9}   "
                  f"weight (configured -> now, from its last {RECENT_OUTCOMES} outcomes)"]
    for row in operator_rows(configured, counters, population):
        w = row["weight"]
        weight = f"   {w['configured']:g} -> {w['now']:.2f} ({w['share']:.0%} of draws)" if w else ""
        lines.append(f"  {row['operator']:<14} {row['proposed']:>9} {row['refused']:>8} {row['evaluated']:>10} "
                     f"{row['ok']:>5} {row['improved']:>9}{weight}")
    lines += _refusal_lines(counters)
    lines += _llm_lines(store, population)
    return "\n".join(lines)


def _refusal_lines(counters: Counters, limit: int = 3) -> list[str]:
    """Why each operator refused, most common reasons first."""
    summary = refusal_summary(counters.refusals, limit)
    if not summary:
        return []
    return ["", f"refusal reasons (top {limit} per operator):"] + [f"  {name}: {reasons}" for name, reasons in summary]


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


def export(run_dir: str | Path, out_dir: str | Path | None = None, variant: str | None = None) -> Path:
    """The champion's files (or, with `variant`, any variant's, failed ones included) into
    out_dir, by default RUN_DIR/export (RUN_DIR/export-<id> for a chosen variant)."""
    store = RunStore(run_dir)
    population, _, guard = load_population(store)
    best, best_stats = champion_of(population, guard)
    if variant is None:
        champion, stats = best, best_stats
        if champion is None:
            raise StoreError(f"{store.dir} has no successfully evaluated variant yet; nothing to export")
    else:
        champion = population.individuals[resolve_id(population, variant, store.dir)]
        record = guard.records.get(champion.id)
        stats = record.stats() if record is not None else None
    default_out = store.dir / ("export" if variant is None else f"export-{champion.id}")
    out = Path(out_dir) if out_dir else default_out
    out.mkdir(parents=True, exist_ok=True)
    code = store.code(champion.id, champion.code_hash)
    write_atomic(out / "train.py", code)
    seed_code = (store.dir / "seed.py").read_text()
    diff = difflib.unified_diff(seed_code.splitlines(True), code.splitlines(True), "seed/train.py", f"{champion.id}/train.py")
    write_atomic(out / "seed.diff", "".join(diff))
    lineage = [
        {"id": i.id, "operator": i.operator, "val_bpb": i.val_bpb, "hypothesis": i.hypothesis, "status": i.status}
        for i in population.lineage(champion.id)
    ]
    metrics = json.loads(champion.metrics)
    value, label = champion_score(champion, stats)
    metadata = {
        "id": champion.id,
        "status": champion.status,
        "reason": champion.reason,
        "is_champion": best is not None and best.id == champion.id,
        "verdict": champion.verdict,
        "val_bpb": value,
        "scored": "sealed (a separate evaluator scored the handed-over model)" if metrics.get("sealed", True)
                  else "UNSEALED (scored inside the variant's own process, which could forge it)",
        "sandbox": metrics.get("sandbox", "unknown"),
        "val_bpb_is": label,
        "guard": stats,
        "heldout_consulted": guard.heldout_consulted,  # held_mean above was looked at by this many promotion decisions
        "first_draw_val_bpb": champion.val_bpb,
        "metrics": metrics,
        "eval_seed": champion.eval_seed,
        "lineage": lineage,
        "run": store.run_info(),
        "config": (store.dir / "config.yaml").read_text(),
    }
    write_atomic(out / "metadata.json", json.dumps(metadata, indent=2))
    return out
