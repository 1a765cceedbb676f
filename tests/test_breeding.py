"""How parents and operators are chosen: crossover mates, selection by re-run means, operator
weights that follow each operator's yield. Whole runs on the fake executor, no process started."""

from __future__ import annotations

import random
import re
import threading

from evo.config import GuardSection
from evo.executors.fake import FakeExecutor
from evo.guard import Guard, GuardRun
from evo.population import Individual, Population
from evo.report import status_text
from mutators.base import Proposal
from evo.jobs import CHILD
from tests.fakes import by_quality, engine_with, quality, scored

GUARD = {"enabled": True, "noise_runs": 2, "reruns": 2, "z": 0.0, "min_delta": 0.0}


class Steps:
    """A one-parent operator that always works: each child moves QUALITY (and NOISE, so a
    crossover has two definitions to choose from) a step."""

    parents_needed = 1

    def __init__(self, name="perturb", lucky_at: int = 0):
        self.name, self.lucky_at = name, lucky_at
        self.calls = 0
        self.lock = threading.Lock()

    def propose(self, parents, rng):
        with self.lock:
            self.calls += 1
            n = self.calls
        value = 0.123 if n == self.lucky_at else 0.5 + n * 1e-3
        code = re.sub(r"^QUALITY = .*$", f"QUALITY = {value}", parents[0].code, flags=re.MULTILINE)
        code = re.sub(r"^NOISE = .*$", f"NOISE = {n * 1e-6}", code, flags=re.MULTILINE)
        return Proposal(code, self.name, {}, f"step {n}")


def individual(id_, island, val, code_hash=None, birth=0):
    return Individual(id=id_, birth=birth, island=island, code_hash=code_hash or id_, operator="perturb",
                      status="ok", val_bpb=val)


# ---- 2. selection by re-run means ----

def _rerun(guard, who, values):
    for value in values:
        run = GuardRun(who, guard.next_seed, "rerun")
        guard.next_seed += 1
        guard.running.append(run)
        guard.record(run, "ok", {"val_bpb": value, "heldout_bpb": value})


def test_the_selection_score_is_the_rerun_mean_and_a_refused_lucky_draw_stops_winning():
    guard = Guard(GuardSection(noise_runs=2, reruns=2, z=0.0, min_delta=0.0), log=lambda line: None)
    population = Population(islands=1, size=8)
    population.attach_guard(guard)
    seed, honest, lucky = individual("seed", 0, 2.50, birth=1), individual("honest", 0, 2.40, birth=2), \
        individual("lucky", 0, 1.50, birth=3)
    for i in (seed, honest, lucky):
        population.add(i)
    assert population.best() is lucky and population.score_label(lucky) == "first draw"
    guard.start("seed", 2.50)
    for run in list(guard.queue):  # the noise floor
        guard.take()
        guard.record(run, "ok", {"val_bpb": run.seed % 2 * 0.02 + 2.49, "heldout_bpb": 2.6})
    assert guard.consider("lucky", 1.50)
    guard.queue.clear()
    _rerun(guard, "lucky", [2.60, 2.64])
    assert guard.records["lucky"].verdict == "not significant"
    assert population.score(lucky) == 2.62 and population.score_label(lucky) == "re-run mean"
    assert population.score_label(seed) == "re-run mean"
    assert population.best() is honest
    for k in range(2, 4):  # a tournament that draws it never lets it win
        assert all(population.tournament(0, k, random.Random(s)) is not lucky for s in range(30))

    failed = individual("flaky", 0, 1.0, birth=4)
    population.add(failed)
    guard.consider("flaky", 1.0)
    guard.queue.clear()
    for status in ("crash", "ok"):
        run = GuardRun("flaky", guard.next_seed, "rerun")
        guard.next_seed += 1
        guard.record(run, status, {"val_bpb": 1.0, "heldout_bpb": 1.0})
    assert guard.records["flaky"].verdict.startswith("re-runs failed")
    assert population.ranked()[-1] is failed  # its lucky 1.0 ranks after every variant that held up


def test_a_run_with_the_guard_selects_and_reports_re_run_means_not_a_refused_lucky_draw(setup_run):
    # The 3rd child scores 1.5 on its first draw and 3.5 on every re-run: a lucky draw the guard refuses.
    lucky_code = 0.123

    def score(job):
        if quality(job.code) == lucky_code:
            return scored(job, 1.5 if job.kind == CHILD else 3.5)
        return by_quality(job, noise=0.01)

    lines, ticks, picks = [], [], []
    engine, run_dir = engine_with(setup_run, FakeExecutor(score), ops={"perturb": Steps(lucky_at=3)},
                                  max_evaluations=25, guard=GUARD, stopping={"target_val_bpb": 1.6})
    engine.log, engine.on_tick = lines.append, ticks.append
    population, tournament = engine.population, engine.population.tournament

    def watched(island, k, rng):
        chosen = tournament(island, k, rng)
        lucky = next((i for i in population.individuals.values() if i.hypothesis == "step 3"), None)
        verdict = engine.guard.records[lucky.id].verdict if lucky and lucky.id in engine.guard.records else ""
        picks.append((chosen.id, lucky.id if lucky else None, verdict))
        return chosen

    population.tournament = watched
    reason = engine.run()
    lucky = next(i for i in population.individuals.values() if i.hypothesis == "step 3")
    assert lucky.val_bpb == 1.5 and lucky.verdict == "not significant"
    assert "max_evaluations (25)" in reason  # the lucky draw under target_val_bpb 1.6 did not stop the run
    assert not [p for p in picks if p[2] and p[0] == p[1]], "a refused lucky draw kept winning tournaments"
    assert population.best() is not lucky and population.score(lucky) == 3.5
    # Every "best" number says which it is; once refused, the lucky draw is never the best shown.
    evaluation_lines = [line for line in lines if line.startswith("[")]
    verdict_at = next(n for n, line in enumerate(lines) if f"guard: {lucky.id} not significant" in line)
    assert all(re.search(r"best \((first draw|re-run mean)\) \d", line) for line in evaluation_lines)
    assert any(f"best (first draw) 1.5000 ({lucky.id})" in line for line in lines[:verdict_at])
    assert not any(f"({lucky.id})" in line for line in lines[verdict_at:] if line.startswith("["))
    assert ticks[-1].best_id != lucky.id and ticks[-1].best_label in ("first draw", "re-run mean")
    text = status_text(run_dir)
    assert "re-run mean" in text and f"{lucky.id}      3.5000 re-run mean" not in text.split("best by selection")[1][:400]
