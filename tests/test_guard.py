"""The guard: noise floor, champion gate, honest numbers, held-out isolation, tamper resistance."""

from __future__ import annotations

import json
import math

import pytest

from evo.config import GuardSection
from evo.guard import GUARD_SEEDS, Guard, GuardRun
from evo.report import export, status_text
from evo.stats import paired_less, t_cdf, welch_less
from evo.store import RunStore
from evo.executors.fake import FakeExecutor
from tests.fakes import by_quality, engine_with, feed
from tests.llm_server import ScriptedServer


def test_welch_matches_reference_values():
    # References computed with scipy.stats.ttest_ind(a, b, equal_var=False, alternative="less").
    assert welch_less([1.0, 2.0, 3.0], [2.0, 3.0, 5.0, 6.0]) == pytest.approx(0.063227, abs=1e-6)
    assert welch_less([2.9, 3.1, 3.0], [3.05, 3.2, 3.1, 3.15]) == pytest.approx(0.074236, abs=1e-6)
    assert welch_less([5.0, 6.0], [1.0, 2.0]) == pytest.approx(0.985071, abs=1e-6)
    assert t_cdf(1.5, 3) == pytest.approx(0.884708, abs=1e-6)
    assert t_cdf(-2.2, 7.3) == pytest.approx(0.0310846, abs=1e-6)
    # Paired, df 2, where the t distribution has a closed form: P(T <= t) = (1 + t / sqrt(t^2 + 2)) / 2.
    t = -0.15 / (0.05 / 3**0.5)
    assert paired_less([-0.1, -0.2, -0.15]) == pytest.approx((1 + t / (t * t + 2) ** 0.5) / 2, abs=1e-9)
    assert paired_less([-0.1, -0.1], min_std=0.0) == 0.0 and paired_less([0.1, 0.1], min_std=0.0) == 1.0
    assert paired_less([-0.01, -0.01], min_std=0.01) > 0.1  # identical differences prove little


def test_pairing_by_seed_finds_a_gain_smaller_than_the_seed_to_seed_spread():
    # Each guard seed moves every variant alike (+0.03, -0.02, 0.0), as a seed's initial weights and
    # batch order do; the evaluation seed (every first draw) happens to sit low. A real gain of
    # 0.015 is hidden in that spread for an unpaired test, and plain seed by seed.
    effect = [0.03, -0.02, 0.0]
    guard = Guard(GuardSection(anchor=False, noise_runs=3, reruns=3, z=1.0, min_delta=0.002, audit_runs=0), log=lambda line: None)
    guard.start("seed", 2.47)
    seed_runs = [(2.50 + e, 2.10 + e) for e in effect]
    feed(guard, {"seed": list(seed_runs)})
    assert guard.sigma() == pytest.approx(0.02517, abs=1e-4)
    # 1.1 sigma below the mean of the guard's seeds, but no better than the champion on its own seed.
    assert guard.consider("neutral", 2.475) is False
    assert guard.consider("better", 2.44) is True
    better_runs = [(2.485 + e + t, 2.09 + e) for e, t in zip(effect, (0.001, -0.001, 0.0))]
    feed(guard, {"better": list(better_runs)})
    assert guard.records["better"].verdict == "promoted" and guard.records["better"].against == "seed"
    assert welch_less([v for v, _ in better_runs], [v for v, _ in seed_runs]) > 0.2  # unpaired: nothing to see
    # Placed on the evaluation seed's scale by its re-runs, not by its selected first draw.
    assert guard.on_evaluation_seed("better") == pytest.approx(2.455)

    # A lucky first draw of a neutral variant: a candidate, refused, and placed where its re-runs say.
    assert guard.consider("lucky", 2.40) is True
    feed(guard, {"lucky": [(v + t, h) for (v, h), t in zip(better_runs, (0.002, -0.003, 0.001))]})
    assert guard.records["lucky"].verdict == "not significant" and guard.records["lucky"].against == "better"
    assert guard.paired_estimate("lucky") == pytest.approx(2.455) and guard.paired_estimate("seed") is None


def test_the_noise_floor_pools_the_seed_runs_with_every_candidates_re_runs():
    guard = Guard(GuardSection(anchor=False, noise_runs=3, reruns=3, z=1.0, min_delta=0.0, audit_runs=0), log=lambda line: None)
    guard.start("seed", 2.50)
    feed(guard, {"seed": [(2.500, 2.1), (2.501, 2.1), (2.502, 2.1)]})  # three seeds that agree by luck
    assert guard.measured_sigma() == pytest.approx(0.001) and guard.sigma_sources() == 1
    assert guard.consider("lucky", 2.497)  # past a bar that low
    feed(guard, {"lucky": [(2.47, 2.1), (2.53, 2.1), (2.50, 2.1)]})  # its re-runs spread 0.03 over the same seeds
    assert guard.records["lucky"].verdict == "not significant"
    # Pooled by degrees of freedom (2 each): the candidate's runs measure the same spread.
    assert guard.measured_sigma() == pytest.approx(math.sqrt((0.001**2 + 0.03**2) / 2)) and guard.sigma_sources() == 2
    assert guard.consider("next", 2.497) is False  # the same first draw is no candidate any more


def _transfer_guard() -> Guard:
    """A guard whose every promotion re-runs both champions twice at 2x budget; seed c0 measured."""
    guard = Guard(GuardSection(anchor=False, noise_runs=2, reruns=2, z=0.0, min_delta=0.0, transfer_multiplier=2, transfer_runs=2,
                               audit_runs=0),
                  log=lambda line: None)
    guard.start("c0", 3.0)
    feed(guard, {"c0": [(3.0, 3.0), (3.01, 3.01)]})
    return guard


def test_scale_transfer_runs_each_champion_once_on_the_same_seeds():
    guard = _transfer_guard()
    transfer = {}
    for name, val in (("c1", 2.9), ("c2", 2.8)):
        assert guard.consider(name, val - 0.01)
        while guard.queue:
            job = guard.take()
            if job.kind == "transfer":
                transfer.setdefault(job.individual, []).append(job.seed)
            guard.record(job, "ok", {"val_bpb": val if job.individual == name else 3.0, "heldout_bpb": val})
    assert guard.champions == ["c0", "c1", "c2"]
    # c1 was the new champion, then the previous one: one set of runs at 2x, not two on the same seeds.
    assert transfer == {who: [GUARD_SEEDS, GUARD_SEEDS + 1] for who in ("c0", "c1", "c2")}
    assert guard.transfer_summary() == [
        f"scale transfer x2: {new} vs {old}: -0.1000 val_bpb on 2 shared seed(s): the gain held"
        for new, old in (("c1", "c0"), ("c2", "c1"))]


def test_scale_transfer_pairs_the_champions_runs_by_seed():
    guard = _transfer_guard()
    quality = {"c0": 3.0, "c1": 2.95, "c2": 2.9}
    hard_seed = GUARD_SEEDS + 1  # 0.3 worse for everyone at the larger budget
    for name in ("c1", "c2"):
        assert guard.consider(name, quality[name] - 0.01)
        while guard.queue:
            job = guard.take()
            transfer = job.kind == "transfer"
            failed = transfer and (job.individual == "c2" or (job.individual, job.seed) == ("c0", hard_seed))
            val = quality[job.individual] + (0.3 if transfer and job.seed == hard_seed else 0.0)
            guard.record(job, "crash" if failed else "ok", {} if failed else {"val_bpb": val, "heldout_bpb": val})
    assert guard.champions == ["c0", "c1", "c2"]
    # c0 ran ok only on the easy seed: c1 is set against it there (by the means, c1's hard-seed run
    # would have made the gain look lost), and c2, whose runs all failed, shares no seed with c1.
    assert guard.transfer_summary() == [
        "scale transfer x2: c1 vs c0: -0.0500 val_bpb on 1 shared seed(s): the gain held",
        "scale transfer x2: c2 vs c1: no seed where both ran ok"]


def test_the_guard_power_benchmark_drives_the_real_guard():
    from benchmarks.guard_power import NoiseModel, one_child

    settings = GuardSection(anchor=False, noise_runs=4, reruns=4, z=1.0, audit_runs=0)
    assert one_child(settings, 0.5, NoiseModel(0, 0.031, 0.020)) == (True, 4)  # far above the noise: 4 re-runs, promoted
    assert one_child(settings, -0.5, NoiseModel(0, 0.031, 0.020)) == (False, 0)  # worse: never a candidate, no runs
    asked_before, fresh = NoiseModel(7, 0.031, 0.020), NoiseModel(7, 0.031, 0.020)
    asked_before.champion(1000)  # a trial's numbers do not depend on what was asked before
    assert asked_before.child(1001, 0.0) == fresh.child(1001, 0.0)


def test_re_runs_on_other_seeds_than_the_champion_fall_back_to_welch_and_to_the_means():
    # A run resumed from before pairing queued its re-runs on seeds counted upward from 1003.
    guard = Guard(GuardSection(anchor=False, noise_runs=3, reruns=3, z=1.0, min_delta=0.001, audit_runs=0), log=lambda line: None)
    guard.start("seed", 2.95)
    feed(guard, {"seed": [(3.0, 3.1), (3.02, 3.12), (2.98, 3.08)]})
    assert guard.consider("old", 2.5) is True
    guard.queue = [GuardRun("old", GUARD_SEEDS + 3 + i, "rerun") for i in range(3)]
    feed(guard, {"old": [(2.80, 2.90)] * 3})
    record = guard.records["old"]
    assert record.verdict == "promoted" and record.against == ""
    assert record.p_value == pytest.approx(welch_less([2.80] * 3, [3.0, 3.02, 2.98], 0.001))
    # Not its lucky first draw (2.5): the seed's first draw plus the difference of the two re-run means.
    assert guard.paired_estimate("old") == pytest.approx(2.95 + 2.80 - 3.0)


def test_guard_seeds_skip_the_evaluation_seed_and_follow_the_champions_ok_runs():
    # A run whose evaluation seed is 1001: no guard run may repeat a first draw's seed.
    guard = Guard(GuardSection(anchor=False, noise_runs=3, reruns=3, z=1.0, audit_runs=0), log=lambda line: None, evaluation_seed=1001)
    guard.start("seed", 3.0)
    assert [run.seed for run in guard.queue] == [1000, 1002, 1003]
    noise = [guard.take() for _ in range(3)]
    for run, status in zip(noise, ("ok", "crash", "ok")):  # the champion's run on 1002 failed
        guard.record(run, status, {"val_bpb": 3.0 + run.seed % 2 * 0.02, "heldout_bpb": 3.1})
    assert guard.consider("child", 2.9) is True
    # Its re-runs go first on the seeds the champion ran ok, so none is wasted unpaired.
    assert [run.seed for run in guard.queue] == [1000, 1003, 1002]


def test_each_promotion_is_checked_on_fresh_seeds_no_decision_used():
    guard = Guard(GuardSection(anchor=False, noise_runs=2, reruns=2, z=0.0, min_delta=0.0, audit_runs=2), log=lambda line: None)
    guard.start("c0", 3.0)
    feed(guard, {"c0": [(3.0, 3.0), (3.01, 3.01)]})
    assert guard.consider("c1", 2.9)
    # Its two re-runs, then (once promoted) its and c0's runs on the fresh seeds: on those c1 gains
    # 0.05 where its re-runs claimed 0.10. Reported; it decides nothing.
    feed(guard, {"c1": [(2.9, 2.9), (2.91, 2.91), (2.95, 2.95), (2.95, 2.95)], "c0": [(3.0, 3.0), (3.0, 3.0)]})
    assert guard.champions == ["c0", "c1"] and guard.records["c1"].verdict == "promoted"
    assert [(s.seed, s.kind) for s in guard.records["c0"].audit] == [(2000, "audit"), (2001, "audit")]
    assert [s.seed for s in guard.records["c1"].audit] == [2000, 2001]
    assert guard.audit_summary() == [("fresh-seed check: c1 vs c0: -0.0500 val_bpb on 2 seed(s) no decision used; "
                                      "the re-runs claimed -0.1000: the gain held")]
    assert guard.consider("c2", 2.8)
    feed(guard, {"c2": [(2.85, 2.85), (2.86, 2.86), (2.96, 2.96), (2.96, 2.96)], "c1": [(2.95, 2.95)] * 2})
    assert [s.seed for s in guard.records["c2"].audit] == [2002, 2003]  # the next promotion's own seeds
    lines = guard.audit_summary()
    assert "c2 vs c1: +0.0100" in lines[1] and "did NOT hold" in lines[1]
    assert lines[2] == "fresh-seed check, all 2 checked promotions together: -0.0400 val_bpb (the re-runs claimed -0.1500)"


def test_the_seed_runs_once_more_on_the_evaluation_seed_and_children_meet_the_mean():
    # The seed variant's first draw on evaluation seed 7 was lucky (2.44); its second draw there
    # is 2.48. Children are set against 2.46, and sigma still comes from the guard's seeds alone.
    guard = Guard(GuardSection(noise_runs=3, reruns=3, z=1.0, min_delta=0.002, audit_runs=0), log=lambda line: None,
                  evaluation_seed=7)
    guard.start("seed", 2.44)
    assert [(run.kind, run.seed) for run in guard.queue] == [("anchor", 7), ("noise", 1000), ("noise", 1001), ("noise", 1002)]
    assert guard.on_evaluation_seed("seed") == 2.44 and guard.paired_estimate("seed") is None  # one draw so far
    anchor = guard.take()
    assert guard.record(anchor, "ok", {"val_bpb": 2.48, "heldout_bpb": 2.1}) == []
    assert guard.on_evaluation_seed("seed") == pytest.approx(2.46) == guard.paired_estimate("seed")
    assert guard.estimate_label("seed") == "mean of 2 draws"
    feed(guard, {"seed": [(2.50, 2.10), (2.52, 2.12), (2.48, 2.08)]})
    assert guard.sigma() == pytest.approx(0.02) and guard.records["seed"].samples[0].seed == 1000
    # 2.43 is no candidate against the lucky draw alone (bar 2.44 - 0.02), but is against the mean.
    assert guard.consider("fair", 2.43) is True
    feed(guard, {"fair": [(2.47, 2.07), (2.49, 2.09), (2.45, 2.05)]})  # 0.03 better on every guard seed
    assert guard.records["fair"].verdict == "promoted"
    assert guard.on_evaluation_seed("fair") == pytest.approx(2.46 - 0.03) == guard.paired_estimate("fair")
    assert guard.estimate_label("fair") == "paired estimate"


def test_candidates_wait_for_the_anchor_and_a_failed_anchor_leaves_the_first_draw():
    guard = Guard(GuardSection(noise_runs=2, reruns=2, z=1.0, min_delta=0.002, audit_runs=0), log=lambda line: None)
    guard.start("seed", 3.0)
    anchor = guard.take()
    feed(guard, {"seed": [(3.0, 3.1), (3.02, 3.12)]})  # the floor is measured, the anchor still runs
    assert guard.consider("early", 2.9) is False and guard.deferred == [("early", 2.9)]
    state = json.loads(json.dumps(guard.to_state()))  # in flight: back in the queue after a resume
    restored = Guard(guard.s, log=lambda line: None)
    restored.restore(state)
    assert [(run.kind, run.seed) for run in restored.queue] == [("anchor", 0)]
    assert restored.record(restored.take(), "crash", {}) == [("early", 2.9)]  # released, decided on the first draw
    assert restored.on_evaluation_seed("seed") == 3.0 and restored.paired_estimate("seed") is None
    assert [s.status for s in restored.records["seed"].anchor] == ["crash"]
    assert guard.consider("late", 2.9) is False  # the original still waits on its anchor in flight
    assert anchor in guard.running


def test_a_checkpoint_from_before_the_anchor_does_not_wait_for_one():
    guard = Guard(GuardSection(noise_runs=2, reruns=2, z=1.0, audit_runs=0), log=lambda line: None)
    guard.start("seed", 3.0)
    state = json.loads(json.dumps(guard.to_state()))
    state["queue"] = [job for job in state["queue"] if job["kind"] != "anchor"]
    for record in state["records"].values():
        del record["anchor"]
    restored = Guard(guard.s, log=lambda line: None)
    restored.restore(state)
    assert restored.records["seed"].anchor == []
    feed(restored, {"seed": [(3.0, 3.1), (3.02, 3.12)]})
    assert restored.consider("child", 2.9) is True


def test_a_checkpoint_from_before_pairing_restores():
    guard = Guard(GuardSection(anchor=False), log=lambda line: None)
    guard.start("seed", 3.0)
    state = json.loads(json.dumps(guard.to_state()))
    state["next_seed"] = 1003  # what the guard used to save
    for record in state["records"].values():
        del record["against"], record["audit"]
    restored = Guard(GuardSection(anchor=False), log=lambda line: None)
    restored.restore(state)
    assert restored.records["seed"].against == "" and restored.records["seed"].audit == []
    assert [run.seed for run in restored.queue] == [1000, 1001, 1002]


def test_a_real_gain_is_promoted_and_reported_as_the_rerun_mean():
    guard = Guard(GuardSection(anchor=False, noise_runs=3, reruns=3, z=2.0, min_delta=0.001, audit_runs=0), log=lambda line: None)
    guard.start("seed", 3.00)
    assert guard.consider("early", 2.5) is False  # the floor is not measured yet: deferred
    feed(guard, {"seed": [(3.00, 3.10), (3.02, 3.12), (2.98, 3.08)], "early": [(2.80, 2.90)] * 3})
    assert guard.records["early"].verdict == "promoted" and guard.champions == ["seed", "early"]
    stats = guard.champion.stats()
    assert stats["val_mean"] == pytest.approx(2.80) and stats["first_val"] == 2.5
    assert stats["first_draw_gap"] == pytest.approx(-0.30)  # the first draw was the lucky one
    assert stats["p_value"] < 0.05


def test_noise_sized_gains_are_not_even_candidates_and_held_out_can_veto():
    guard = Guard(GuardSection(anchor=False, noise_runs=3, reruns=3, z=2.0, audit_runs=0), log=lambda line: None)
    guard.start("seed", 3.0)
    feed(guard, {"seed": [(3.0, 3.1), (3.1, 3.2), (2.9, 3.0)]})  # sigma = 0.1
    assert guard.consider("tiny", 2.85) is False  # within 2 sigma of the champion's mean
    assert guard.consider("noisy", 2.7) is True
    feed(guard, {"noisy": [(2.7, 3.3), (2.8, 3.4), (2.75, 3.35)]})  # better val, worse held-out
    assert guard.records["noisy"].verdict == "held-out disagrees"
    assert guard.consider("lucky", 2.7) is True
    feed(guard, {"lucky": [(3.1, 3.0), (2.9, 2.9), (3.05, 3.0)]})
    assert guard.records["lucky"].verdict == "not significant"
    assert guard.champions == ["seed"]


def test_overfitting_alarm_when_val_improves_but_held_out_does_not():
    guard = Guard(GuardSection(anchor=False, noise_runs=2, reruns=2, z=0.0, min_delta=0.0, alarm_window=3, audit_runs=0), log=lambda line: None)
    guard.start("c0", 3.0)
    feed(guard, {"c0": [(3.00, 3.00), (3.01, 3.01)]})
    for name, val, held in (("c1", 2.90, 2.995), ("c2", 2.80, 2.990)):
        guard.consider(name, val - 0.01)
        feed(guard, {name: [(val, held), (val + 0.001, held + 0.001)]})
    assert guard.champions == ["c0", "c1", "c2"]
    alarm = guard.overfitting_alarm()
    assert alarm and "val_bpb improved by 0.2" in alarm and "held-out only by 0.01" in alarm


def test_guard_state_roundtrip_puts_running_jobs_back_in_the_queue():
    guard = Guard(GuardSection(anchor=False), log=lambda line: None)
    guard.start("seed", 3.0)
    running = guard.take()
    assert guard.running == [running] and [j.seed for j in guard.queue] == [1001, 1002]
    state = json.loads(json.dumps(guard.to_state()))
    restored = Guard(GuardSection(anchor=False), log=lambda line: None)
    restored.restore(state)
    assert [j.seed for j in restored.queue] == [1000, 1001, 1002] and restored.champions == ["seed"]


def test_a_run_with_the_guard_promotes_a_real_gain_with_honest_numbers(setup_run, tmp_path):
    # QUALITY is the only constant that matters; seed noise gives the re-runs a real spread.
    engine, run_dir = engine_with(
        setup_run, FakeExecutor(lambda job: by_quality(job, noise=0.01), slots=2), max_evaluations=10, workers=2,
        guard={"enabled": True, "noise_runs": 3, "reruns": 3, "z": 2.0, "min_delta": 0.001},
        mutators={"perturb": {"max_changes": 1}})
    engine.run()
    individuals, state = RunStore(run_dir).load()
    guard = state["guard"]
    assert len(guard["records"]["v00001"]["samples"]) == 3  # the noise floor
    assert len(guard["records"]["v00001"]["anchor"]) == 1  # and the seed's second draw on the evaluation seed
    promotions = len(guard["champions"]) - 1  # each adds a fresh-seed check of the new and the previous champion
    assert state["counters"]["guard_runs"] == 3 + 1 + 3 * (len(guard["records"]) - 1) + 2 * promotions
    assert guard["queue"] == []  # the run ended with every verdict given
    text = status_text(run_dir)
    assert "noise floor: sigma" in text and "held-out" in text
    candidates = len(guard["records"]) - 1  # every one re-ran ok here: its runs join the floor
    assert f"pooled with the re-runs of {candidates} candidate(s)" in text
    champion = guard["champions"][-1]
    assert len(guard["champions"]) >= 2  # a QUALITY step is worth far more than the noise
    # The champion's standing on the first draws' seed, and each promotion checked on a fresh seed.
    assert f"on the first draws' seed {engine.guard.on_evaluation_seed(champion):.4f}" in text
    assert text.count("fresh-seed check: ") == len(guard["champions"]) - 1
    out = export(run_dir, tmp_path / "out")
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["id"] == champion and meta["guard"]["n"] == 3
    assert meta["val_bpb"] == pytest.approx(meta["guard"]["val_mean"])
    if champion != "v00001":
        assert meta["guard"]["p_value"] < 0.05
        assert "±" in text and "first draw" in text
    # Held-out numbers stay in the guard's records: never in an individual's metrics.
    assert all("heldout_bpb" not in json.loads(i.metrics) for i in individuals)


def test_no_prompt_ever_sees_a_guard_score(setup_run, tmp_path):
    edits = [("reply", f"HYPOTHESIS: quality {q}\n<<<<<<< SEARCH\nSLEEP = 0.2\n=======\nSLEEP = 0.2\nQUALITY = {q}\n>>>>>>> REPLACE\n")
             for q in (0.9, 0.95, 0.6, 0.7, 0.8)]
    with ScriptedServer(edits, default=("reply", "nothing")) as server:
        engine, run_dir = engine_with(
            setup_run, FakeExecutor(lambda job: by_quality(job, noise=0.01)), max_evaluations=5, operators={"llm": 1.0},
            guard={"enabled": True, "noise_runs": 2, "reruns": 2, "z": 0.0, "min_delta": 0.0},
            mutators={"llm": {"base_url": server.base_url, "retries": 0, "timeout": 5, "failures": 5, "ideas": 50, "relatives": 5}})
        engine.run()
        prompts = "\n".join(server.prompts())
    _, state = RunStore(run_dir).load()
    held = [s["heldout_bpb"] for r in state["guard"]["records"].values() for s in r["samples"] if s["heldout_bpb"]]
    assert len(held) >= 4 and len(server.requests) >= 4, (state["guard"], [(i.id, i.status, i.val_bpb) for i in _])
    for value in held:
        for text in (repr(value), f"{value:.6f}", f"{value:.4f}", f"{value:.3f}"):
            assert text not in prompts
    assert "heldout.bin" not in prompts and "heldout_bpb" not in prompts  # no path, no metric name
    assert "val_bpb" in prompts  # validation numbers do go in
