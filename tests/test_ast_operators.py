"""AST operators (libcst): finding hyperparameters, moving them, crossing two parents over."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from mutators.base import Parent, Proposal, Refusal
from mutators.constants import (LEVER_WEIGHT, CommentError, PerturbConstants, find_constants, least_moved_first, move,
                               replace_constants, screen_levers_first, step_again)
from mutators.crossover import Crossover
from mutators.optuna_op import OptunaProposals

ROOT = Path(__file__).resolve().parents[1]
SEEDS = [ROOT / "trainer" / "train_cpu.py", ROOT / "trainer" / "train_gpu.py"]

SAMPLE = '''"""A sample."""
import math

DEPTH = 8  # layers
LR = 3e-4
BETAS = (0.9, 0.95)
BATCH = 2**19
USE_BIAS = False
ACT = "relu2"  # evo: choice(relu2, gelu, silu)
WD = 0.1  # evo: range(0.0, 0.2)
LOG_EVERY = 10  # evo: fixed
NAME = "model"
lower_case = 5


def f(x):
    DEPTH = 99  # not module level
    return x * DEPTH
'''


def test_find_constants_and_their_domains():
    found = {c.name: c for c in find_constants(SAMPLE)}
    assert set(found) == {"DEPTH", "LR", "BETAS", "BATCH", "USE_BIAS", "ACT", "WD"}
    assert found["BATCH"].value == 2**19 and found["BATCH"].source == "2**19"
    assert found["ACT"].domain.choices == ["relu2", "gelu", "silu"]
    assert (found["WD"].domain.low, found["WD"].domain.high) == (0.0, 0.2)
    assert [d.kind for d in found["BETAS"].domain] == ["fraction", "fraction"]
    assert found["LR"].domain.log and found["DEPTH"].domain.kind == "int"


def test_bad_evo_comment_is_a_clear_error():
    with pytest.raises(CommentError, match="X: range"):
        find_constants("X = 1.0  # evo: range(high, low)\n")


def test_moves_stay_in_their_domains():
    rng = random.Random(0)
    found = {c.name: c for c in find_constants(SAMPLE)}
    for _ in range(300):
        assert 0 < move(found["BETAS"], rng)[1] < 1
        assert 0.0 <= move(found["WD"], rng) <= 0.2
        assert move(found["ACT"], rng) in {"gelu", "silu"}
        depth = move(found["DEPTH"], rng)
        assert depth in (4, 16)  # a power of two moves by a factor of two
        assert move(found["USE_BIAS"], rng) is True


def test_perturb_changes_only_the_chosen_lines():
    rng = random.Random(3)
    op = PerturbConstants(max_changes=2)
    for _ in range(50):
        child = op.propose([Parent("p", SAMPLE, 2.0)], rng)
        assert isinstance(child, Proposal)
        before, after = SAMPLE.splitlines(), child.code.splitlines()
        assert len(before) == len(after)
        changed = [(b, a) for b, a in zip(before, after) if b != a]
        assert 1 <= len(changed) <= 2
        for b, a in changed:
            name = b.split("=")[0].strip()
            assert a.startswith(f"{name} = ") and name in child.details["changes"]
            if "#" in b:  # the comment survives
                assert a.endswith(b[b.index("#"):])
        assert "    DEPTH = 99  # not module level" in after


def test_replace_keeps_formatting_and_comments_byte_for_byte():
    code = "X = 1   # keep   this\n\n\nY = (1,\n     2)\n"
    assert replace_constants(code, {"X": "2"}) == "X = 2   # keep   this\n\n\nY = (1,\n     2)\n"


def test_no_constants_is_a_refusal():
    result = PerturbConstants().propose([Parent("p", "print('hi')\n", None)], random.Random(0))
    assert isinstance(result, Refusal) and "no module-level constants" in result.reason


def test_a_winning_step_can_be_taken_again_within_its_domain():
    found = {c.name: c for c in find_constants(SAMPLE)}
    assert step_again(found["DEPTH"], "16", "8") == 4  # halved and won: halve again
    assert step_again(found["LR"], "2e-4", "3e-4") == pytest.approx(4.5e-4)  # the same factor
    assert step_again(found["WD"], "0.05", "0.1") == pytest.approx(0.15)  # linear range: the same difference
    assert step_again(found["WD"], "0.0", "0.1") == pytest.approx(0.2)  # off -> on, then the same again
    assert step_again(found["WD"], "0.0", "0.15") == 0.2  # 0.25 is past the range: up to its edge
    at_edge = find_constants("WD = 0.2  # evo: range(0.0, 0.2)\n")[0]
    assert step_again(at_edge, "0.1", "0.2") is None  # no room left
    assert step_again(found["ACT"], "'gelu'", "'relu2'") is None  # a choice has no direction
    assert step_again(found["BETAS"], "(0.9, 0.9)", "(0.9, 0.95)") is None  # nor does a tuple, here
    beta = find_constants("BETA = 0.9\n")[0]
    assert step_again(beta, "0.8", "0.9") == pytest.approx(0.9529, abs=1e-4)  # the same logit step
    near_one = find_constants("BETA = 0.999\n")[0]
    assert step_again(near_one, "0.95", "0.999") == 0.9999  # stays inside (0, 1), never 1.0
    assert step_again(find_constants("BETA = 0.9999\n")[0], "0.95", "0.999") is None  # no room left
    assert step_again(find_constants("B = 32  # evo: choice(16, 32, 64)\n")[0], "16", "32") is None
    assert step_again(find_constants("STEPS = 300\n")[0], "300", "300.4") is None  # rounds back: no move
    assert step_again(find_constants("TOKENS = 2**11\n")[0], "2**12", "2**11") == 2**10
    assert step_again(find_constants("LR = 0.0003\n")[0], "0.0", "0.0003") is None  # from off: now a log domain


def test_perturb_follows_the_parents_winning_step():
    winner = Parent("p", SAMPLE, 2.0, winning_move={"DEPTH": ["16", "8"], "LR": ["2e-4", "3e-4"]})
    follower = PerturbConstants(follow=1.0).propose([winner], random.Random(0))
    assert isinstance(follower, Proposal), follower
    assert follower.details == {"changes": {"DEPTH": ("8", "4"), "LR": ("3e-4", "0.00045")}, "follows": "p"}
    assert "DEPTH = 4  # layers" in follower.code and "LR = 0.00045" in follower.code
    assert "the parent's winning step again: DEPTH 16 -> 8, LR 2e-4 -> 3e-4" in follower.hypothesis
    # Never with follow 0, and never from a parent without a winning step: a fresh random step.
    for parent, follow in ((winner, 0.0), (Parent("p", SAMPLE, 2.0), 1.0)):
        child = PerturbConstants(follow=follow).propose([parent], random.Random(0))
        assert isinstance(child, Proposal) and "follows" not in child.details
    # A step that cannot be repeated (a choice) falls back to a fresh random step.
    stuck = PerturbConstants(follow=1.0).propose([Parent("p", SAMPLE, 2.0, {"ACT": ["'gelu'", "'relu2'"]})],
                                                 random.Random(0))
    assert isinstance(stuck, Proposal) and "follows" not in stuck.details


def test_perturb_takes_the_opposite_of_a_childs_losing_step():
    parent = Parent("p", SAMPLE, 2.0, losing_move={"DEPTH": ["8", "16"], "WD": ["0.1", "0.15"]}, loser="c")
    child = PerturbConstants(reflect=1.0).propose([parent], random.Random(0))
    assert isinstance(child, Proposal), child
    assert child.details == {"changes": {"DEPTH": ("8", "4"), "WD": ("0.1", "0.05")}, "reflects": "c"}
    assert "DEPTH = 4  # layers" in child.code and "WD = 0.05  # evo: range(0.0, 0.2)" in child.code
    assert "the opposite of c's losing step: DEPTH 8 -> 16, WD 0.1 -> 0.15" in child.hypothesis
    # A winning step comes first; reflect 0 never reflects.
    both = Parent("p", SAMPLE, 2.0, winning_move={"LR": ["2e-4", "3e-4"]}, losing_move={"DEPTH": ["8", "16"]}, loser="c")
    follower = PerturbConstants().propose([both], random.Random(0))
    assert "follows" in follower.details and "reflects" not in follower.details
    fresh = PerturbConstants(reflect=0.0).propose([parent], random.Random(0))
    assert isinstance(fresh, Proposal) and "reflects" not in fresh.details
    # Starting values are compared as values: Optuna records 3e-4 as 0.0003.
    rendered = Parent("p", SAMPLE, 2.0, losing_move={"LR": ["0.0003", "0.00045"]}, loser="o")
    assert PerturbConstants().propose([rendered], random.Random(0)).details["changes"] == {"LR": ("3e-4", "0.0002")}
    # A choice has no other way, and a constant the parent no longer holds at the step's start is
    # left alone: with nothing to reflect, a fresh random step.
    for losing in ({"ACT": ['"relu2"', "'gelu'"]}, {"DEPTH": ["6", "12"]}):
        stuck = PerturbConstants().propose([Parent("p", SAMPLE, 2.0, losing_move=losing, loser="c")], random.Random(0))
        assert isinstance(stuck, Proposal) and "reflects" not in stuck.details


def test_perturb_moves_the_constants_the_run_has_moved_least_first():
    constants = find_constants(SAMPLE)
    names = [c.name for c in constants]
    # Without memory, or before the run has moved anything, and with no levers, the draw is the
    # uniform one perturb always made: the same stream, seed for seed.
    for seed in range(20):
        for memory in (None, {}):
            drawn = least_moved_first(constants, 2, memory, random.Random(seed))
            assert drawn == random.Random(seed).sample(constants, k=2)
    # Every constant moved 3 times but DEPTH: DEPTH comes first far more often than 1 in len(names).
    moved = {name: 3 for name in names if name != "DEPTH"}
    firsts = [least_moved_first(constants, 1, moved, random.Random(seed))[0].name for seed in range(200)]
    share = firsts.count("DEPTH") / len(firsts)
    expected = 1 / (1 + (len(names) - 1) / 16)  # weight 1 against 1/16 for each of the others
    assert abs(share - expected) < 0.1 and share > 3 / len(names), (share, expected)
    drawn = least_moved_first(constants, len(names) + 3, moved, random.Random(0))
    assert sorted(c.name for c in drawn) == sorted(names)  # without replacement, never more than there are
    # Perturb draws its fresh steps this way from the memory its parent carries.
    children = [PerturbConstants(max_changes=1).propose([Parent("p", SAMPLE, 2.0, moved=moved)], random.Random(seed))
                for seed in range(100)]
    assert sum("DEPTH" in c.details["changes"] for c in children) > 3 * 100 / len(names)


def test_a_lever_is_marked_only_where_an_evo_comment_says_so():
    code = '''A = 4  # evo: lever
B = 8  # evo: range(2, 16), lever
C = "x"  # evo: choice(x, y) lever. Pulls hard
D = 0.5  # evo: range(0.1, 0.9). Pulls like a lever
E = 2  # a lever, but not an evo comment
F = 3  # evo: fixed. Not a lever
G = 8  # evo: lever, range(2, 16)
H = 3  # evo: lever, fixed
I = "relu"  # evo: choice(relu, gelu), Lever (the big one)
J = 4  # evo: lever  # evo: fixed
K = 4  # evo: range(2, 16)  # evo: lever
L = 8  # evo: leverage
'''
    found = {c.name: c for c in find_constants(code)}
    assert {name for name, c in found.items() if c.lever} == {"A", "B", "C", "G", "I", "K"}
    assert "F" not in found and "H" not in found  # fixed stays fixed, before or after `lever`
    assert "J" not in found  # a second mark is read too: fixed stays fixed
    assert (found["K"].domain.low, found["K"].domain.high) == (2, 16) and found["L"].domain.inferred
    assert (found["G"].domain.low, found["G"].domain.high) == (2, 16)  # `lever` first hides no range
    assert found["I"].domain.choices == ["relu", "gelu"]  # brackets in the prose after it are prose
    assert found["A"].domain.inferred  # `lever` alone: the domain is inferred, as with no comment
    assert (found["B"].domain.low, found["B"].domain.high) == (2, 16)  # and a declared one still holds
    assert found["C"].domain.choices == ["x", "y"]


def test_levers_weigh_more_without_memory():
    code = SAMPLE.replace("DEPTH = 8  # layers", "DEPTH = 8  # evo: lever. Layers")
    constants = find_constants(code)
    n = len(constants)
    firsts = [least_moved_first(constants, 1, None, random.Random(seed))[0].name for seed in range(400)]
    share, expected = firsts.count("DEPTH") / len(firsts), LEVER_WEIGHT / (LEVER_WEIGHT + n - 1)
    assert abs(share - expected) < 0.08 and share > 2 / n, (share, expected)
    drawn = least_moved_first(constants, n + 3, None, random.Random(0))
    assert sorted(c.name for c in drawn) == sorted(c.name for c in constants)  # still without replacement
    # Perturb's fresh steps, with no memory at all (greedy search's case), go to the lever more often too.
    children = [PerturbConstants(max_changes=1).propose([Parent("p", code, 2.0)], random.Random(seed)) for seed in range(200)]
    share = sum("DEPTH" in c.details["changes"] for c in children) / len(children)
    assert 2 / n < share < 0.6, share  # weighted, not screened: without memory nobody knows it was never moved


def test_a_run_with_memory_moves_each_lever_once_before_anything_else():
    code = SAMPLE.replace("DEPTH = 8  # layers", "DEPTH = 8  # evo: lever. Layers").replace(
        "BATCH = 2**19", "BATCH = 2**19  # evo: lever")
    constants = find_constants(code)
    levers = {c.name for c in constants if c.lever}
    assert levers == {"DEPTH", "BATCH"}
    # Nothing moved yet: every draw starts with the levers, and a draw of 3 adds one other constant.
    for seed in range(50):
        assert {c.name for c in least_moved_first(constants, 2, {}, random.Random(seed))} == levers
        three = [c.name for c in least_moved_first(constants, 3, {}, random.Random(seed))]
        assert set(three[:2]) == levers and three[2] not in levers and len(set(three)) == 3
    # One lever moved: the other comes first, whatever the rest has done.
    moved = {"DEPTH": 1}
    assert all(least_moved_first(constants, 1, moved, random.Random(seed))[0].name == "BATCH" for seed in range(50))
    # Both moved: back to the weighted draw, where a lever moved once weighs LEVER_WEIGHT / 4 against
    # 1 for each constant never moved.
    moved = {"DEPTH": 1, "BATCH": 1}
    firsts = [least_moved_first(constants, 1, moved, random.Random(seed))[0].name for seed in range(400)]
    share = firsts.count("DEPTH") / len(firsts)
    expected = (LEVER_WEIGHT / 4) / (2 * LEVER_WEIGHT / 4 + len(constants) - 2)
    assert abs(share - expected) < 0.06, (share, expected)
    # Perturb's fresh steps from a parent carrying the run's memory: the first child moves a lever.
    children = [PerturbConstants(max_changes=1).propose([Parent("p", code, 2.0, moved={})], random.Random(seed))
                for seed in range(30)]
    assert all(set(c.details["changes"]) <= levers and c.details["changes"] for c in children)
    # A lever declared with no room to move never counts as moved: it is not screened, or every
    # fresh step would try it first and refuse.
    stuck = find_constants(code.replace("BATCH = 2**19  # evo: lever", "BATCH = 4  # evo: choice(4, 4), lever"))
    assert [c.name for c in stuck if c.lever] == ["DEPTH", "BATCH"]
    for seed in range(20):
        assert [c.name for c in screen_levers_first(stuck, 2, {}, random.Random(seed))] == ["DEPTH"]
        assert screen_levers_first(stuck, 2, {"DEPTH": 1}, random.Random(seed)) == []


def test_the_seeds_mark_their_size_and_batch_constants_as_levers():
    for seed in SEEDS:
        levers = {c.name for c in find_constants(seed.read_text()) if c.lever}
        assert levers == {"DEPTH", "ASPECT_RATIO", "MLP_RATIO", "TOTAL_BATCH_TOKENS", "DEVICE_BATCH_SIZE"}, seed.name


@pytest.mark.parametrize("seed", SEEDS, ids=lambda p: p.name)
def test_perturbations_of_the_seeds_compile(seed):
    code, rng, op = seed.read_text(), random.Random(0), PerturbConstants()
    outcomes = [op.propose([Parent("p", code, 2.0)], rng) for _ in range(60)]
    valid = [o for o in outcomes if isinstance(o, Proposal)]
    assert len(valid) >= 57  # benchmarks/operator_validity.py measures 200 and the smoke stage
    for proposal in valid:
        compile(proposal.code, "train.py", "exec")


A = '''import math

LR = 0.01


def helper(x):
    return x + 1


def train():
    return helper(LR)
'''

B = '''import math

LR = 0.02
SCALE = 3.0


def scaled(x):
    return x * SCALE


def helper(x):
    return scaled(x) + 1


def train():
    return helper(LR)
'''


def test_crossover_takes_definitions_with_their_dependencies():
    op = Crossover(max_taken=1)
    seen = set()
    for i in range(30):
        child = op.propose([Parent("a", A, 2.0), Parent("b", B, 2.1)], random.Random(i))
        assert isinstance(child, Proposal)
        compile(child.code, "train.py", "exec")
        taken = tuple(child.details["taken"])
        seen.add(taken)
        if taken == ("helper",):
            assert sorted(child.details["brought"]) == ["SCALE", "scaled"]
            namespace = {}
            exec(child.code, namespace)
            assert namespace["train"]() == 0.01 * 3.0 + 1  # A's LR through B's helper
            assert child.code.index("def scaled") < child.code.index("def helper")
        if taken == ("LR",):
            assert "LR = 0.02" in child.code and "def scaled" not in child.code
    assert {("helper",), ("LR",)} <= seen


def test_crossover_of_identical_parents_is_refused():
    result = Crossover().propose([Parent("a", A, 2.0), Parent("b", A, 2.0)], random.Random(0))
    assert isinstance(result, Refusal) and "nothing to cross" in result.reason


def test_crossover_never_gives_back_the_second_parent():
    """Taking every definition the parents differ in rebuilds B: a duplicate, never a child."""
    from evo.population import normalized_hash

    children = [Crossover(max_taken=3).propose([Parent("a", A, 2.0), Parent("b", B, 2.1)], random.Random(i))
                for i in range(30)]
    assert all(isinstance(c, Proposal) and len(c.details["taken"]) == 1 for c in children)  # LR or helper, never both
    assert all(normalized_hash(c.code) != normalized_hash(B) for c in children)
    one_apart = A.replace("LR = 0.01", "LR = 0.03")
    result = Crossover().propose([Parent("a", A, 2.0), Parent("b", one_apart, 2.1)], random.Random(0))
    assert isinstance(result, Refusal) and "differ only in LR" in result.reason


def test_optuna_learns_per_skeleton_and_survives_a_restart(tmp_path):
    journal = tmp_path / "optuna.journal"
    op = OptunaProposals(journal, seed=0)
    parent = Parent("p", SAMPLE, 2.0)
    first = op.propose([parent], random.Random(0))
    assert isinstance(first, Proposal) and first.details["study"].startswith("skeleton-")
    op.feedback(first.details, 1.9, evaluated=True)
    second = op.propose([parent], random.Random(0))
    op.feedback(second.details, None, evaluated=True)  # a crash is told as failed
    third = op.propose([parent], random.Random(0))
    op.feedback(third.details, None, evaluated=False)  # a duplicate never run is pruned

    reopened = OptunaProposals(journal, seed=0)  # as after a resume
    states = [(number, state, value) for _, number, state, value in reopened.trials()]
    assert states[0] == (0, "COMPLETE", 2.0)  # the parent entered as a finished trial
    assert states[1:] == [(1, "COMPLETE", 1.9), (2, "FAIL", None), (3, "PRUNED", None)]
    fourth = reopened.propose([parent], random.Random(0))
    assert fourth.details["trial"] == 4

    other_skeleton = SAMPLE.replace("return x * DEPTH", "return x + DEPTH")
    different = reopened.propose([Parent("q", other_skeleton, 2.2)], random.Random(0))
    assert different.details["study"] != first.details["study"]


def test_two_drivers_on_one_rdb_storage_share_their_studies(tmp_path):
    """Several drivers point mutators.optuna.storage at one database (PostgreSQL in production;
    SQLite here, the same RDB storage code): each sees the trials the other told."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    driver_a, driver_b = OptunaProposals(url, seed=0), OptunaProposals(url, seed=1)
    parent = Parent("p", SAMPLE, 2.0)
    first = driver_a.propose([parent], random.Random(0))
    driver_a.feedback(first.details, 1.8, evaluated=True)
    second = driver_b.propose([parent], random.Random(0))
    assert second.details["study"] == first.details["study"] and second.details["trial"] == 2
    driver_b.feedback(second.details, 1.7, evaluated=True)
    values = [value for _, _, state, value in driver_a.trials() if state == "COMPLETE"]
    assert values == [2.0, 1.8, 1.7]
