"""How parents and operators are chosen: crossover mates, selection by paired estimates, operator
weights that follow each operator's yield. Whole runs on the fake executor, no process started."""

from __future__ import annotations

import json
import random
import re
import threading

import pytest

from evo.breeder import YIELD_FLOOR, effective_weights
from evo.config import GuardSection
from evo.executors.fake import FakeExecutor
from evo.guard import GUARD_SEEDS, Guard, GuardRun
from evo.population import Individual, Population
from evo.recorder import FAILED, IMPROVED, OK, RECENT_OUTCOMES
from evo.report import status_text
from evo.runs import resume_run
from evo.store import RunStore
from mutators.base import Proposal, Refusal
from mutators.crossover import Crossover
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


class Refuses:
    parents_needed = 1

    def __init__(self, name):
        self.name, self.calls = name, 0

    def propose(self, parents, rng):
        self.calls += 1
        return Refusal(self.name, "nothing useful to say")


class Watched(Crossover):
    """The real AST crossover, remembering the parents it was handed."""

    def __init__(self):
        super().__init__()
        self.pairs = []

    def propose(self, parents, rng):
        self.pairs.append((parents[0].code, parents[1].code))
        return super().propose(parents, rng)


def individual(id_, island, val, code_hash=None, birth=0):
    return Individual(id=id_, birth=birth, island=island, code_hash=code_hash or id_, operator="perturb",
                      status="ok", val_bpb=val)


# ---- 1. crossover: two different codes, from another island when one has members ----

def test_mate_has_different_code_and_comes_from_another_island_when_one_has_members():
    population = Population(islands=3, size=4)
    a = individual("a", 0, 2.0, birth=1)
    population.add(a)
    assert population.mate(a, 0, 2, random.Random(0)) is None  # no other code evaluated yet
    population.add(individual("a2", 0, 2.1, birth=2))
    assert population.mate(a, 0, 2, random.Random(0)).id == "a2"  # only its own island has one
    population.add(individual("b", 1, 2.5, birth=3))
    population.add(individual("c", 2, 2.6, birth=4))
    population.migrants[1].append("a")  # a migrant of `a` on island 1 is not a different code
    mates = {population.mate(a, 0, 2, random.Random(seed)).id for seed in range(40)}
    assert mates == {"b", "c"}  # never the same island, while another island has members


def test_in_a_run_crossovers_always_get_two_different_codes_from_another_island_when_one_has_members(setup_run):
    crossover = Watched()
    engine, run_dir = engine_with(setup_run, FakeExecutor(by_quality), ops={"perturb": Steps(), "crossover": crossover},
                                  max_evaluations=30, operators={"perturb": 1.0, "crossover": 1.0},
                                  population={"islands": 2, "size": 4, "migration_interval": 3})
    population, choices = engine.population, []
    mate = population.mate

    def watched_mate(first, island, k, rng):
        other_islands_have = any(m.code_hash != first.code_hash for j in range(population.n_islands) if j != island
                                 for m in population.members(j))
        another_code = any(i.code_hash != first.code_hash for i in population.ranked())
        second = mate(first, island, k, rng)
        from_other = second is not None and any(second in population.members(j)
                                                for j in range(population.n_islands) if j != island)
        choices.append((other_islands_have, from_other, second is not None or not another_code))
        return second

    population.mate = watched_mate
    engine.run()
    assert len(crossover.pairs) >= 5
    assert all(a != b for a, b in crossover.pairs), "a crossover got the same code twice"
    assert all(found for _, _, found in choices)  # a mate whenever another code had been evaluated
    assert all(from_other for other_have, from_other, _ in choices if other_have)
    _, state = RunStore(run_dir).load()
    refusals = state["counters"]["refusals"].get("crossover", {})
    assert not any("share every top-level definition" in reason for reason in refusals), refusals


# ---- 2. selection by paired estimates ----

def _rerun(guard, who, values):
    for i, value in enumerate(values):
        run = GuardRun(who, GUARD_SEEDS + i, "rerun")
        guard.running.append(run)
        guard.record(run, "ok", {"val_bpb": value, "heldout_bpb": value})


def test_the_selection_score_is_the_paired_estimate_and_a_refused_lucky_draw_stops_winning():
    guard = Guard(GuardSection(anchor=False, noise_runs=2, reruns=2, z=0.0, min_delta=0.0), log=lambda line: None)
    population = Population(islands=1, size=8)
    population.attach_guard(guard)
    seed, honest, lucky = individual("seed", 0, 2.47, birth=1), individual("honest", 0, 2.40, birth=2), \
        individual("lucky", 0, 1.50, birth=3)
    for i in (seed, honest, lucky):
        population.add(i)
    assert population.best() is lucky and population.score_label(lucky) == "first draw"
    guard.start("seed", 2.47)  # its first draw, on the evaluation seed: 0.03 below its noise runs' mean
    for run in list(guard.queue):  # the noise floor
        guard.take()
        guard.record(run, "ok", {"val_bpb": run.seed % 2 * 0.02 + 2.49, "heldout_bpb": 2.6})
    assert guard.consider("lucky", 1.50)
    guard.queue.clear()
    _rerun(guard, "lucky", [2.60, 2.64])  # against the seed's 2.49 and 2.51 on the same two seeds
    assert guard.records["lucky"].verdict == "not significant"
    # On the evaluation seed's scale: the seed's first draw 2.47 plus the mean paired difference 0.12
    # (its re-run mean, 2.62, is on the guard seeds' scale).
    assert population.score(lucky) == pytest.approx(2.59) and population.score_label(lucky) == "paired estimate"
    assert population.score(seed) == 2.47 and population.score_label(seed) == "first draw"
    assert population.best() is honest
    for k in range(2, 4):  # a tournament that draws it never lets it win
        assert all(population.tournament(0, k, random.Random(s)) is not lucky for s in range(30))

    failed = individual("flaky", 0, 1.0, birth=4)
    population.add(failed)
    guard.consider("flaky", 1.0)
    guard.queue.clear()
    for i, status in enumerate(("crash", "ok")):
        run = GuardRun("flaky", GUARD_SEEDS + i, "rerun")
        guard.record(run, status, {"val_bpb": 1.0, "heldout_bpb": 1.0})
    assert guard.records["flaky"].verdict.startswith("re-runs failed")
    assert population.ranked()[-1] is failed  # its lucky 1.0 ranks after every variant that held up


def test_a_run_with_the_guard_selects_by_paired_estimates_not_a_refused_lucky_draw(setup_run):
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
    # Where its re-runs put it: 3.5 on every guard seed, set against the seed variant seed by seed and
    # moved onto the first draws' scale by the seed variant's own first draw (the fake's seed noise is
    # 0.01, so this is not 3.5).
    base = engine.guard.records[engine.guard.champions[0]]
    expected = base.first_val + sum(3.5 - s.val_bpb for s in base.ok()) / len(base.ok())
    assert population.best() is not lucky and population.score(lucky) == pytest.approx(expected, abs=1e-9)
    assert abs(expected - 3.5) > 1e-4
    # One word per number: "champion" is the guard's (its re-run mean), "best first draw" the lowest
    # single evaluation. The lucky draw is the best first draw, shown as such, and never the champion.
    evaluation_lines = [line for line in lines if line.startswith("[")]
    assert all(re.search(r"champion \d\.\d{4} \(v\d+, (re-run mean; \d\.\d{4} on the first draws' seed|first draw, re-runs pending)\) \| "
                         r"best first draw \d\.\d{4} \(v\d+\)", line) for line in evaluation_lines)
    assert any(f"best first draw 1.5000 ({lucky.id})" in line for line in evaluation_lines)
    assert not any(f"champion 1.5000 ({lucky.id}" in line or f"({lucky.id}, re-run mean" in line for line in lines)
    assert ticks[-1].champion_id != lucky.id and f"best first draw 1.5000 ({lucky.id})" in ticks[-1].standing
    # Beside the re-run mean, the champion's standing on the seed every first draw shares.
    champion = engine.guard.champion.id
    on_seed = engine.guard.on_evaluation_seed(champion)
    assert f"({champion}, re-run mean; {on_seed:.4f} on the first draws' seed)" in ticks[-1].standing
    table = status_text(run_dir).split("best by selection")[1]
    assert "the paired estimate where the guard re-ran it, the mean of 2 draws for the seed variant, else the first draw" \
        in table  # says which number
    assert f"{lucky.id}      1.5000" not in table  # never listed at its lucky draw


# ---- 3. operator weights follow their yield ----

def test_effective_weights_follow_the_recent_yield_but_never_drop_below_the_floor():
    configured = {"perturb": 1.0, "llm": 2.0, "fresh": 1.0}
    recent = {"perturb": [OK, IMPROVED] * 10, "llm": [FAILED] * 50}
    weights = effective_weights(configured, recent)
    assert weights["llm"] >= YIELD_FLOOR * 2.0 and weights["llm"] / 2.0 < 0.2 * weights["perturb"]
    assert weights["llm"] == effective_weights(configured, {"llm": [FAILED] * RECENT_OUTCOMES})["llm"]  # a window
    assert weights["fresh"] == 1.0 * (YIELD_FLOOR + 1.0)  # untried: the prior, as if evaluated ok
    assert weights["perturb"] > weights["fresh"]  # improvements earn a bonus


def test_an_operator_that_always_refuses_is_drawn_far_less_but_never_starved_and_resume_keeps_it(setup_run):
    works, refuses = Steps(), Refuses("crossover")
    calls = []
    for op in (works, refuses):
        propose = op.propose
        op.propose = lambda parents, rng, propose=propose, name=op.name: calls.append(name) or propose(parents, rng)
    engine, run_dir = engine_with(setup_run, FakeExecutor(by_quality), ops={"perturb": works, "crossover": refuses},
                                  max_evaluations=80, operators={"perturb": 1.0, "crossover": 1.0})
    engine.run()
    later = calls[len(calls) // 2:]  # equal configured weights; the first half is where it learns
    assert later.count("crossover") < 0.25 * len(later), (later.count("crossover"), len(later))
    assert later.count("crossover") >= 1 and refuses.calls >= 5  # the floor keeps it being tried
    _, state = RunStore(run_dir).load()
    recent = state["counters"]["recent"]
    assert recent["crossover"] == [FAILED] * min(RECENT_OUTCOMES, refuses.calls)
    weights = effective_weights({"perturb": 1.0, "crossover": 1.0}, recent)
    assert YIELD_FLOOR <= weights["crossover"] < 0.25 * weights["perturb"]
    text = status_text(run_dir)
    assert re.search(r"crossover .* 1 -> 0\.\d\d \(\d+% of draws\)", text), text
    resumed = resume_run(run_dir, ["stopping.max_evaluations=61"], log=lambda line: None)
    assert resumed.counters.recent == recent  # the weights go on where they were


def test_perturb_repeats_a_step_once_exactly_when_it_made_its_parent_better(setup_run):
    """The breeder tells perturb which step made a parent better than its own parent (the
    pattern move), until one child has repeated it (a second would be the same code); a parent
    that did not beat its parent gets no step to repeat."""
    from mutators.constants import PerturbConstants

    engine, run_dir = engine_with(setup_run, FakeExecutor(by_quality), max_evaluations=20,
                                  ops={"perturb": PerturbConstants(max_changes=1)}, population={"islands": 1})
    engine.run()
    individuals, _ = RunStore(run_dir).load()
    by_id = {i.id: i for i in individuals}
    followed = set()
    for child in individuals[1:]:
        parent = by_id[child.parents[0]]
        grandparent = by_id.get(parent.parents[0]) if parent.parents else None
        won = grandparent is not None and parent.val_bpb < grandparent.val_bpb
        details = json.loads(child.details)
        # QUALITY (the only constant that changes the score) always has room to step again: a
        # winner's first child repeats its step, any other child draws a fresh one.
        assert ("follows" in details) == (won and parent.id not in followed), (child.id, parent.id, details)
        if "follows" in details:
            followed.add(parent.id)
            step = json.loads(parent.details)["changes"]
            assert set(details["changes"]) == set(step)
            for name, (old, new) in step.items():
                assert details["changes"][name][0] == new  # from where the parent's step ended
    assert followed  # QUALITY moves toward 1.0 win, so winners occur

    # Each step is handed out once, even when its child never gets recorded (a duplicate, a
    # refusal, two breeder threads at once); a new process (resume) reads the used ones back.
    breeder, winner = engine.breeder, engine.population.individuals[sorted(followed)[0]]
    with engine.recorder.lock:
        assert breeder._winning_move(winner) == {}
        breeder._used_steps = {}  # as after a resume: rebuilt from the children's details
        assert breeder._winning_move(winner) == {}
        breeder._used_steps["follows"].discard(winner.id)  # as if not handed out yet
        parent = engine.population.individuals[winner.parents[0]]
        gain = parent.val_bpb - winner.val_bpb
        engine.recorder.guard.sigma = lambda: gain  # a gain no larger than the seed's own spread: no direction
        assert breeder._winning_move(winner) == {}
        engine.recorder.guard.sigma = lambda: gain / 2
        assert breeder._winning_move(winner) == json.loads(winner.details)["changes"]
        assert breeder._winning_move(winner) == {}


def test_perturb_takes_the_opposite_of_a_step_that_made_a_child_worse_once(setup_run):
    """A child that its step made worse than its parent (QUALITY moved away from 1.0) is reflected:
    a later perturb child of a parent holding the step's starting value takes the opposite step
    from it, once per loser; a child that gained, or one that itself repeated or reflected a step,
    is never reflected."""
    from evo.breeder import LOSS_NOISE
    from mutators.constants import PerturbConstants

    engine, run_dir = engine_with(setup_run, FakeExecutor(by_quality), max_evaluations=30,
                                  ops={"perturb": PerturbConstants(max_changes=1)}, population={"islands": 1})
    engine.run()
    individuals, _ = RunStore(run_dir).load()
    by_id = {i.id: i for i in individuals}
    details = {i.id: json.loads(i.details or "{}") for i in individuals}
    reflected = [i for i in individuals if "reflects" in details[i.id]]
    assert reflected, "QUALITY moves away from 1.0 lose, so losers occur and get reflected"
    losers = [details[r.id]["reflects"] for r in reflected]
    assert len(losers) == len(set(losers)), "a losing step was reflected twice"
    for child in reflected:
        loser = by_id[details[child.id]["reflects"]]
        assert loser.birth < child.birth
        assert loser.val_bpb > by_id[loser.parents[0]].val_bpb  # it lost (no guard: no noise floor)
        assert "follows" not in details[loser.id] and "reflects" not in details[loser.id]
        (name, (old, new)), = details[loser.id]["changes"].items()
        assert details[child.id]["changes"][name][0] == old  # from where the losing step began
        old, new, reflection = float(old), float(new), float(details[child.id]["changes"][name][1])
        assert reflection == pytest.approx(old * old / new, rel=1e-3)  # the same factor, the other way
        assert (reflection - old) * (new - old) < 0
    assert engine.population.best().val_bpb == pytest.approx(2.0, abs=0.05)  # QUALITY found its way to ~1.0

    # Each loser is offered once, and a new process (resume) reads the used ones back from the
    # details; the worst loss that applies comes first, and a loss inside the noise is no direction.
    breeder = engine.breeder
    loser = by_id[losers[0]]
    parent = by_id[loser.parents[0]]
    code = engine.recorder.code_of(parent.id)
    with engine.recorder.lock:
        breeder._used_steps = {}
        assert breeder._losing_move(code)[0] not in losers
        breeder._used_steps["reflects"].discard(loser.id)  # as if not handed out yet
        loss = loser.val_bpb - parent.val_bpb
        engine.recorder.guard.sigma = lambda: loss / LOSS_NOISE  # a loss no larger than LOSS_NOISE sigma
        assert breeder._losing_move(code)[0] != loser.id
        breeder._used_steps["reflects"] = set(losers) - {loser.id}  # whatever that handed out is back
        engine.recorder.guard.sigma = lambda: 0.0
        unused = [i for i in individuals if i.id not in breeder._used_steps["reflects"] and i.parents and i.status == "ok"
                  and not {"follows", "reflects"} & set(details[i.id])]
        start = float(details[loser.id]["changes"]["QUALITY"][0])
        applicable = [i for i in unused if i.val_bpb > by_id[i.parents[0]].val_bpb
                      and float(details[i.id]["changes"].get("QUALITY", ["nan"])[0]) == start]
        expected = max(applicable, key=lambda i: i.val_bpb - by_id[i.parents[0]].val_bpb)
        # Another parent holding the same starting value (NOISE differs) is offered the worst one.
        elsewhere = re.sub(r"^NOISE = .*$", "NOISE = 0.0123", code, flags=re.MULTILINE)
        assert breeder._losing_move(elsewhere) == (expected.id, details[expected.id]["changes"])
        assert breeder._losing_move(elsewhere)[0] != expected.id  # offered once
        assert breeder._losing_move("QUALITY = 0.123456\n")[0] == ""  # holds no loser's starting value


def test_losers_that_moved_one_constant_are_reflected_before_those_that_moved_two(setup_run):
    """A two-constant loss does not say which constant hurt (SLEEP and NOISE move nothing in the
    score here), so the breeder offers every one-constant loser first, each group worst first, and
    every applicable loser exactly once."""
    from mutators.constants import PerturbConstants, find_constants, opposite_steps

    engine, run_dir = engine_with(setup_run, FakeExecutor(by_quality), max_evaluations=30,
                                  ops={"perturb": PerturbConstants(max_changes=2, reflect=0)}, population={"islands": 1})
    engine.run()
    individuals, _ = RunStore(run_dir).load()
    by_id = {i.id: i for i in individuals}
    details = {i.id: json.loads(i.details or "{}") for i in individuals}
    losers = [i for i in individuals[1:] if i.status == "ok" and "follows" not in details[i.id]
              and i.val_bpb > by_id[i.parents[0]].val_bpb]

    def applicable(code):
        constants = find_constants(code)
        return [i for i in losers if opposite_steps(constants, details[i.id]["changes"])]

    # The parent code that can reflect the most losers, of both kinds.
    codes = [engine.recorder.code_of(i.id) for i in individuals if i.status == "ok"]
    code = max(codes, key=lambda c: (len({len(details[i.id]["changes"]) for i in applicable(c)}), len(applicable(c))))
    mine = applicable(code)
    assert {len(details[i.id]["changes"]) for i in mine} == {1, 2}, "the run should hold losers of both kinds"
    expected = sorted(mine, key=lambda i: (len(details[i.id]["changes"]) != 1, by_id[i.parents[0]].val_bpb - i.val_bpb))
    worst_first = sorted(mine, key=lambda i: by_id[i.parents[0]].val_bpb - i.val_bpb)
    assert expected != worst_first, "some two-constant loser should lose more than a one-constant one, or order is untested"
    breeder = engine.breeder
    with engine.recorder.lock:
        engine.recorder.guard.sigma = lambda: 0.0
        offered = [breeder._losing_move(code)[0] for _ in range(len(mine) + 1)]
    assert offered == [i.id for i in expected] + [""]


def test_perturb_is_handed_how_often_the_run_has_moved_each_constant(setup_run):
    """The breeder counts every recorded constant step of the run (any parent, any operator) and
    hands the counts to perturb, so its fresh steps go to the constants moved least."""
    from mutators.constants import PerturbConstants

    class Watched(PerturbConstants):
        """Perturb, noting at each call the counts it is handed and those of the children born so
        far (one breeder thread: nobody is born between the breeder's count and this call)."""

        def __init__(self):
            super().__init__(max_changes=1)
            self.seen, self.population = [], None

        def propose(self, parents, rng):
            born = {}
            for i in list(self.population.individuals.values()):
                for name in json.loads(i.details or "{}").get("changes", {}):
                    born[name] = born.get(name, 0) + 1
            self.seen.append((dict(parents[0].moved), born))  # asserted after the run: the breeder turns a raise into a refusal
            return super().propose(parents, rng)

    perturb = Watched()
    engine, run_dir = engine_with(setup_run, FakeExecutor(by_quality), max_evaluations=16, ops={"perturb": perturb},
                                  population={"islands": 1},
                                  extra_code="\nBIG = 4  # evo: lever\nBIGGER = 8  # evo: lever\nBIGGEST = 16  # evo: lever\n")
    perturb.population = engine.population
    engine.run()
    individuals, _ = RunStore(run_dir).load()
    # The run's first fresh steps (neither a winner's step again nor a loser's reflected) screen the
    # levers, one each: QUALITY, NOISE and SLEEP wait until all three have moved.
    fresh = [json.loads(i.details) for i in sorted(individuals, key=lambda i: i.birth) if i.parents]
    fresh = [d["changes"] for d in fresh if "follows" not in d and "reflects" not in d]
    assert sorted(name for changes in fresh[:3] for name in changes) == ["BIG", "BIGGER", "BIGGEST"], fresh
    counts = {}
    for i in individuals:
        for name in json.loads(i.details or "{}").get("changes", {}):
            counts[name] = counts.get(name, 0) + 1
    with engine.recorder.lock:
        assert engine.breeder._moved() == counts
    assert perturb.seen and all(handed == born for handed, born in perturb.seen)
    totals = [sum(handed.values()) for handed, _ in perturb.seen]
    assert totals[0] == 0 and totals == sorted(totals) and totals[-1] >= len(individuals) - 2


def test_every_first_draw_uses_the_evaluation_seed_and_guard_runs_pair_by_seed(setup_run):
    """Common random numbers: two variants on the same seed share their initial weights' stream and
    batch order, so their difference is mostly the code's. Every first draw uses the run's seed,
    recorded per variant; the seed's noise runs and every candidate's re-runs use the same guard
    seeds, so the guard compares a candidate with the champion seed by seed."""
    seen = {}

    def score(job):
        seen.setdefault(job.individual, []).append((job.kind, job.settings.seed))
        # The same code on the same seed scores a little differently between draws (steps that fit the budget).
        return by_quality(job, noise=0.01) if job.kind != "anchor" else scored(job, by_quality(job, noise=0.01).val_bpb + 0.004)

    engine, run_dir = engine_with(setup_run, FakeExecutor(score), max_evaluations=8, guard=GUARD)
    engine.run()
    individuals, _ = RunStore(run_dir).load()
    assert len(individuals) == 8
    for i in individuals:
        assert [s for kind, s in seen[i.id] if kind == CHILD] == [engine.config.seed] == [i.eval_seed]
    guard_seeds = {i: sorted(s for kind, s in runs if kind in ("noise", "rerun")) for i, runs in seen.items()}
    candidates = [i for i, seeds in guard_seeds.items() if seeds and i != individuals[0].id]
    assert guard_seeds[individuals[0].id] == [GUARD_SEEDS, GUARD_SEEDS + 1] and candidates
    # The seed variant's anchor: once more on the evaluation seed, and the scale is the mean of its two draws.
    seed = individuals[0]
    assert [s for kind, s in seen[seed.id] if kind == "anchor"] == [engine.config.seed]
    assert engine.population.score(seed) == pytest.approx(seed.val_bpb + 0.002)
    assert engine.population.score_label(seed) == "mean of 2 draws"
    assert all(guard_seeds[c] == guard_seeds[individuals[0].id] for c in candidates)
    assert engine.config.seed not in guard_seeds[individuals[0].id]
    decided = [c for c in candidates if engine.guard.records[c].verdict]
    assert decided and all(engine.guard.records[c].against for c in decided)
