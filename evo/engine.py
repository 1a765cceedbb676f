"""The engine: a scheduler that keeps the executor full, asynchronous and steady-state.

Three parts, each its own module: the breeder makes children in its own threads (evo/breeder.py),
the recorder remembers and checkpoints everything (evo/recorder.py), and the guard decides who
may be champion and owns its re-runs (evo/guard.py). This module only decides what runs next:
guard re-runs first, then queued children oldest first, the seed before anything. Fast
operators breed each child when a slot frees, from the latest results; a slow LLM's children are
bred ahead, as far as its latency needs, so no slot waits for it.

Stops: a soft stop (max_evaluations, target_val_bpb, nothing left to breed) lets evaluations in
flight and queued guard re-runs finish, so no verdict is left open. A hard stop (max_hours,
Ctrl-C, an LLM outage past its limit, an untrustworthy set-up) cancels everything in flight at
once; what was cancelled stays queued for `evo resume`.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Callable

import prepare
from evo.breeder import Breeder
from evo.config import Config
from evo.executors import Executor, make_executor
from evo.guard import ANCHOR, Guard, GuardRun
from evo.jobs import CHILD, Job, JobLost
from evo.population import Individual
from evo.progress import Snapshot, clock, standing
from evo.recorder import Counters, Recorder
from evo.stats import moving_average
from evo.store import RunStore
from mutators import registry
from trainer.runner import (EvaluationUntrusted, EvaluatorFailed, RunCancelled, RunResult, RunSettings,
                            SandboxUnavailable, use_sandbox)

READY_PER_SLOT = 2  # at most this many children bred ahead per evaluation slot, for slow (LLM) operators
JUST_IN_TIME = 0.05  # breeding that takes under this share of an evaluation is done when a slot frees
LOST_JOB_RETRIES = 3  # a job whose machine keeps dying is given up after this many re-queues
FRUITLESS_BREEDS = 3  # breeding tasks in a row with no child, nothing running: the run has nowhere to go


def children_ahead_per_slot(breed_seconds: float | None, evaluation_seconds: float | None, uses_llm: bool) -> int:
    """Children to keep bred ahead of each evaluation slot (see Engine._more_children_wanted).
    Before either time is known, an LLM operator is assumed slow and the others fast."""
    if breed_seconds is None or not evaluation_seconds:
        return READY_PER_SLOT if uses_llm else 0
    if breed_seconds <= JUST_IN_TIME * evaluation_seconds:
        return 0
    return min(READY_PER_SLOT, math.ceil(breed_seconds / evaluation_seconds))


class Engine:
    def __init__(self, config: Config, store: RunStore, log: Callable[[str], None] = print,
                 on_tick: Callable[[Snapshot], None] = lambda snapshot: None, executor: Executor | None = None,
                 operators: dict | None = None):
        self.config = config
        self.store = store
        self.log = log
        self.on_tick = on_tick
        self.guard = Guard(config.guard, log=lambda line: self.log(line), evaluation_seed=config.seed)
        self.recorder = Recorder(config, store, self.guard, log=lambda line: self.log(line))
        self.population = self.recorder.population
        self.cancel = threading.Event()  # breeding and LLM requests
        operators = registry.build(config, store.dir) if operators is None else operators
        self.breeder = Breeder(config, operators, self.recorder, self.cancel,
                               log=lambda line: self.log(line))
        self.executor = executor
        self.seed_code = (store.dir / "seed.py").read_text()
        self.data_dir = config.data.dir or prepare.DATA_DIR
        info = store.run_info()
        self.prepare_hash = info["prepare_hash"]
        self.data_fingerprint = info["data_fingerprint"]
        self.sandboxed: bool | None = None  # decided when the run starts (bubblewrap probed once)
        self._in_flight: dict[Future, Job] = {}
        self._submitted_at: dict[Future, float] = {}
        self._seconds_per_job: float | None = None  # moving average of a slot's job, submit to result
        self._guard_runs: dict[str, GuardRun] = {}  # job token -> the guard's run
        self._lost: list[Job] = []  # jobs whose machine went away: first in line again
        self._stop_asked: str | None = None
        self._draining = False  # a soft stop was reached: no more children, guard work finishes

    def stop(self, why: str) -> None:
        """Ask the run to stop as soon as it can (thread-safe): a hard stop, everything stays queued."""
        self._stop_asked = why
        self.cancel.set()

    # ---- the run's memory (the recorder's) ----
    @property
    def counters(self) -> Counters:
        return self.recorder.counters

    def restore(self, individuals: list[Individual], state: dict) -> None:
        self.recorder.restore(individuals, state)

    def checkpoint(self) -> None:
        self.recorder.checkpoint()

    def elapsed_seconds(self) -> float:
        return self.recorder.elapsed_seconds()

    def adopt_finished_results(self) -> int:
        adopted = self.recorder.adopt_finished_results()
        for individual in adopted:
            self._tell_operator(individual)
        return len(adopted)

    def _tell_operator(self, individual: Individual) -> None:
        """The operator that bred a child hears how it did (Optuna's tell, the LLM's memory of ideas)."""
        if individual.operator != "seed":
            self.breeder.feedback(individual.operator, json.loads(individual.details), individual.val_bpb, evaluated=True)

    def sweep_leftovers(self) -> int:
        return self.recorder.sweep_leftovers()

    # ---- stopping ----
    def _children_started(self) -> int:
        running = list(self._in_flight.values()) + self._lost
        return self.counters.evaluations + sum(job.kind == CHILD for job in running)

    def stop_reason(self, breeding: bool = True) -> tuple[str, bool] | None:
        """(why, hard) once the run should stop; a hard stop cancels what is in flight. An LLM
        outage matters only while children are still being bred."""
        s = self.config.stopping
        if self._stop_asked is not None:
            return f"stopped: {self._stop_asked}", True
        if s.max_hours is not None and self.elapsed_seconds() >= s.max_hours * 3600:
            return f"max_hours ({s.max_hours:g}) reached; evaluations in flight were stopped and stay queued", True
        outage = self.breeder.outage_reason() if breeding else None
        if outage:
            return outage, True
        if s.max_evaluations is not None and self._children_started() >= s.max_evaluations:
            return f"max_evaluations ({s.max_evaluations}) reached", False
        best = self.population.best()
        if (s.target_val_bpb is not None and best is not None and self.population.score(best) <= s.target_val_bpb
                and not self.guard.awaiting(best.id)):  # a candidate's lucky draw waits for its re-runs
            return (f"target val_bpb {s.target_val_bpb} reached by {best.id} "
                    f"({self.population.score_label(best)} {self.population.score(best):.4f})"), False
        return None

    def _nowhere_to_go(self) -> str | None:
        """Nothing runs, nothing is queued or breeding: say why, in words a person can act on."""
        if self._in_flight or self._queued() or self.breeder.in_flight() or self.guard.queue or self._lost:
            return None
        seed = next((i for i in list(self.population.individuals.values()) if i.operator == "seed"), None)
        if seed is not None and not seed.evaluated_ok and self.population.best() is None:
            return (f"the seed {seed.id} failed ({seed.status}: {seed.reason}); nothing can be bred from it. "
                    f"See {self.store.variant_dir(seed.id) / 'log.txt'}")
        if self.breeder.fruitless >= FRUITLESS_BREEDS:
            top = self.recorder.top_refusals()
            return "no new child could be bred (all proposals refused or duplicates)" + (f": {top}" if top else "")
        return None

    # ---- what runs next ----
    def _queued(self) -> list[Individual]:
        running = {job.individual for job in self._in_flight.values() if job.kind == CHILD}
        running |= {job.individual for job in self._lost if job.kind == CHILD}
        return [i for i in self.population.pending() if i.id not in running]

    def _next_job(self, children_allowed: bool) -> Job | None:
        """Lost jobs first, then guard re-runs, then queued children oldest first (the seed first of all)."""
        if self._lost:
            return self._lost.pop(0)
        with self.recorder.lock:
            run = self.guard.take()
            if run is not None:
                run.token = uuid.uuid4().hex
                self.recorder.checkpoint()  # recorded with its token before it runs: resume can sweep it
                job = self._guard_job(run)
                self._guard_runs[job.token] = run
                self.log(f"guard: {run.kind} run of {run.individual} started (seed {run.seed}); "
                         f"{len(self.guard.queue)} more guard run(s) queued")
                return job
            if not children_allowed:
                return None
            if not self.population.individuals:
                self.recorder.new_individual(self.seed_code, "seed", [], island=0)
            queued = self._queued()
            if not queued:
                return None
            individual = min(queued, key=lambda i: i.birth)
            if not individual.run_token:
                individual.run_token = uuid.uuid4().hex
            smoke = self.config.cascade.smoke_seconds if individual.operator != "seed" else 0.0
            return Job(CHILD, individual.id, self.recorder.code_of(individual.id), self.run_settings(seed=individual.eval_seed),
                       str(self.store.variant_dir(individual.id)), individual.run_token, smoke_seconds=smoke)

    def _guard_job(self, run: GuardRun) -> Job:
        """A re-run for the guard: on one of the guard's seeds, held-out scored (not the anchor, which
        only places the seed on the evaluation seed), in the variant's own sub-folder."""
        settings = self.run_settings(seconds=self.config.budget.seconds * run.budget_multiplier, seed=run.seed)
        settings.heldout = run.kind != ANCHOR
        folder = self.store.variant_dir(run.individual) / run.key
        return Job(run.kind, run.individual, self.recorder.code_of(run.individual), settings, str(folder), run.token)

    def run_settings(self, seconds: float | None = None, seed: int | None = None) -> RunSettings:
        b, d, e = self.config.budget, self.config.data, self.config.evaluation
        if self.config.executor.kind == "local":
            sandbox = "bubblewrap" if self.sandboxed else "none"
        else:
            sandbox = e.sandbox  # each node decides for itself, and every result records what it did
        return RunSettings(
            time_budget=seconds or b.seconds, seed=self.config.seed if seed is None else seed,
            data_dir=self.data_dir, seq_len=d.seq_len, eval_tokens=d.eval_tokens, startup_grace=b.startup_grace,
            eval_grace=b.eval_grace, memory_limit_mb=b.memory_limit_mb, expected_prepare_hash=self.prepare_hash,
            data_fingerprint=self.data_fingerprint, evaluation=e.mode, sandbox=sandbox, max_model_mb=e.max_model_mb,
        )

    def _more_children_wanted(self) -> int:
        """Breeding tasks to start now; never more than the evaluations left.

        A child's parents are chosen when it is bred, so a child bred ahead misses every result
        that arrives while it waits: with one worker and three children ahead, each parent was
        chosen three evaluations late, and a winner went unused for as long. Fast operators (AST,
        Optuna: milliseconds) are therefore bred just in time, one per free slot. Only when
        proposals take a noticeable share of an evaluation (an LLM) are children bred ahead, up
        to READY_PER_SLOT per slot plus as many in flight as the breeder has threads, so a slow
        LLM keeps pace with fast evaluations."""
        coming = len(self._queued()) + self.breeder.in_flight()
        ahead = children_ahead_per_slot(self.breeder.seconds_per_child, self._seconds_per_job,
                                        self.breeder.uses_llm)
        if ahead == 0:
            more = self.executor.capacity() - len(self._in_flight) - coming  # slots free after _fill
        else:
            more = ahead * self.executor.capacity() + self.breeder.threads - coming
        limit = self.config.stopping.max_evaluations
        if limit is not None:
            more = min(more, limit - self._children_started() - coming)
        return max(0, more)

    # ---- the loop ----
    def _start(self) -> None:
        if self.executor is None:
            if self.sandboxed is None and self.config.executor.kind == "local":
                self._decide_sandbox()
            self.executor = make_executor(self.config, self.sandboxed, self.store.dir, self.log)
        if self.config.evaluation.mode == "in_process":
            self.log("evo: warning: evaluation.mode is in_process: each variant scores itself, inside its own "
                     "process, so a variant can forge its score. Every record of this run says unsealed.")

    def _decide_sandbox(self) -> None:
        """Probe bubblewrap once per engine and say plainly what the variants will run in."""
        self.sandboxed = use_sandbox(self.config.evaluation.sandbox, warn=self.log)

    def run(self) -> str:
        self._start()
        reason = None  # a soft stop: no more children, but what runs and the queued guard re-runs finish
        hard = True  # unless the loop ends on its own: a stop that cancelled work, which stays queued
        try:
            while True:
                stop = self.stop_reason(breeding=reason is None)  # hard stops count even while draining
                if stop is not None:
                    why, cancels = stop
                    if cancels:
                        reason = why
                        self._stop_everything(why)
                        break
                    reason = reason or why
                    self._draining = True
                self._fill(children_allowed=reason is None)
                stuck = self.breeder.fruitless >= FRUITLESS_BREEDS and not self._in_flight
                if reason is None and self.population.best() is not None and not stuck:
                    self.breeder.top_up(self._more_children_wanted())
                if not self._in_flight:
                    reason = reason or self._nowhere_to_go()
                    if reason is not None and not self.guard.queue:
                        hard = False
                        break
                self.recorder.save_if_due()
                self.on_tick(self.snapshot())
                waiting = list(self._in_flight) + self.breeder.futures()
                if waiting:
                    done, _ = wait(waiting, timeout=1.0, return_when=FIRST_COMPLETED)
                else:
                    time.sleep(0.5)  # e.g. every operator waits out an LLM outage
                    done = set()
                self.breeder.collect()
                error = None
                for future in done:
                    job = self._in_flight.pop(future, None)
                    if job is not None:
                        self._time_job(future)
                        error = self._collect(future, job)
                        if error is not None:  # not the variant's fault: a hard stop, whatever else holds
                            break
                if error is not None:
                    reason = error
                    self._stop_everything(error)
                    break
        except KeyboardInterrupt:
            reason = "interrupted"
            self._stop_everything("Ctrl-C")
            raise
        finally:
            self.breeder.close()
            self.executor.close()
            self.recorder.close_session(reason or "the engine failed", hard)
        return reason or "done"

    def _fill(self, children_allowed: bool) -> None:
        while len(self._in_flight) < self.executor.capacity():
            job = self._next_job(children_allowed)
            if job is None:
                return
            future = self.executor.submit(job)
            self._in_flight[future] = job
            self._submitted_at[future] = time.monotonic()

    def _time_job(self, future: Future) -> None:
        self._seconds_per_job = moving_average(self._seconds_per_job, time.monotonic() - self._submitted_at.pop(future))

    def _collect(self, future: Future, job: Job) -> str | None:
        """Record a finished job; returns a reason when the run must stop (not the variant's fault)."""
        try:
            result = future.result()
        except RunCancelled:
            self._put_back(job)
            return None
        except JobLost as e:
            return self._lost_job(job, str(e))
        except (EvaluationUntrusted, SandboxUnavailable, EvaluatorFailed) as e:
            self._put_back(job)  # stays queued: resume runs it once the set-up is fixed
            return f"stopped, nothing more can be evaluated: {e}"
        except Exception as e:  # noqa: BLE001 - an executor's own fault (e.g. a node with other data)
            self._put_back(job)
            return f"stopped, nothing more can be evaluated: {type(e).__name__}: {e}"
        self._record(job, result)
        return None

    def _record(self, job: Job, result: RunResult) -> None:
        with self.recorder.lock:
            if job.kind == CHILD:
                individual = self.population.individuals[job.individual]
                self.recorder.record(individual, result)
            else:
                run = self._guard_runs.pop(job.token)
                self.recorder.record_guard(run, result)
                value = f"val_bpb {result.val_bpb:.4f}" if result.val_bpb is not None else result.reason[:120]
                # The val number only: held-out numbers never reach a log (logs may reach an LLM).
                self.log(f"guard: {run.kind} run of {run.individual} finished: {result.status} {value}")
            self.recorder.checkpoint()
        if job.kind == CHILD:
            self._tell_operator(individual)
            self._report(individual)

    def _put_back(self, job: Job) -> None:
        """A cancelled job: a child stays pending, a guard run goes back to the front of the queue."""
        if job.kind != CHILD:
            with self.recorder.lock:  # a breeder's checkpoint must never see it in neither list
                run = self._guard_runs.pop(job.token, None)
                if run is not None:
                    self.guard.put_back(run)

    def _lost_job(self, job: Job, why: str) -> str | None:
        """The machine went away: run it again elsewhere; only a job that keeps killing machines is given up."""
        with self.recorder.lock:
            self.counters.lost_jobs += 1
            self.recorder.changed()
        job.attempts += 1
        if job.attempts <= LOST_JOB_RETRIES:
            self.log(f"{job.key}: its machine was lost ({why}); re-queued (attempt {job.attempts + 1})")
            self._lost.append(job)
            return None
        self.log(f"{job.key}: lost with its machine {job.attempts} times; recorded as a crash")
        self._record(job, RunResult(status="crash", reason=f"its machine was lost {job.attempts} times: {why}"[:2000]))
        return None

    def _stop_everything(self, why: str) -> None:
        """Hard stop: cancel breeding, LLM requests and evaluations in flight; they stay queued."""
        self.cancel.set()
        if self._in_flight or self.breeder.in_flight():
            self.log(f"stopping ({why}): {len(self._in_flight)} evaluation(s) in flight are killed and stay queued "
                     f"for `evo resume`; {self.breeder.in_flight()} proposal(s) in progress are abandoned")
        for job in self._in_flight.values():
            self.executor.cancel(job)
        for future, job in list(self._in_flight.items()):
            try:
                result = future.result(timeout=120)
            except Exception:  # noqa: BLE001 - cancelled, lost or failed: it stays queued either way
                self._put_back(job)
                continue
            self._record(job, result)  # it finished before the cancel reached it
        self._in_flight.clear()
        self._submitted_at.clear()
        for job in self._lost:
            self._put_back(job)
        self._lost.clear()

    # ---- what a person sees ----
    def snapshot(self) -> Snapshot:
        s = self.config.stopping
        elapsed = self.elapsed_seconds()
        guard_left = len(self.guard.queue) + len(self.guard.running)
        left = []
        if s.max_hours is not None:
            left.append(max(0.0, s.max_hours * 3600 - elapsed))
        jobs_done = self.counters.evaluations + self.counters.guard_runs
        if s.max_evaluations is not None and jobs_done:
            per_job = elapsed / jobs_done  # parallel workers already in it; guard runs cost as much as children
            in_flight = sum(job.kind == CHILD for job in self._in_flight.values())
            children_left = in_flight if self._draining else max(0, s.max_evaluations - self.counters.evaluations)
            left.append((children_left + guard_left) * per_job)
        text, champion_id = self.standing()
        return Snapshot(
            done=self.counters.evaluations, limit=s.max_evaluations, standing=text, champion_id=champion_id,
            busy=len(self._in_flight), workers=self.executor.capacity() if self.executor else 0, elapsed=elapsed,
            time_left=min(left) if left else None, note=self.breeder.note(), guard_left=guard_left,
        )

    def standing(self) -> tuple[str, str | None]:
        """The "champion ... | best first draw ..." text (progress.standing) and the champion's id."""
        record = self.guard.champion if self.config.guard.enabled else None
        if record is not None:
            stats = record.stats()
            champion_id, value = record.id, stats["val_mean"] if stats else record.first_val
            label = "re-run mean" if stats else "first draw, re-runs pending"
            on_seed = self.guard.on_evaluation_seed(record.id) if stats else None
        else:  # no guard: the champion is simply the best first draw
            best = self.population.best()
            champion_id, value, label = (best.id, best.val_bpb, "first draw") if best else (None, None, "")
            on_seed = None
        first = self.population.best_first_draw()
        return standing(champion_id, value, label, first.id if first else None, first.val_bpb if first else None,
                        on_seed), champion_id

    def _report(self, individual: Individual) -> None:
        total = self.config.stopping.max_evaluations
        value = f"{individual.val_bpb:.4f}" if individual.val_bpb is not None else "-"
        self.log(
            f"[{self.counters.evaluations}{'/' + str(total) if total else ''}] {individual.id} "
            f"{individual.operator:<8} {individual.status:<10} val_bpb {value}  | {self.standing()[0]} |  "
            f"workers busy {len(self._in_flight)}/{self.executor.capacity()}  {clock(self.elapsed_seconds())}"
            + (f"  | {individual.hypothesis}" if individual.hypothesis else "")
        )
