"""Optuna proposals: distinct children on a new skeleton, a few constants moved around the
parent, resume without replay; and constants at 0.0 that perturb and optuna can move."""

from __future__ import annotations

import random

from mutators.base import Parent, Proposal
from mutators.constants import LEVER_WEIGHT, PerturbConstants, find_constants, move
from mutators.optuna_op import OptunaProposals, _params_of

SAMPLE = '''"""A sample with many constants."""
DEPTH = 8
N_HEAD = 6
MLP_RATIO = 4
LR = 3e-4
EMBED_LR = 0.3
BETAS = (0.9, 0.95)
BATCH = 2**19
GRAD_CLIP = 1.0
COMPILE = True
ACT = "relu2"  # evo: choice(relu2, gelu, silu)
COOLDOWN_FRAC = 0.4
LOG_EVERY = 10  # evo: fixed
'''

ZEROS = '''WARMUP_FRAC = 0.0
FINAL_LR_FRAC = 0.0
WEIGHT_DECAY = 0.0
LR = 0.01
'''


def _values(code: str) -> dict:
    return _params_of(find_constants(code))


def _differences(parent: str, child: str) -> set[str]:
    a, b = _values(parent), _values(child)
    assert set(a) == set(b)
    return {k for k in a if a[k] != b[k]}


def _children(op, parent, rng, n):
    out = []
    for _ in range(n):
        child = op.propose([parent], random.Random(rng.getrandbits(32)))  # as the breeder does
        if isinstance(child, Proposal):
            out.append(child)
            op.feedback(child.details, 2.0 + rng.random() * 0.1, evaluated=True)
    return out


def test_proposals_on_a_new_skeleton_are_distinct_and_a_resume_does_not_replay(tmp_path):
    journal, rng = tmp_path / "optuna.journal", random.Random(7)
    parent = Parent("p", SAMPLE, 2.0)
    first = _children(OptunaProposals(journal, seed=0), parent, rng, 8)
    assert len(first) >= 7
    assert len({c.code for c in first}) == len(first)  # no child proposed twice

    resumed = OptunaProposals(journal, seed=0)  # a new object on the same journal, as after a resume
    later = _children(resumed, parent, rng, 8)
    assert len(later) >= 7
    codes = [c.code for c in first + later]
    assert len(set(codes)) == len(codes)
    assert later[0].details["trial"] > first[-1].details["trial"]  # the study continues


def test_the_sampler_seed_comes_from_the_engine_rng_and_is_recorded(tmp_path):
    parent = Parent("p", SAMPLE, 2.0)
    a = OptunaProposals(tmp_path / "a.journal", seed=0).propose([parent], random.Random(1))
    b = OptunaProposals(tmp_path / "b.journal", seed=0).propose([parent], random.Random(2))
    assert a.code != b.code  # the same config seed, different engine draws: different children
    study = OptunaProposals(tmp_path / "a.journal")._load(a.details["study"], None)
    assert isinstance(study.user_attrs["sampler_seed"], int)


def test_each_child_moves_at_most_max_changes_constants_and_the_parent_is_trial_0(tmp_path):
    for max_changes in (1, 3):
        op = OptunaProposals(tmp_path / f"j{max_changes}.journal", seed=0, max_changes=max_changes)
        parent = Parent("p", SAMPLE, 2.0)
        children = _children(op, parent, random.Random(max_changes), 25)
        assert len(children) >= 20
        counts = [len(_differences(SAMPLE, c.code)) for c in children]
        assert all(1 <= n <= max_changes for n in counts), counts
        if max_changes == 3:
            assert max(counts) >= 2  # several at once happens, too
        for child in children:  # only the moved lines change, byte for byte elsewhere
            changed = [b for a, b in zip(SAMPLE.splitlines(), child.code.splitlines()) if a != b]
            assert 1 <= len(changed) <= max_changes
        rows = [(n, state, value) for _, n, state, value in op.trials()]
        assert rows[0] == (0, "COMPLETE", 2.0)  # the parent entered first, with its score
        study = op._load(children[0].details["study"], None)
        assert study.trials[0].params == _values(SAMPLE)
        for trial in study.trials[1:]:  # every trial records the whole point: moved and fixed values
            assert set(trial.params) == set(study.trials[0].params)


class PicksRecorded(OptunaProposals):
    """The real operator, noting which parameters each attempt lets the sampler move."""

    def _pick(self, movable, constants, rng):
        chosen = super()._pick(movable, constants, rng)
        self.picks.append(chosen)
        return chosen


def test_a_lever_is_offered_to_the_sampler_more_often_than_the_other_constants(tmp_path):
    lever = SAMPLE.replace("DEPTH = 8\n", "DEPTH = 8  # evo: lever\n")
    shares = {}
    for code, name in ((SAMPLE, "plain"), (lever, "lever")):
        op = PicksRecorded(tmp_path / f"{name}.journal", seed=0, max_changes=1)
        op.picks = []
        assert len(_children(op, Parent("p", code, 2.0), random.Random(1), 80)) >= 60
        shares[name] = sum("DEPTH" in chosen for chosen in op.picks) / len(op.picks)
    assert shares["lever"] > 1.5 * shares["plain"], shares
    # TPE, not the pick, decides the value: it often keeps a picked DEPTH at the parent's 8 (the
    # best trial in its model), and the attempt is drawn again. A lever's weight is in the offer.
    # The weight as such, and a tuple lever: each of its elements is a parameter with the lever's weight.
    constants = find_constants("A = 1.0\nB = (0.9, 0.95)  # evo: lever\nC = 2.0\n")
    op, rng = OptunaProposals(tmp_path / "tuple.journal", seed=0, max_changes=1), random.Random(0)
    picks = [op._pick(["A", "B[0]", "B[1]", "C"], constants, rng)[0] for _ in range(1000)]
    share, expected = sum(p.startswith("B[") for p in picks) / len(picks), 2 * LEVER_WEIGHT / (2 * LEVER_WEIGHT + 2)
    assert abs(share - expected) < 0.05, (share, expected)


def test_a_child_of_a_later_parent_stays_around_that_parent(tmp_path):
    """Same skeleton, other values (another operator moved them): fixed at the new parent's."""
    op = OptunaProposals(tmp_path / "j.journal", seed=0, max_changes=2)
    _children(op, Parent("p", SAMPLE, 2.0), random.Random(0), 3)
    moved = SAMPLE.replace("DEPTH = 8", "DEPTH = 16").replace("LR = 3e-4", "LR = 5e-4")
    for child in _children(op, Parent("q", moved, 1.9), random.Random(1), 10):
        assert 1 <= len(_differences(moved, child.code)) <= 2


def test_zero_constants_get_a_domain_and_move_away_from_zero(tmp_path):
    found = {c.name: c for c in find_constants(ZEROS)}
    assert set(found) == {"WARMUP_FRAC", "FINAL_LR_FRAC", "WEIGHT_DECAY", "LR"}
    assert found["WARMUP_FRAC"].domain.kind == "fraction"
    assert (found["WEIGHT_DECAY"].domain.low, found["WEIGHT_DECAY"].domain.high) == (0.0, 0.1)

    rng, perturb = random.Random(0), PerturbConstants(max_changes=3)
    moved_by_perturb = set()
    for _ in range(60):
        child = perturb.propose([Parent("p", ZEROS, 2.0)], rng)
        if isinstance(child, Proposal):
            values = _values(child.code)
            for name in ("WARMUP_FRAC", "FINAL_LR_FRAC", "WEIGHT_DECAY"):
                if values[name] != 0.0:
                    assert 0.0 < values[name] <= (0.1 if name == "WEIGHT_DECAY" else 0.99)
                    moved_by_perturb.add(name)
    assert moved_by_perturb == {"WARMUP_FRAC", "FINAL_LR_FRAC", "WEIGHT_DECAY"}

    op = OptunaProposals(tmp_path / "z.journal", seed=0)
    moved_by_optuna = set()
    for child in _children(op, Parent("p", ZEROS, 2.0), random.Random(0), 30):
        values = _values(child.code)
        moved_by_optuna |= {n for n in ("WARMUP_FRAC", "FINAL_LR_FRAC", "WEIGHT_DECAY") if values[n] != 0.0}
    assert moved_by_optuna == {"WARMUP_FRAC", "FINAL_LR_FRAC", "WEIGHT_DECAY"}


def test_zero_stays_reachable_once_left():
    """A small value may step back to exactly 0.0 (switched off again)."""
    found = {c.name: c for c in find_constants("WARMUP_FRAC = 0.02\nWEIGHT_DECAY = 0.0  # evo: range(0.0, 0.2)\n")}
    rng = random.Random(0)
    assert 0.0 in {move(found["WARMUP_FRAC"], rng) for _ in range(100)}
    leaving = {move(found["WEIGHT_DECAY"], rng) for _ in range(100)}
    assert all(0.0 < v <= 0.2 for v in leaving) and min(leaving) < 0.01 < max(leaving)


def test_optuna_moves_an_inferred_constant_at_most_its_reach_and_a_declared_range_as_written(tmp_path):
    """TPE's first trials are random draws from the space: over an inferred 30x-either-way domain
    they were mostly wasted runs (a beta2 of 0.95 became 0.22), so inferred domains reach
    OPTUNA_REACH either way (for a fraction, on its odds); a range the seed declares is the
    user's word."""
    from mutators.optuna_op import OPTUNA_REACH

    code = SAMPLE + "DECLARED_LR = 0.01  # evo: range(0.0001, 1.0, log)\n"
    op = OptunaProposals(tmp_path / "r.journal", seed=0, max_changes=3)
    parent = _values(code)
    declared_beyond, moved_fractions = 0, set()
    for child in _children(op, Parent("p", code, 2.0), random.Random(0), 40):
        values = _values(child.code)
        for name in ("LR", "EMBED_LR", "DEPTH", "BATCH", "GRAD_CLIP"):  # inferred log domains
            assert parent[name] / OPTUNA_REACH <= values[name] <= parent[name] * OPTUNA_REACH, (name, values[name])
        for name, new, old in (("COOLDOWN_FRAC", values["COOLDOWN_FRAC"], parent["COOLDOWN_FRAC"]),
                               ("BETAS[1]", values["BETAS[1]"], parent["BETAS[1]"])):  # fractions: the reach on the odds
            odds, old_odds = new / (1 - new), old / (1 - old)
            assert old_odds / OPTUNA_REACH * 0.999 <= odds <= old_odds * OPTUNA_REACH * 1.001, (name, new)
            moved_fractions.add(name) if new != old else None
        declared_beyond += not (0.01 / OPTUNA_REACH <= values["DECLARED_LR"] <= 0.01 * OPTUNA_REACH)
    assert declared_beyond > 0 and moved_fractions == {"COOLDOWN_FRAC", "BETAS[1]"}
