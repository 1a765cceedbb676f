"""The engine's scheduling, breeding and recording against the fake executor: no process is
started, so each run takes a fraction of a second and the engine's decisions can be pinned down."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import Future

import pytest

from evo.executors.fake import FakeExecutor, ok
from evo.jobs import CHILD, JobLost
from evo.runs import resume_run
from evo.store import RunStore
from mutators.base import Proposal, Refusal
from tests.fakes import by_quality, engine_with, quality
from trainer.runner import EvaluatorFailed, RunResult


class StepQuality:
    """A deterministic operator: each child sets QUALITY a step further; optional delay and faults."""

    name = "perturb"  # a configured operator's name: the config accepts only known ones
    parents_needed = 1

    def __init__(self, seconds: float = 0.0, fail_every: int = 0, outage: threading.Event | None = None):
        self.seconds, self.fail_every, self.outage = seconds, fail_every, outage
        self.calls = 0
        self.lock = threading.Lock()

    def propose(self, parents, rng):
        with self.lock:
            self.calls += 1
            n = self.calls
        if self.seconds:
            time.sleep(self.seconds)
        if self.outage is not None and self.outage.is_set():
            refusal = Refusal(self.name, "connection failed (server down)")
            refusal.outage = True
            return refusal
        if self.fail_every and n % self.fail_every == 0:
            raise ValueError("a bug in the operator")
        code = re.sub(r"^QUALITY = .*$", f"QUALITY = {0.5 + n * 1e-3}", parents[0].code, flags=re.MULTILINE)
        return Proposal(code, self.name, {}, f"quality step {n}")


def test_a_fake_run_of_many_evaluations_takes_no_processes_and_keeps_every_slot_busy(setup_run):
    executor = FakeExecutor(by_quality, slots=3)
    engine, run_dir = engine_with(setup_run, executor, max_evaluations=30, workers=3)
    reason = engine.run()
    assert "max_evaluations (30)" in reason
    individuals, state = RunStore(run_dir).load()
    assert len(individuals) == 30 and all(i.status == "ok" for i in individuals)
    assert state["counters"]["evaluations"] == 30
    assert len({i.code_hash for i in individuals}) == 30
    assert [job.kind for job in executor.jobs] == [CHILD] * 30  # guard off: nothing else ran
    assert all(i.device == "fake" for i in individuals)


def test_breeding_ahead_means_a_freed_slot_never_waits_for_a_slow_operator(setup_run):
    # Each proposal takes 0.3 s, each evaluation 0.5 s. Bred ahead, every child after the first
    # is born while its predecessor is still being evaluated, so a freed slot starts at once.
    slow = StepQuality(seconds=0.3)
    executor = FakeExecutor(by_quality, slots=1, seconds=0.5)
    engine, run_dir = engine_with(setup_run, executor, ops={"perturb": slow}, max_evaluations=8)
    finished = {}
    original = executor._finish

    def finish(job, future, seconds):
        finished[job.individual] = time.time()
        original(job, future, seconds)

    executor._finish = finish
    engine.run()
    individuals, _ = RunStore(run_dir).load()
    order = [job.individual for job in executor.jobs]
    born = {i.id: i.created_at for i in individuals}
    assert len(order) == 8
    # From the third job on: born before the job ahead of it had finished.
    late = [b for a, b in zip(order[1:], order[2:]) if born[b] >= finished[a]]
    assert not late, f"children bred only after a slot freed: {late}"


def test_an_operator_that_raises_is_a_counted_refusal_and_the_run_goes_on(setup_run):
    flaky = StepQuality(fail_every=2)
    engine, run_dir = engine_with(setup_run, FakeExecutor(by_quality), ops={"perturb": flaky}, max_evaluations=6)
    assert "max_evaluations (6)" in engine.run()
    _, state = RunStore(run_dir).load()
    assert state["counters"]["evaluations"] == 6
    assert state["counters"]["refusals"]["perturb"] == {"operator raised ValueError: a bug in the operator": 4}


def test_a_job_whose_machine_dies_is_re_queued_and_recorded_exactly_once(setup_run):
    lost = set()

    def flaky_machine(job):
        if job.individual == "v00003" and len(lost) < 2:
            lost.add(len(lost))
            raise JobLost("node 10.0.0.7 died")
        return by_quality(job)

    executor = FakeExecutor(flaky_machine, slots=2)
    engine, run_dir = engine_with(setup_run, executor, max_evaluations=5, workers=2)
    engine.run()
    individuals, state = RunStore(run_dir).load()
    assert all(i.status == "ok" for i in individuals) and len(individuals) == 5
    assert [job.individual for job in executor.jobs].count("v00003") == 3
    assert state["counters"]["lost_jobs"] == 2 and state["counters"]["evaluations"] == 5


def test_a_job_that_keeps_killing_machines_is_given_up_as_a_crash(setup_run):
    def deadly(job):
        if job.individual == "v00002":
            raise JobLost("node died")
        return by_quality(job)

    engine, run_dir = engine_with(setup_run, FakeExecutor(deadly), max_evaluations=4)
    engine.run()
    individuals, _ = RunStore(run_dir).load()
    v2 = next(i for i in individuals if i.id == "v00002")
    assert v2.status == "crash" and "lost 4 times" in v2.reason
    assert sum(i.status == "ok" for i in individuals) == 3


def test_max_hours_stops_within_seconds_and_what_was_running_stays_queued(setup_run):
    # Evaluations take 30 s each; the limit is 2 s: the run must not wait for the one in flight.
    executor = FakeExecutor(by_quality, slots=1, seconds=lambda job: 0.0 if job.individual == "v00001" else 30.0)
    engine, run_dir = engine_with(setup_run, executor, max_evaluations=50)
    engine.config.stopping.max_hours = 2 / 3600
    started = time.monotonic()
    reason = engine.run()
    assert time.monotonic() - started < 20
    assert reason.startswith("max_hours") and "stay queued" in reason
    individuals, _ = RunStore(run_dir).load()
    assert [i.status for i in individuals].count("pending") >= 1
    assert executor.cancelled  # the evaluation in flight was stopped, not waited for
    resumed = resume_run(run_dir, ["stopping.max_hours=null"], log=lambda line: None)
    resumed.executor = FakeExecutor(by_quality)
    resumed.run()
    individuals, _ = RunStore(run_dir).load()
    assert len(individuals) == 50 and all(i.status == "ok" for i in individuals)


def test_counters_reach_the_checkpoint_while_breeding_is_stuck(setup_run, monkeypatch):
    import evo.recorder

    monkeypatch.setattr(evo.recorder, "SAVE_EVERY_SECONDS", 0.2)

    class Refuses:
        name, parents_needed = "perturb", 1

        def propose(self, parents, rng):
            time.sleep(0.05)
            return Refusal("perturb", "child is identical to its parent")

    engine, run_dir = engine_with(setup_run, FakeExecutor(by_quality), ops={"perturb": Refuses()}, max_evaluations=5)
    seen = []

    def watch():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not seen:
            try:
                _, state = RunStore(run_dir).load()
            except Exception:  # noqa: BLE001 - mid-write; try again
                continue
            refused = sum(state["counters"]["refusals"].get("perturb", {}).values())
            if refused >= 5 and state["counters"]["evaluations"] == 1 and state["counters"]["elapsed_seconds"] > 0.3:
                seen.append(refused)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    reason = engine.run()
    watcher.join()
    assert seen, "refusals and time used were not saved while the run was going"
    assert reason.startswith("no new child could be bred") and "child is identical to its parent" in reason


def test_an_llm_outage_pauses_that_operator_lets_others_go_on_and_stops_past_the_limit(setup_run):
    down = threading.Event()
    down.set()
    llm = StepQuality(outage=down)
    llm.name = "llm"
    ast = StepQuality()
    engine, run_dir = engine_with(setup_run, FakeExecutor(by_quality, seconds=0.05), ops={"llm": llm, "perturb": ast},
                                  max_evaluations=500, operators={"llm": 1.0, "perturb": 1.0},
                                  mutators={"llm": {"max_outage_minutes": 3 / 60}})
    notes = []
    engine.on_tick = lambda snapshot: notes.append(snapshot.note)
    started = time.monotonic()
    reason = engine.run()
    assert 3 <= time.monotonic() - started < 60
    assert "unreachable" in reason and "max_outage_minutes" in reason
    individuals, _ = RunStore(run_dir).load()
    assert sum(i.operator == "perturb" for i in individuals) >= 3  # the other operator went on
    assert any("llm: server unreachable" in note for note in notes)
    assert llm.calls < 20  # backed off, not hammered


def test_a_failed_seed_ends_the_run_with_its_reason_and_log(setup_run):
    engine, run_dir = engine_with(setup_run, FakeExecutor(lambda job: RunResult("crash", "RuntimeError")), max_evaluations=5)
    reason = engine.run()
    assert "the seed v00001 failed (crash: RuntimeError)" in reason
    assert str(run_dir / "variants" / "v00001" / "log.txt") in reason


def test_guard_runs_go_first_and_finish_after_the_limit(setup_run):
    executor = FakeExecutor(lambda job: ok(2.0 + abs(1.0 - quality(job.code)) + 0.001 * (job.settings.seed % 3)), slots=2)
    engine, run_dir = engine_with(setup_run, executor, max_evaluations=6, workers=2,
                                  guard={"enabled": True, "noise_runs": 2, "reruns": 2, "z": 0.0, "min_delta": 0.0})
    engine.run()
    _, state = RunStore(run_dir).load()
    kinds = [job.kind for job in executor.jobs]
    assert kinds[0] == CHILD and kinds.count("noise") == 2
    assert state["guard"]["queue"] == []  # every verdict given, though breeding stopped at 6
    # Held-out is scored on every guard run that may decide a promotion, never on the anchor or a child.
    assert all(job.settings.heldout == (job.kind not in (CHILD, "anchor")) for job in executor.jobs)
    assert kinds.count("anchor") == 1
    assert not any(job.settings.heldout for job in executor.jobs if job.kind == CHILD)


def test_a_real_llm_server_that_is_down_pauses_the_llm_while_perturb_goes_on(setup_run):
    """The real LLM operator on a closed port of 127.0.0.1, through the real openai client."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    engine, run_dir = engine_with(setup_run, FakeExecutor(by_quality), max_evaluations=8,
                                  operators={"llm": 4.0, "perturb": 1.0},
                                  mutators={"llm": {"base_url": f"http://127.0.0.1:{closed_port}/v1", "retries": 0,
                                                    "timeout": 5}})
    lines = []
    engine.log = lines.append
    reason = engine.run()
    assert "max_evaluations (8)" in reason  # the run did not end for want of the LLM
    individuals, state = RunStore(run_dir).load()
    assert len(individuals) == 8 and {i.operator for i in individuals} == {"seed", "perturb"}
    assert any("llm: LLM server unreachable" in line for line in lines), (lines, state["counters"]["refusals"])
    refusals = state["counters"]["refusals"]["llm"]
    assert 1 <= sum(refusals.values()) <= 3 and all("connection failed" in r for r in refusals)  # backed off


GUARD = {"enabled": True, "noise_runs": 2, "reruns": 2, "z": 0.0, "min_delta": 0.0}


def _slow_guard_runs(job) -> float:
    return 0.0 if job.kind == CHILD else 30.0


def _run_in_thread(engine) -> tuple[threading.Thread, dict]:
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("reason", engine.run()), daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("how", ["Engine.stop", "max_hours"])
def test_a_hard_stop_still_stops_a_run_draining_guard_re_runs_after_a_soft_stop(setup_run, how):
    # max_evaluations=1 is reached at once; the seed's anchor and noise runs (30 s each) are left to drain.
    executor = FakeExecutor(by_quality, seconds=_slow_guard_runs)
    engine, run_dir = engine_with(setup_run, executor, max_evaluations=1, guard=GUARD)
    if how == "max_hours":
        engine.config.stopping.max_hours = 2 / 3600
    thread, outcome = _run_in_thread(engine)
    time.sleep(1.0)
    if how == "Engine.stop":
        engine.stop("the output was closed")
    thread.join(timeout=20)
    alive = thread.is_alive()
    executor.close()
    assert not alive, f"{how} was ignored while guard re-runs drained"
    assert executor.cancelled  # the guard run in flight (the anchor) was killed, not waited for
    _, state = RunStore(run_dir).load()
    assert len(state["guard"]["queue"]) == 3  # the seed's anchor run and both noise runs stay queued for resume


def test_a_setup_failure_while_draining_guard_re_runs_stops_the_run_with_its_reason(setup_run):
    def evaluator_dies_on_guard_runs(job):
        if job.kind != CHILD:
            raise EvaluatorFailed("the evaluator could not start")
        return by_quality(job)

    executor = FakeExecutor(evaluator_dies_on_guard_runs, seconds=lambda job: 0.0 if job.kind == CHILD else 0.01)
    engine, run_dir = engine_with(setup_run, executor, max_evaluations=1, guard=GUARD)
    thread, outcome = _run_in_thread(engine)
    thread.join(timeout=20)
    assert not thread.is_alive() and len(executor.jobs) <= 3, f"resubmitted {len(executor.jobs)} times"
    assert outcome["reason"].startswith("stopped, nothing more can be evaluated") and "could not start" in outcome["reason"]
    _, state = RunStore(run_dir).load()
    assert len(state["guard"]["queue"]) == 3  # the anchor and the two noise runs


def test_a_setup_failure_arriving_with_another_result_stops_cleanly(setup_run):
    # Two slots whose results land in the same wait(): one of them says the evaluator died.
    class Together(FakeExecutor):
        def __init__(self, score):
            super().__init__(score, slots=2)
            self.held = []

        def submit(self, job):
            if job.individual == "v00001":
                return super().submit(job)
            future = Future()
            self.jobs.append(job)
            self.held.append((job, future))
            if len(self.held) == 2:
                for held_job, held_future in self.held:
                    self._finish(held_job, held_future, 0.0)
                self.held = []
            return future

    def score(job):
        if job.individual == "v00002":
            raise EvaluatorFailed("the evaluator could not start")
        return by_quality(job)

    engine, run_dir = engine_with(setup_run, Together(score), max_evaluations=10, workers=2)
    reason = engine.run()
    assert reason.startswith("stopped, nothing more can be evaluated")
    individuals, _ = RunStore(run_dir).load()
    assert {i.id: i.status for i in individuals}["v00002"] == "pending"  # queued for resume
