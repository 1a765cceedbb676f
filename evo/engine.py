"""The evolution engine: asynchronous steady state over W workers, checkpointed after every result.

The loop keeps every worker busy: the moment one frees up, a child is bred and started. There is
no generation barrier. Every finished evaluation is written to the store before the next
decision, so a crash loses at most the runs in flight, and resume re-queues exactly those.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable

import prepare
from evo.config import Config
from evo.guard import Guard, Job
from evo.population import PENDING, Individual, Population, normalized_hash
from evo.progress import Snapshot, clock
from evo.store import RunStore
from evo.workers import WorkerSlot, worker_slots
from mutators import registry
from mutators.base import Context, Failure, Idea, Parent, Refusal, Relative
from trainer import processes
from trainer.evaluator import Evaluator
from trainer.runner import (EvaluationUntrusted, EvaluatorFailed, RunCancelled, RunResult, RunSettings,
                            SandboxUnavailable, code_sha256, run_variant, use_sandbox)

BREED_ATTEMPTS = 20  # tries for a new, valid, unseen child before a worker waits


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
    elapsed_seconds: float = 0.0  # wall time of finished sessions (resumes add up)


class Engine:
    def __init__(self, config: Config, store: RunStore, log: Callable[[str], None] = print,
                 on_tick: Callable[[Snapshot], None] = lambda snapshot: None):
        self.config = config
        self.store = store
        self.log = log
        self.on_tick = on_tick
        self.population = Population(config.population.islands, config.population.size)
        self.counters = Counters()
        self.rng = random.Random(config.seed)
        self.operators = registry.build(config, store.dir)
        self.slots = worker_slots(config)
        self.cancel = threading.Event()
        self.seed_code = (store.dir / "seed.py").read_text()
        self.data_dir = config.data.dir or prepare.DATA_DIR
        info = store.run_info()
        self.prepare_hash = info["prepare_hash"]
        self.data_fingerprint = info["data_fingerprint"]
        self.sandboxed: bool | None = None  # decided when the run starts (bubblewrap probed once)
        self.evaluators: dict[str, Evaluator] = {}  # one warm evaluator per worker slot
        self._session_start = time.monotonic()
        self._in_flight: dict[Future, tuple[WorkerSlot, str]] = {}  # job -> (slot, "child" or "guard")
        self._guard_running: list[Job] = []
        self.guard = Guard(config.guard, log=lambda line: self.log(line))
        self._running: set[str] = set()  # ids being evaluated
        self._next_island = 0
        self.lock = threading.RLock()  # population, counters and checkpoints are shared by workers

    # ---- state ----
    def state(self) -> dict:
        c = self.counters
        return {
            "counters": {**c.__dict__, "elapsed_seconds": self.elapsed_seconds()},
            "rng": _rng_to_json(self.rng.getstate()),
            "migrants": self.population.migrants,
            "guard": self.guard.to_state(self._guard_running),
        }

    def restore(self, individuals: list[Individual], state: dict) -> None:
        for individual in individuals:
            self.population.add(individual)
        self.counters = Counters(**state["counters"])
        self.rng.setstate(_rng_from_json(state["rng"]))
        self.population.migrants = state["migrants"]
        if "guard" in state:
            self.guard.restore(state["guard"])
        self._session_start = time.monotonic()

    def checkpoint(self) -> None:
        self.store.save(list(self.population.individuals.values()), self.state())

    def code_of(self, individual_id: str) -> str:
        """From the store's bounded cache, or from disk checked against the recorded hash."""
        with self.lock:  # the cache is shared by the workers (the lock is re-entrant)
            return self.store.code(individual_id, self.population.individuals[individual_id].code_hash)

    def elapsed_seconds(self) -> float:
        return self.counters.elapsed_seconds + (time.monotonic() - self._session_start)

    # ---- stopping ----
    def stop_reason(self) -> str | None:
        s = self.config.stopping
        started = self.counters.evaluations + sum(kind == "child" for _, kind in self._in_flight.values())
        if s.max_evaluations is not None and started >= s.max_evaluations:
            return f"max_evaluations ({s.max_evaluations}) reached"
        if s.max_hours is not None and self.elapsed_seconds() >= s.max_hours * 3600:
            return f"max_hours ({s.max_hours}) reached"
        best = self.population.best()
        if s.target_val_bpb is not None and best is not None and best.val_bpb <= s.target_val_bpb:
            return f"target val_bpb {s.target_val_bpb} reached by {best.id}"
        return None

    # ---- breeding ----
    def _new_individual(self, code: str, operator: str, parents: list[str], island: int,
                        details: dict | None = None, hypothesis: str = "") -> Individual:
        """A child's record; its code goes to the store, which keeps it on disk for good."""
        self.counters.births += 1
        individual = Individual(
            id=f"v{self.counters.births:05d}", birth=self.counters.births, island=island,
            code_hash=normalized_hash(code), operator=operator, parents=parents,
            details=json.dumps(details or {}), hypothesis=hypothesis, eval_seed=self.config.seed,
            created_at=time.time(),
        )
        self.store.write_code(individual.id, code)
        return individual

    def _choose_operator(self):
        """A weighted draw among the operators still active (an LLM past its token budget is not)."""
        names = [n for n, w in self.config.operators.items() if w > 0 and getattr(self.operators[n], "active", True)]
        if not names:
            return None
        weights = [self.config.operators[n] for n in names]
        return self.operators[self.rng.choices(names, weights)[0]]

    def breed(self) -> Individual | None:
        """A new child that compiles and whose normalized code has never been seen, or None.

        Runs in a worker thread. Choices and bookkeeping happen under the lock; the operator's
        proposal (an LLM call may take a minute) happens outside it, so other workers go on.
        """
        for _ in range(BREED_ATTEMPTS):
            if self.cancel.is_set():
                return None
            with self.lock:
                island = self._next_island
                self._next_island = (island + 1) % self.config.population.islands
                operator = self._choose_operator()
                if operator is None:
                    return None
                parents = []
                for _ in range(operator.parents_needed):
                    parent = self.population.tournament(island, self.config.population.tournament_size, self.rng)
                    if parent is None:
                        return None
                    parents.append(Parent(parent.id, self.code_of(parent.id), parent.val_bpb))
                context = self.context_for(parents[0].id, island) if getattr(operator, "wants_context", False) else None
                op_rng = random.Random(self.rng.getrandbits(64))  # operators never share the engine's RNG
            proposal = operator.propose(parents, op_rng, context) if context is not None else operator.propose(parents, op_rng)
            with self.lock:
                if isinstance(proposal, Refusal):
                    reasons = self.counters.refusals.setdefault(operator.name, {})
                    reasons[proposal.reason] = reasons.get(proposal.reason, 0) + 1
                    continue
                self.counters.proposed[operator.name] = self.counters.proposed.get(operator.name, 0) + 1
                if self.population.known(normalized_hash(proposal.code)):
                    self.counters.duplicates += 1
                    self._feedback(operator.name, proposal.details, None, evaluated=False)
                    continue
                if self.cancel.is_set():
                    self._feedback(operator.name, proposal.details, None, evaluated=False)
                    return None
                child = self._new_individual(proposal.code, proposal.operator, [p.id for p in parents], island,
                                             proposal.details, proposal.hypothesis)
                child.llm_tokens = int(proposal.details.get("llm", {}).get("total_tokens", 0))
                self._register(child)
                self._running.add(child.id)  # in the same lock as its birth: no other worker may take it
                self._after_birth()
                return child
        return None

    def context_for(self, parent_id: str, island: int) -> Context:
        """What an LLM may see besides the parent: validation numbers and log tails, never held-out."""
        llm = self.config.mutators.llm
        others = [i for i in self.population.ranked() if i.island != island and i.id != parent_id][: llm.relatives]
        relatives = [Relative(i.id, self.code_of(i.id), i.val_bpb, i.island) for i in others]
        finished = [i for i in self.population.individuals.values() if i.status not in (PENDING, "ok")]
        finished.sort(key=lambda i: i.finished_at or 0, reverse=True)
        failures = []
        for i in finished[: llm.failures]:
            result = self.store.variant_dir(i.id) / "result.json"
            tail = json.loads(result.read_text()).get("log_tail", "") if result.is_file() else ""
            failures.append(Failure(i.id, i.status, i.reason, tail[-1500:], i.hypothesis))
        ideas = []
        for i in sorted(self.population.individuals.values(), key=lambda i: i.birth, reverse=True):
            if i.operator == "seed" or i.status == PENDING or not i.hypothesis:
                continue
            parent = self.population.individuals.get(i.parents[0]) if i.parents else None
            if i.evaluated_ok and parent is not None and parent.val_bpb is not None:
                outcome = f"val_bpb {i.val_bpb:.4f} vs parent {parent.val_bpb:.4f}"
            else:
                outcome = i.status if i.status != "ok" else f"val_bpb {i.val_bpb}"
            ideas.append(Idea(i.operator, i.hypothesis, outcome))
            if len(ideas) >= llm.ideas:
                break
        return Context(relatives, failures, ideas)

    def _register(self, individual: Individual) -> None:
        """Recorded as pending before it runs, so resume re-queues it (caller holds the lock)."""
        individual.run_token = uuid.uuid4().hex
        self.population.add(individual)
        self.checkpoint()

    def _after_birth(self) -> None:
        if self.counters.births % self.config.population.migration_interval == 0:
            for member, island in self.population.migrate(self.config.population.migration_count):
                self.log(f"migration: {member} joins island {island}")

    def _take_queued(self) -> Individual | None:
        """A pending individual nobody is evaluating (re-queued after a resume), or the seed."""
        queued = [i for i in self.population.pending() if i.id not in self._running]
        if queued:
            individual = min(queued, key=lambda i: i.birth)
            individual.run_token = individual.run_token or uuid.uuid4().hex
            return individual
        if not self.population.individuals:
            seed = self._new_individual(self.seed_code, "seed", [], island=0)
            self._register(seed)
            return seed
        return None

    def _can_start(self) -> bool:
        """Work exists for a free worker: a queued individual, the seed, or parents to breed from."""
        queued = any(i.id not in self._running for i in self.population.pending())
        return queued or not self.population.individuals or self.population.best() is not None

    def _child_work(self, slot: WorkerSlot):
        """One worker's job: take or breed an individual, then evaluate it."""
        with self.lock:
            individual = self._take_queued()
            if individual is not None:
                self._running.add(individual.id)
        if individual is None:
            individual = self.breed()
            if individual is None:
                return None
        individual.device = slot.label
        return individual, self.evaluate(individual, slot)

    def _guard_work(self, slot: WorkerSlot, job: Job):
        """A re-run for the guard: new seed, held-out scored, in the variant's own sub-folder."""
        code = self.code_of(job.individual)
        settings = self.run_settings(slot, seconds=self.config.budget.seconds * job.budget_multiplier, seed=job.seed)
        settings.heldout = True
        run_dir = self.store.variant_dir(job.individual) / job.key
        return job, run_variant(code, settings, run_dir, job.token, self.cancel, self._evaluator(slot))

    # ---- evaluation ----
    def run_settings(self, slot: WorkerSlot, seconds: float | None = None, seed: int | None = None) -> RunSettings:
        b, d, e = self.config.budget, self.config.data, self.config.evaluation
        return RunSettings(
            time_budget=seconds or b.seconds, seed=self.config.seed if seed is None else seed,
            data_dir=self.data_dir, device=slot.device, gpu=slot.gpu, threads=slot.threads,
            seq_len=d.seq_len, eval_tokens=d.eval_tokens, startup_grace=b.startup_grace,
            eval_grace=b.eval_grace, memory_limit_mb=b.memory_limit_mb, expected_prepare_hash=self.prepare_hash,
            data_fingerprint=self.data_fingerprint, evaluation=e.mode,
            sandbox="bubblewrap" if self.sandboxed else "none", max_model_mb=e.max_model_mb,
        )

    def _evaluator(self, slot: WorkerSlot) -> Evaluator | None:
        """The slot's warm evaluator (a slot runs one job at a time, so it is never shared)."""
        if self.config.evaluation.mode != "sealed":
            return None
        if slot.label not in self.evaluators:
            log = self.store.dir / f"evaluator-{slot.label.replace('#', '').replace(':', '')}.log"
            self.evaluators[slot.label] = Evaluator(slot.device, slot.gpu, slot.threads, bool(self.sandboxed), log)
        return self.evaluators[slot.label]

    def _decide_sandbox(self) -> None:
        """Probe bubblewrap once per engine and say plainly what the variants will run in."""
        e = self.config.evaluation
        self.sandboxed = use_sandbox(e.sandbox, warn=self.log)
        if e.mode == "in_process":
            self.log("evo: warning: evaluation.mode is in_process: each variant scores itself, inside its own "
                     "process, so a variant can forge its score. Every record of this run says unsealed.")

    def evaluate(self, individual: Individual, slot: WorkerSlot) -> RunResult:
        run_dir = self.store.variant_dir(individual.id)
        code = self.code_of(individual.id)
        smoke = self.config.cascade.smoke_seconds
        if smoke and individual.operator != "seed":
            settings = self.run_settings(slot, seconds=smoke)
            settings.eval_tokens = min(settings.eval_tokens, 4 * settings.seq_len)
            result = run_variant(code, settings, run_dir / "smoke", individual.run_token, self.cancel, self._evaluator(slot))
            if result.status != "ok":
                result.reason = f"smoke run: {result.reason}"
                return result
        return run_variant(code, self.run_settings(slot), run_dir, individual.run_token, self.cancel, self._evaluator(slot))

    def record(self, individual: Individual, result: RunResult) -> None:
        individual.status = result.status
        individual.reason = result.reason
        individual.metrics = json.dumps(result.metrics)
        individual.val_bpb = result.val_bpb
        individual.wall_seconds = result.wall_seconds
        individual.peak_memory_mb = result.peak_memory_mb
        individual.finished_at = time.time()
        individual.run_token = ""
        c = self.counters
        c.evaluations += 1
        c.by_status[result.status] = c.by_status.get(result.status, 0) + 1
        if result.reason.startswith("smoke run:"):
            c.smoke_failures[result.status] = c.smoke_failures.get(result.status, 0) + 1
        parent = self.population.individuals.get(individual.parents[0]) if individual.parents else None
        if individual.evaluated_ok and parent is not None and parent.val_bpb is not None and individual.val_bpb < parent.val_bpb:
            c.improved[individual.operator] = c.improved.get(individual.operator, 0) + 1
        self._feedback(individual.operator, json.loads(individual.details), individual.val_bpb, evaluated=True)
        if individual.operator == "seed" and individual.evaluated_ok:
            self.guard.start(individual.id, individual.val_bpb)
            individual.verdict = "champion" if self.config.guard.enabled else ""
        elif individual.evaluated_ok:
            self.guard.consider(individual.id, individual.val_bpb)

    def record_guard(self, job: Job, result: RunResult) -> None:
        self.counters.guard_runs += 1
        for candidate, value in self.guard.record(job, result.status, result.metrics):
            self.guard.consider(candidate, value)
        verdict = self.guard.records[job.individual].verdict
        if verdict:
            self.population.individuals[job.individual].verdict = verdict

    def _feedback(self, operator_name: str, details: dict, val_bpb: float | None, evaluated: bool) -> None:
        """Operators that learn (Optuna) hear how their children did."""
        operator = self.operators.get(operator_name)
        if operator is not None and hasattr(operator, "feedback"):
            operator.feedback(details, val_bpb, evaluated)

    def adopt_finished_results(self) -> int:
        """After a crash: evaluations that finished (result.json written) but were not checkpointed.

        A result is adopted only if the runner wrote it for this very evaluation: the run token
        recorded when it started and the hash of the code it ran must both match.
        """
        adopted = 0
        for individual in self.population.pending():
            result = self._finished_result(self.store.variant_dir(individual.id), individual.run_token, individual.id)
            if result is not None:
                self.record(individual, result)
                adopted += 1
        for job in list(self.guard.queue):
            result = self._finished_result(self.store.variant_dir(job.individual) / job.key, job.token, job.individual)
            if result is not None:
                self.guard.queue.remove(job)
                self.record_guard(job, result)
                adopted += 1
        return adopted

    def _finished_result(self, folder, token: str, individual_id: str) -> RunResult | None:
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
        """Kill processes of evaluations that were in flight when the engine died."""
        tokens = [i.run_token for i in self.population.pending()] + [j.token for j in self.guard.queue]
        return sum(processes.kill_by_token(t) for t in tokens if t)

    # ---- the loop ----
    def _submit(self, pool: ThreadPoolExecutor, slot: WorkerSlot, breeding_allowed: bool) -> bool:
        """Start the next job on a free worker: guard re-runs first, then children."""
        if self.cancel.is_set():
            return False
        with self.lock:
            job = self.guard.take()
            if job is not None:
                job.token = uuid.uuid4().hex
                self._guard_running.append(job)
                self.checkpoint()  # the job is recorded with its token before it runs
                self._in_flight[pool.submit(self._guard_work, slot, job)] = (slot, "guard")
                return True
            if breeding_allowed and self._can_start():
                self._in_flight[pool.submit(self._child_work, slot)] = (slot, "child")
                return True
        return False

    def _collect(self, future: Future, slot: WorkerSlot, kind: str) -> bool:
        """Record a finished job; False when a child job could not breed anything."""
        outcome = future.result()
        if outcome is None:
            return False
        with self.lock:
            if kind == "guard":
                job, result = outcome
                self._guard_running.remove(job)
                self.record_guard(job, result)
                self.checkpoint()
                return True
            individual, result = outcome
            self._running.discard(individual.id)
            self.record(individual, result)
            self.checkpoint()
        self._report(individual)
        return True

    def run(self) -> str:
        if self.sandboxed is None:
            self._decide_sandbox()
        free = list(self.slots)
        pool = ThreadPoolExecutor(max_workers=len(self.slots), thread_name_prefix="evo-worker")
        reason, fruitless = None, 0
        try:
            while True:
                reason = reason or self.stop_reason()
                # After a stop reason, queued guard re-runs still finish: no verdict is left open.
                while free and self._submit(pool, free[0], breeding_allowed=reason is None):
                    free.pop(0)
                    reason = reason or self.stop_reason()
                if not self._in_flight:
                    break
                self.on_tick(self.snapshot())
                done, _ = wait(list(self._in_flight), timeout=1.0, return_when=FIRST_COMPLETED)
                for future in done:
                    slot, kind = self._in_flight.pop(future)
                    free.append(slot)
                    try:
                        collected = self._collect(future, slot, kind)
                    except (EvaluationUntrusted, SandboxUnavailable, EvaluatorFailed) as e:
                        # Not the variant's fault: stop everything; what was in flight stays queued.
                        reason = f"stopped, nothing more can be evaluated: {e}"
                        self.cancel.set()
                        continue
                    except RunCancelled:
                        continue
                    if collected:
                        fruitless = 0
                        continue
                    fruitless += 1
                    if fruitless >= 3 and not self._in_flight:
                        reason = reason or "no new child could be bred (all proposals refused or duplicates)"
                reason = self.stop_reason() if reason is None else reason
        except KeyboardInterrupt:
            reason = "interrupted"
            self.cancel.set()
            for future, (slot, kind) in list(self._in_flight.items()):
                try:
                    self._collect(future, slot, kind)
                except RunCancelled:
                    pass  # stays pending (or queued); resume runs it again
            self._in_flight.clear()
            raise
        finally:
            pool.shutdown(wait=True)
            for evaluator in self.evaluators.values():
                evaluator.close()
            with self.lock:
                self.counters.elapsed_seconds = self.elapsed_seconds()
                self._session_start = time.monotonic()
                self.checkpoint()
        return reason or "done"

    def snapshot(self) -> Snapshot:
        best = self.population.best()
        s = self.config.stopping
        elapsed = self.elapsed_seconds()
        left = []
        if s.max_hours is not None:
            left.append(max(0.0, s.max_hours * 3600 - elapsed))
        if s.max_evaluations is not None and self.counters.evaluations:
            per_evaluation = elapsed / self.counters.evaluations  # parallel workers already in it
            left.append(max(0, s.max_evaluations - self.counters.evaluations) * per_evaluation)
        return Snapshot(
            done=self.counters.evaluations, limit=s.max_evaluations,
            best=best.val_bpb if best else None, best_id=best.id if best else None,
            busy=len(self._in_flight), workers=len(self.slots), elapsed=elapsed,
            time_left=min(left) if left else None,
        )

    def _report(self, individual: Individual) -> None:
        best = self.population.best()
        total = self.config.stopping.max_evaluations
        value = f"{individual.val_bpb:.4f}" if individual.val_bpb is not None else "-"
        best_text = f"{best.val_bpb:.4f} ({best.id})" if best else "-"
        busy = len(self._in_flight)
        self.log(
            f"[{self.counters.evaluations}{'/' + str(total) if total else ''}] {individual.id} "
            f"{individual.operator:<8} {individual.status:<10} val_bpb {value}  best {best_text}  "
            f"workers busy {busy}/{len(self.slots)}  {clock(self.elapsed_seconds())}"
            + (f"  | {individual.hypothesis}" if individual.hypothesis else "")
        )


def _rng_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(data) -> tuple:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
