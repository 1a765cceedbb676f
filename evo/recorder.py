"""The recorder: the run's memory. It owns the population, the counters, the engine's RNG and
the checkpoints that persist them, and it is the only part that writes to the store.

Every finished evaluation is recorded and checkpointed before the next decision, so a crash
loses at most the runs in flight. Counters that change between results (refusals, duplicates,
elapsed time) are saved within a few seconds, so `evo status` on a live run is current.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from evo.explain import evaluation_size, printed_steps, reported_training, untrained_bpb, untrained_warning, vocab_size_of
from evo import results_tsv
from evo.guard import Guard, GuardRun
from evo.population import Individual, Population, normalized_hash
from evo.store import RunStore
from trainer import processes
from trainer.runner import RunResult, code_sha256

SAVE_EVERY_SECONDS = 5.0  # counters and elapsed time reach the checkpoint at most this late
# Every first draw uses the run's seed, the evaluation seed: two variants on the same seed start
# from the same random stream and see the same batches, so their difference is mostly the code's
# (common random numbers; evo/guard.py pairs its re-runs the same way). A fresh seed per child
# (tried, benchmark run 4) puts the whole seed-to-seed spread into every comparison of a child
# with its parent.
RECENT_OUTCOMES = 20  # outcomes kept per operator: the breeder weights operators by them
FAILED, OK, IMPROVED = 0, 1, 2  # an outcome: refused, duplicate or failed / evaluated ok / better than its parent


@dataclass
class Counters:
    births: int = 0
    evaluations: int = 0  # full evaluations finished (any status)
    duplicates: int = 0
    by_status: dict = field(default_factory=dict)
    refusals: dict = field(default_factory=dict)  # operator -> reason -> count
    proposed: dict = field(default_factory=dict)  # operator -> children offered
    improved: dict = field(default_factory=dict)  # operator -> children better than their parent
    smoke_failures: dict = field(default_factory=dict)
    guard_runs: int = 0  # noise-floor, candidate and transfer re-runs finished
    elapsed_seconds: float = 0.0  # wall time of the run, resumes included (as of the last save)
    lost_jobs: int = 0  # jobs whose machine went away mid-run and were re-queued
    recent: dict = field(default_factory=dict)  # operator -> its last RECENT_OUTCOMES outcomes, oldest first


class Recorder:
    def __init__(self, config, store: RunStore, guard: Guard, log: Callable[[str], None]):
        self.config = config
        self.store = store
        self.guard = guard
        self.log = log
        self.population = Population(config.population.islands, config.population.size)
        self.population.attach_guard(guard)  # selection scores are the guard's paired estimates where they exist
        self.counters = Counters()
        self.rng = random.Random(config.seed)
        self.lock = threading.RLock()  # shared with the breeder's threads
        self._session_start = time.monotonic()
        self._dirty = False
        self._saved_at = time.monotonic()
        self.vocab_size = vocab_size_of(store.run_info())
        self._tsv_written_for: tuple | None = None  # (evaluations, guard runs) results.tsv shows
        self.stop: dict | None = None  # why the engine last stopped, for `evo runs`; None while it runs

    # ---- state ----
    def state(self) -> dict:
        return {
            "counters": {**self.counters.__dict__, "elapsed_seconds": self.elapsed_seconds()},
            "rng": _rng_to_json(self.rng.getstate()),
            "migrants": self.population.migrants,
            "guard": self.guard.to_state(),
            **({"stop": self.stop} if self.stop else {}),
        }

    def restore(self, individuals: list[Individual], state: dict) -> None:
        for individual in individuals:
            self.population.add(individual)
        known = Counters.__dataclass_fields__
        self.counters = Counters(**{k: v for k, v in state["counters"].items() if k in known})
        self.rng.setstate(_rng_from_json(state["rng"]))
        self.population.migrants = state["migrants"]
        if "guard" in state:
            self.guard.restore(state["guard"])
        self._session_start = time.monotonic()
        self._tsv_written_for = None  # rewritten at the first checkpoint, whatever the old file says
        self.stop = None  # running again: the last session's stop no longer describes the run

    def elapsed_seconds(self) -> float:
        return self.counters.elapsed_seconds + (time.monotonic() - self._session_start)

    def checkpoint(self) -> None:
        with self.lock:
            self.store.save(list(self.population.individuals.values()), self.state())
            self._dirty, self._saved_at = False, time.monotonic()
            # results.tsv changes only when an evaluation finishes; a crash between the two writes
            # leaves it one behind, and the first checkpoint after resume rewrites it.
            finished = (self.counters.evaluations, self.counters.guard_runs)
            if finished != self._tsv_written_for:
                results_tsv.write(self.store.dir, self.population, self.guard)
                self._tsv_written_for = finished

    def changed(self) -> None:
        """Something worth saving changed; save_if_due writes it within a few seconds."""
        self._dirty = True

    def save_if_due(self) -> None:
        """Dirty counters within SAVE_EVERY_SECONDS; the clock alone at most every 6x that."""
        age = time.monotonic() - self._saved_at
        if (self._dirty and age >= SAVE_EVERY_SECONDS) or age >= 6 * SAVE_EVERY_SECONDS:
            self.checkpoint()

    def close_session(self, reason: str, hard: bool) -> None:
        """Fold this session's wall time into the counters and save, with why the engine stopped
        (hard: it cancelled work, which stays queued for resume)."""
        with self.lock:
            self.stop = {"reason": reason, "hard": hard, "at": time.time()}
            self.counters.elapsed_seconds = self.elapsed_seconds()
            self._session_start = time.monotonic()
            self.checkpoint()

    def code_of(self, individual_id: str) -> str:
        """From the store's bounded cache, or from disk checked against the recorded hash."""
        with self.lock:
            return self.store.code(individual_id, self.population.individuals[individual_id].code_hash)

    # ---- births ----
    def new_individual(self, code: str, operator: str, parents: list[str], island: int,
                       details: dict | None = None, hypothesis: str = "") -> Individual:
        """Born pending and checkpointed before it runs, so resume re-queues it (caller holds the lock)."""
        self.counters.births += 1
        individual = Individual(
            id=f"v{self.counters.births:05d}", birth=self.counters.births, island=island,
            code_hash=normalized_hash(code), operator=operator, parents=parents,
            details=json.dumps(details or {}), hypothesis=hypothesis,
            eval_seed=self.config.seed,
            created_at=time.time(), run_token=uuid.uuid4().hex,
        )
        individual.llm_tokens = int((details or {}).get("llm", {}).get("total_tokens", 0))
        self.store.write_code(individual.id, code)
        self.population.add(individual)
        if operator != "seed" and self.counters.births % self.config.population.migration_interval == 0:
            for member, target in self.population.migrate(self.config.population.migration_count):
                self.log(f"migration: {member} joins island {target}")
        self.checkpoint()
        return individual

    def refused(self, operator: str, reason: str) -> None:
        with self.lock:
            reasons = self.counters.refusals.setdefault(operator, {})
            reasons[reason] = reasons.get(reason, 0) + 1
            self.changed()

    def proposed(self, operator: str) -> None:
        with self.lock:
            self.counters.proposed[operator] = self.counters.proposed.get(operator, 0) + 1
            self.changed()

    def outcome(self, operator: str, outcome: int) -> None:
        """One more outcome of `operator`: FAILED, OK or IMPROVED."""
        with self.lock:
            recent = self.counters.recent.setdefault(operator, [])
            recent.append(outcome)
            del recent[:-RECENT_OUTCOMES]
            self.changed()

    def duplicate(self) -> None:
        with self.lock:
            self.counters.duplicates += 1
            self.changed()

    def top_refusals(self, limit: int = 3) -> str:
        """The most common refusal reasons of each operator, for a message that says why:
        "llm: connection failed (...) (x12); perturb: child is identical to its parent (x3)"."""
        return "; ".join(f"{operator}: {reasons}" for operator, reasons in refusal_summary(self.counters.refusals, limit))

    # ---- results ----
    def record(self, individual: Individual, result: RunResult) -> None:
        """A child's (or the seed's) first evaluation; the guard hears of it. Caller checkpoints."""
        individual.status = result.status
        individual.reason = result.reason
        individual.metrics = json.dumps(result.metrics)
        individual.val_bpb = result.val_bpb
        individual.wall_seconds = result.wall_seconds
        individual.train_seconds = result.train_seconds
        individual.steps = printed_steps(result.log_tail)
        individual.peak_memory_mb = result.peak_memory_mb
        individual.device = result.worker or individual.device
        individual.finished_at = time.time()
        individual.run_token = ""
        c = self.counters
        c.evaluations += 1
        c.by_status[result.status] = c.by_status.get(result.status, 0) + 1
        if result.reason.startswith("smoke run:"):
            c.smoke_failures[result.status] = c.smoke_failures.get(result.status, 0) + 1
        parent = self.population.individuals.get(individual.parents[0]) if individual.parents else None
        # Against the parent's selection score: for the seed the mean of its two draws, not a lucky one.
        base = self.population.score(parent) if parent is not None else None
        improved = individual.evaluated_ok and base is not None and individual.val_bpb < base
        if improved:
            c.improved[individual.operator] = c.improved.get(individual.operator, 0) + 1
        if individual.operator != "seed":
            self.outcome(individual.operator, IMPROVED if improved else OK if individual.evaluated_ok else FAILED)
        if individual.operator == "seed" and individual.evaluated_ok:
            self._explain_seed(individual, result)
            self.guard.start(individual.id, individual.val_bpb)
            individual.verdict = "champion" if self.config.guard.enabled else ""
        elif individual.evaluated_ok:
            self.guard.consider(individual.id, individual.val_bpb)

    def _explain_seed(self, seed: Individual, result: RunResult) -> None:
        """What one evaluation of the seed amounts to, and a loud warning when it did not learn."""
        log_path = self.store.variant_dir(seed.id) / "log.txt"
        untrained = untrained_bpb(result.metrics, self.vocab_size)
        facts = [evaluation_size(result.metrics), reported_training(log_path),
                 f"untrained score (uniform guess) {untrained:.4f}" if untrained is not None else ""]
        self.log(f"seed {seed.id}: val_bpb {seed.val_bpb:.4f}; " + "; ".join(f for f in facts if f))
        warning = untrained_warning(f"the seed {seed.id}", seed.val_bpb, result.metrics, self.vocab_size, log_path)
        if warning:
            self.log("!" * 80 + "\n" + warning + "\n" + "!" * 80)

    def record_guard(self, run: GuardRun, result: RunResult) -> None:
        self.counters.guard_runs += 1
        for candidate, value in self.guard.record(run, result.status, result.metrics, result.train_seconds,
                                                  printed_steps(result.log_tail), result.reason):
            self.guard.consider(candidate, value)
        verdict = self.guard.records[run.individual].verdict
        if verdict:
            self.population.individuals[run.individual].verdict = verdict

    # ---- after a crash ----
    def adopt_finished_results(self) -> list[Individual]:
        """Evaluations that finished (result.json written) but were not checkpointed.

        A result is adopted only if the runner wrote it for this very evaluation: the run token
        recorded when it started and the hash of the code it ran must both match. Returns the
        adopted children (their operators should hear how they did).
        """
        adopted = []
        for individual in self.population.pending():
            result = self._finished_result(self.store.variant_dir(individual.id), individual.run_token, individual.id)
            if result is not None:
                self.record(individual, result)
                adopted.append(individual)
        for run in list(self.guard.queue):
            result = self._finished_result(self.store.variant_dir(run.individual) / run.key, run.token, run.individual)
            if result is not None:
                self.guard.queue.remove(run)
                self.record_guard(run, result)
                adopted.append(self.population.individuals[run.individual])
        return adopted

    def _finished_result(self, folder: Path, token: str, individual_id: str) -> RunResult | None:
        path = folder / "result.json"
        if not token or not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            result = RunResult(**{k: v for k, v in data.items() if k in RunResult.__dataclass_fields__})
        except (OSError, ValueError, TypeError):
            return None
        if result.run_token != token or result.code_sha256 != code_sha256(self.code_of(individual_id)):
            self.log(f"resume: {path} was not written for the evaluation in flight; it is run again")
            return None
        return result

    def sweep_leftovers(self) -> int:
        """Kill this machine's processes of evaluations that were in flight when the engine died."""
        tokens = [i.run_token for i in self.population.pending()] + [r.token for r in self.guard.queue]
        return sum(processes.kill_by_token(t) for t in tokens if t)


def refusal_summary(refusals: dict, limit: int = 3) -> list[tuple[str, str]]:
    """(operator, "reason (xN), reason (xM)") for each operator that refused anything, the
    operators with the most refusals first, each with its `limit` most common reasons."""
    ranked = sorted(refusals.items(), key=lambda item: (-sum(item[1].values()), item[0]))
    out = []
    for operator, reasons in ranked:
        top = sorted(reasons.items(), key=lambda item: (-item[1], item[0]))[:limit]
        more = len(reasons) - len(top)
        out.append((operator, ", ".join(f"{reason} (x{count})" for reason, count in top)
                    + (f", and {more} other reason{'s' * (more > 1)}" if more > 0 else "")))
    return out


def _rng_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(data) -> tuple:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
