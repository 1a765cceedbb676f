"""Module-level hyperparameters: found with libcst, each with a search domain, and rewritten in
place so that every other byte of the file (formatting, comments) stays as it was.

A hyperparameter is a top-level `NAME = value` with an UPPER_CASE name and a value that is a
number, a boolean, a tuple of numbers or a simple arithmetic expression such as `2**19`; a string
takes part only when its comment lists choices. A trailing comment narrows or fixes the domain:

    ACTIVATION = "relu2"   # evo: choice(relu2, gelu, silu)
    MATRIX_LR = 0.02       # evo: range(1e-4, 1e-1, log)
    DEPTH = 8              # evo: range(2, 16), lever
    LOG_EVERY = 25         # evo: fixed

`lever` (alone, or before or after a choice or range) marks a constant the researcher expects to matter
most, a size or a batch, say: perturb and Optuna weigh it LEVER_WEIGHT times as much as others
when they draw which constants move, and perturb, given the run's memory, moves every lever once
before any other constant.
"""

from __future__ import annotations

import ast
import functools
import math
import random
import re
from dataclasses import dataclass, field

import libcst as cst

from mutators.base import Parent, Proposal, Refusal, checked

_FRACTION_NAMES = re.compile(r"FRAC|BETA|MOMENTUM|DROPOUT|RATIO_OF|EMA")
# A float that is 0.0 and has no fraction-like name: its domain is [0, ZERO_FLOAT_HIGH]; a move away
# from zero lands log-uniformly in [ZERO_FLOAT_HIGH * 1e-3, ZERO_FLOAT_HIGH] (1e-4..1e-1).
ZERO_FLOAT_HIGH = 0.1
# A value this close to a zero lower bound (as a share of the domain's width) may step back to
# exactly 0.0, with this probability per move: off stays reachable once it has been left.
ZERO_RETURN_SHARE, ZERO_RETURN_P = 0.1, 0.2
# The one grammar of an `# evo:` mark: an optional `lever`, then an optional domain, then an
# optional `lever`. `lever` counts straight after `evo:` or straight after a choice's or range's
# closing parenthesis, not anywhere in the prose that may follow ("# evo: fixed. Not a lever" marks
# nothing). The domain's arguments end at the first ")": prose after it may hold brackets of its own.
_MARK = re.compile(r"#\s*evo:\s*(?P<lever_first>(?i:lever)\s*,?\s*)?"
                   r"(?:(?P<kind>fixed|choice|range)\s*(?:\((?P<args>[^)]*)\))?)?"
                   r"(?P<lever_after>\s*,?\s*(?i:lever)\b)?")
_WHOLE_WORD_LEVER = re.compile(r"(?i:lever)\b")
# A lever's weight in the draw of which constants move, against 1 for an ordinary constant (perturb
# divides both by how often the run has moved them). With 5 levers among the CPU seed's 24
# constants, about 4 in 10 picks fall on a lever, where least-moved-first left DEPTH untouched in 3
# of run 8's 4 repeats (BENCHMARKS.md). With the run's memory, the levers are screened first (see
# screen_levers_first) and this weight applies once each has moved.
LEVER_WEIGHT = 3.0


class CommentError(ValueError):
    """An `# evo:` comment that cannot be understood; the message names the line."""


@dataclass
class Domain:
    """Where a constant may move. kind: bool, int, float, fraction, choice."""

    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list = field(default_factory=list)
    inferred: bool = False  # guessed from the name and value (infer_domain), not declared in a comment


@dataclass
class Constant:
    name: str
    value: object  # bool, int, float, str, or tuple of numbers
    source: str  # the value's code as written
    domain: Domain | list[Domain]  # one per element for tuples
    lever: bool = False  # marked `# evo: lever` in the code: LEVER_WEIGHT times the weight in the draw


def _evaluate(code: str):
    """The value of a constant expression made of literals and arithmetic, else None."""
    try:
        tree = ast.parse(code, mode="eval")
    except SyntaxError:
        return None
    allowed = (ast.Expression, ast.Constant, ast.BinOp, ast.UnaryOp, ast.Tuple, ast.Load, ast.operator, ast.unaryop)
    if not all(isinstance(n, allowed) for n in ast.walk(tree)):
        return None
    try:
        value = eval(compile(tree, "<constant>", "eval"), {"__builtins__": {}})
    except Exception:
        return None
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return value
    return None


def _is_power_of_two(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 2 and n & (n - 1) == 0


def infer_domain(name: str, value) -> Domain | None:
    """A sensible domain from the name and value alone."""
    if isinstance(value, bool):
        return Domain("bool", choices=[False, True])
    if isinstance(value, int):
        if _is_power_of_two(value):
            return Domain("int", low=max(1, value // 8), high=value * 8, log=True, inferred=True)
        if value > 0:
            return Domain("int", low=max(1, value // 3), high=value * 3, inferred=True)
        return None
    if isinstance(value, float):
        if 0 <= value < 1 and _FRACTION_NAMES.search(name):
            return Domain("fraction", low=0.0, high=1.0, inferred=True)
        if value > 0 and math.isfinite(value):
            return Domain("float", low=value / 30, high=value * 30, log=True, inferred=True)
        if value == 0:  # switched off (a weight decay, say): may become small positive, and back
            return Domain("float", low=0.0, high=ZERO_FLOAT_HIGH)
    return None


def _parse_choice(text: str, value):
    items = [t.strip() for t in text.split(",") if t.strip()]
    if isinstance(value, str):
        return [t.strip("'\"") for t in items]
    return [_evaluate(t) for t in items]


def read_mark(comment: str | None) -> tuple[str | None, str | None, bool]:
    """(kind, arguments, lever) of a comment's `# evo:` marks: the first mark that names a domain
    gives the kind (fixed, choice, range; None if none does) and its arguments, and any mark may
    say `lever`. A second mark is read, not dropped: `# evo: lever  # evo: fixed` stays fixed."""
    kind = args = None
    lever = False
    for mark in _MARK.finditer(comment or ""):
        if kind is None and mark.group("kind"):
            kind, args = mark.group("kind"), mark.group("args")
        lever_first = mark.group("lever_first") and _WHOLE_WORD_LEVER.match(comment, mark.start("lever_first"))
        lever_after = mark.group("kind") in ("choice", "range") and mark.group("args") is not None and mark.group("lever_after")
        lever = lever or bool(lever_first or lever_after)
    return kind, args, lever


def domain_from_comment(name: str, value, comment: str | None) -> Domain | None | str:
    """The domain a comment declares, 'fixed', or None when there is no evo comment."""
    kind, args, _ = read_mark(comment)
    if kind is None:
        return None
    if kind == "fixed":
        return "fixed"
    if args is None:
        raise CommentError(f"{name}: `# evo: {kind}` needs arguments, e.g. {kind}(...)")
    if kind == "choice":
        choices = _parse_choice(args, value)
        if len(choices) < 2 or any(c is None for c in choices):
            raise CommentError(f"{name}: choice() needs two or more values, got {args!r}")
        return Domain("choice", choices=choices)
    parts = [p.strip() for p in args.split(",")]
    log = "log" in parts[2:]
    try:
        low, high = float(parts[0]), float(parts[1])
    except (ValueError, IndexError):
        raise CommentError(f"{name}: range() takes (low, high[, log]), got {args!r}") from None
    if not low < high or (log and low <= 0):
        raise CommentError(f"{name}: range({args}) is empty or has a non-positive log bound")
    kind = "int" if isinstance(value, int) and not isinstance(value, bool) else "float"
    return Domain(kind, low=low, high=high, log=log)


def _assignments(module: cst.Module):
    for statement in module.body:
        if not isinstance(statement, cst.SimpleStatementLine) or len(statement.body) != 1:
            continue
        assign = statement.body[0]
        if isinstance(assign, cst.Assign) and len(assign.targets) == 1:
            target = assign.targets[0].target
            if isinstance(target, cst.Name) and target.value.isupper():
                comment = statement.trailing_whitespace.comment
                yield target.value, assign, comment.value if comment else None


@functools.lru_cache(maxsize=32)
def parse(code: str) -> cst.Module:
    """libcst parsing is slow and its trees are immutable: parse each parent once."""
    return cst.parse_module(code)


def find_constants(code: str) -> list[Constant]:
    module = parse(code)
    found = []
    for name, assign, comment in _assignments(module):
        source = module.code_for_node(assign.value)
        value = _evaluate(source)
        if value is None:
            continue
        declared = domain_from_comment(name, value, comment)
        if declared == "fixed":
            continue
        lever = read_mark(comment)[2]
        if isinstance(value, tuple):
            domains = [declared or infer_domain(name, v) for v in value]
            if all(d is not None for d in domains):
                found.append(Constant(name, value, source, domains, lever))
            continue
        domain = declared or infer_domain(name, value)
        if domain is not None and (not isinstance(value, str) or domain.kind == "choice"):
            found.append(Constant(name, value, source, domain, lever))
    return found


def _clamp(x, d: Domain):
    if d.low is not None:
        x = max(x, d.low)
    if d.high is not None:
        x = min(x, d.high)
    return x


def logit(p: float) -> float:
    """The log-odds of a fraction: steps taken here keep it strictly inside (0, 1)."""
    return math.log(p / (1 - p))


def logistic(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def move_value(value, d: Domain, rng: random.Random):
    """One step away from value, within its domain."""
    if d.kind in ("bool", "choice"):
        others = [c for c in d.choices if c != value]
        return rng.choice(others) if others else value
    if d.low == 0 and d.kind in ("fraction", "float") and not d.log:
        if value <= 0:  # leave zero: log-uniformly to a small positive value
            high = 0.1 if d.kind == "fraction" or d.high is None else d.high
            return round(10 ** rng.uniform(math.log10(high) - 3, math.log10(high)), 6)
        width = (d.high if d.high is not None else 1.0) - d.low
        if value <= ZERO_RETURN_SHARE * width and rng.random() < ZERO_RETURN_P:
            return 0.0  # back to off
    if d.kind == "fraction":  # a step in logit space keeps it strictly inside (0, 1)
        return round(logistic(logit(value) + rng.choice((-1, 1)) * rng.uniform(0.3, 1.0)), 4)
    if d.kind == "int":
        if _is_power_of_two(value) and (d.log or d.low is None):
            new = value * 2 if rng.random() < 0.5 else value // 2
        else:
            step = max(1, round(abs(value) * 0.25))
            new = value + rng.choice((-step, step))
        return int(_clamp(new, d))
    factor = rng.choice((1.25, 1.5, 2.0))
    new = value * factor if rng.random() < 0.5 else value / factor
    if not d.log and d.low is not None and d.high is not None and value == 0:  # a zero inside (low, high)
        new = rng.uniform(d.low, d.high)
    return float(_clamp(new, d))


def move(constant: Constant, rng: random.Random):
    if isinstance(constant.value, tuple):
        i = rng.randrange(len(constant.value))
        element = move_value(constant.value[i], constant.domain[i], rng)
        return constant.value[:i] + (element,) + constant.value[i + 1 :]
    return move_value(constant.value, constant.domain, rng)


def render(value) -> str:
    if isinstance(value, bool) or isinstance(value, str):
        return repr(value)
    if isinstance(value, int):
        return f"2**{value.bit_length() - 1}" if _is_power_of_two(value) and value >= 1024 else repr(value)
    if isinstance(value, float):
        text = f"{value:.4g}"
        return text if any(ch in text for ch in ".en") else text + ".0"  # stays a float
    if isinstance(value, tuple):
        return "(" + ", ".join(render(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    raise TypeError(value)


def replace_constants(code: str, new_values: dict[str, str]) -> str:
    """The same code with the given constants' values replaced by new source text."""

    class Replace(cst.CSTTransformer):
        depth = 0  # inside a function or class body: not a module-level constant

        def leave_Assign(self, original, updated):
            target = updated.targets[0].target if len(updated.targets) == 1 else None
            if isinstance(target, cst.Name) and target.value in new_values and self.depth == 0:
                return updated.with_changes(value=cst.parse_expression(new_values[target.value]))
            return updated

        def visit_IndentedBlock(self, node):
            self.depth += 1

        def leave_IndentedBlock(self, original, updated):
            self.depth -= 1
            return updated

    return parse(code).visit(Replace()).code


# The pattern move (Hooke and Jeeves): when the parent was made by a constant change that beat its
# own parent, its first perturb child takes the same step again (DEPTH 4 -> 2 won, so try 2 -> 1;
# a learning rate x1.5 won, so try x1.5 more), with this probability. Greedy search only ever draws
# a fresh random step; following a direction that already paid is how a population's memory helps.
# The breeder offers each winning step once (evo/breeder.py, _winning_move).
FOLLOW_P = 1.0
# The opposite probe (Hooke and Jeeves' exploratory move): when a step made a child clearly worse
# than its parent, a later perturb child of a parent holding the same starting value takes the
# opposite step, with this probability (DEPTH 4 -> 8 lost, so try 4 -> 2). A large loss marks a
# constant the score is sensitive to; its other side is where a gain is likeliest. The breeder
# offers each losing step once, the worst first (evo/breeder.py, _losing_move).
REFLECT_P = 1.0
FRACTION_EDGE = 1e-4  # a repeated fraction step stays this far inside (0, 1): a beta of 1.0 breaks Adam


def step_again(constant: Constant, old_source: str, new_source: str):
    """The constant's value moved once more by the step old -> new, within its domain: the same
    factor on a log domain, the same difference on a linear one, the same logit step for a
    fraction. None when that step cannot be repeated: a choice or flag, a tuple, a sign change, a
    step from zero on a domain now inferred as log, or no room left."""
    old, new, value, d = _evaluate(old_source), _evaluate(new_source), constant.value, constant.domain
    numbers = (int, float)
    if isinstance(d, list) or d.kind in ("bool", "choice"):
        return None
    if any(isinstance(v, bool) or not isinstance(v, numbers) for v in (old, new, value)):
        return None
    if d.kind == "fraction":
        if not all(0 < v < 1 for v in (old, new, value)):
            return None
        moved = logistic(logit(value) + logit(new) - logit(old))
        moved = round(min(max(moved, FRACTION_EDGE), 1 - FRACTION_EDGE), 4)
    else:
        if not d.log:  # a linear domain: the same difference
            moved = value + (new - old)
        elif old > 0 and new > 0 and value > 0:  # a log domain: the same factor
            moved = value * (new / old)
        else:
            return None
        moved = _clamp(moved, d)
        moved = int(round(moved)) if d.kind == "int" else moved
    # Compared as written: a float repeated into the same 4 significant digits is no move.
    return moved if render(moved) != render(value) else None


def steps_again(constants: list[Constant], steps: dict, backwards: bool = False) -> dict:
    """{name: (source, new source)} for each step old -> new in `steps` that can be taken again
    (see step_again). Forwards (a winner's step, the pattern move): once more from the constant's
    value. Backwards (a loser's step, the opposite probe): the other way from old, only for a
    constant that holds the value old (compared as values: Optuna records `0.0003` for `3e-4`); a
    choice, a flag, a tuple, a fraction leaving zero or a constant at its domain's edge has no
    other way and is left out. {} when no step can be taken."""
    by_name = {c.name: c for c in constants}
    changes = {}
    for name, (old, new) in steps.items():
        constant = by_name.get(name)
        if constant is None or (backwards and _evaluate(old) != constant.value):
            continue
        moved = step_again(constant, new, old) if backwards else step_again(constant, old, new)
        if moved is not None:
            changes[name] = (constant.source, render(moved))
    return changes


def opposite_steps(constants: list[Constant], losing_move: dict) -> dict:
    """The losing step taken the other way (see steps_again)."""
    return steps_again(constants, losing_move, backwards=True)


def weighted_sample(items: list, k: int, weights: list[float], rng: random.Random) -> list:
    """k of items drawn without replacement, each draw in proportion to the weights left."""
    pool, weights, chosen = list(items), list(weights), []
    for _ in range(min(k, len(pool))):
        i = rng.choices(range(len(pool)), weights)[0]
        chosen.append(pool.pop(i))
        weights.pop(i)
    return chosen


def least_moved_first(constants: list[Constant], k: int, moved: dict | None, rng: random.Random) -> list[Constant]:
    """k constants drawn without replacement, each with weight 1 / (1 + times moved)^2, times
    LEVER_WEIGHT for a lever: a bias toward the constants the run has moved least (one never moved
    is 4 times as likely as one moved once), so a big lever (DEPTH, say) is less often left
    untouched by luck while small ones move twice.

    With the run's memory (`moved` not None), the levers it has never moved come first, before any
    other constant: a run screens every lever once, early, and its reflection and pattern move take
    the lever on from there (see screen_levers_first). With no memory and no levers: uniform (the
    same draw as ever, so a memoryless caller's streams do not change)."""
    if not moved and not any(c.lever for c in constants):
        return rng.sample(constants, k=min(len(constants), k))
    chosen = screen_levers_first(constants, k, moved, rng)
    rest = [c for c in constants if c not in chosen]
    weights = [(LEVER_WEIGHT if c.lever else 1.0) / (1 + (moved or {}).get(c.name, 0)) ** 2 for c in rest]
    return chosen + weighted_sample(rest, k - len(chosen), weights, rng)


def screen_levers_first(constants: list[Constant], k: int, moved: dict | None, rng: random.Random) -> list[Constant]:
    """Up to k of the levers the run has never moved, uniformly; none without memory. Why: in run 9
    every repeat was decided by a size step, and evo's first step on DEPTH came as late as its
    11th evaluation. The seed's author marked the levers as the constants that matter most, so a
    run with memory tries each of them once before it spends evaluations on the rest."""
    if moved is None:
        return []
    unmoved = [c for c in constants if c.lever and not moved.get(c.name) and _has_room(c)]
    return rng.sample(unmoved, k=min(len(unmoved), k))


def _has_room(constant: Constant) -> bool:
    """Whether any move can change the constant: a lever declared with no room (`choice(4, 4)`,
    an int `range(2, 2.5)`) never counts as moved, and screening it first would stall every fresh
    step. One at the edge of its domain still has room: the other way."""
    domains = constant.domain if isinstance(constant.domain, list) else [constant.domain]
    values = constant.value if isinstance(constant.value, tuple) else (constant.value,)
    for d, value in zip(domains, values):
        if d.kind in ("bool", "choice"):
            if any(c != value for c in d.choices):
                return True
        elif d.low is None or d.high is None or d.kind == "fraction":
            return True
        elif (math.floor(d.high) > math.ceil(d.low)) if d.kind == "int" else d.high > d.low:
            return True
    return False


class PerturbConstants:
    """Moves one or a few hyperparameters by one step each, within their domains; or, from a
    parent whose own step paid off, takes that step once more (FOLLOW_P); or takes the opposite of
    a step that made some child worse, from the same starting value (REFLECT_P)."""

    name = "perturb"
    parents_needed = 1
    # The breeder hands it a parent's winning step and a child's losing one (Parent.winning_move, .losing_move).
    follows_winning_steps = True

    def __init__(self, max_changes: int = 2, follow: float = FOLLOW_P, reflect: float = REFLECT_P):
        self.max_changes = max_changes
        self.follow = follow
        self.reflect = reflect

    def propose(self, parents: list[Parent], rng: random.Random) -> Proposal | Refusal:
        parent = parents[0]
        try:
            constants = find_constants(parent.code)
        except (cst.ParserSyntaxError, CommentError) as e:
            return Refusal(self.name, f"cannot read the parent's constants: {e}")
        if not constants:
            return Refusal(self.name, "no module-level constants to perturb")
        changes = {}
        if parent.winning_move and rng.random() < self.follow:
            changes = steps_again(constants, parent.winning_move)
        follows = ", ".join(f"{name} {parent.winning_move[name][0]} -> {parent.winning_move[name][1]}" for name in changes)
        reflects = ""
        if not changes and parent.losing_move and rng.random() < self.reflect:
            changes = opposite_steps(constants, parent.losing_move)
            reflects = ", ".join(f"{name} {parent.losing_move[name][0]} -> {parent.losing_move[name][1]}" for name in changes)
        if not changes:  # nothing to repeat or reflect: a fresh random step
            chosen = least_moved_first(constants, rng.randint(1, self.max_changes), parent.moved, rng)
            for c in chosen:
                new = move(c, rng)
                if new != c.value:
                    changes[c.name] = (c.source, render(new))
        if not changes:
            return Refusal(self.name, "no constant moved (all at the edge of their domain)")
        code = replace_constants(parent.code, {name: new for name, (_, new) in changes.items()})
        hypothesis = ", ".join(f"{name} {old} -> {new}" for name, (old, new) in changes.items())
        details = {"changes": changes}
        if follows:
            hypothesis += f" (the parent's winning step again: {follows})"
            details["follows"] = parent.id
        if reflects:
            hypothesis += f" (the opposite of {parent.loser}'s losing step: {reflects})"
            details["reflects"] = parent.loser
        return checked(Proposal(code, self.name, details, hypothesis), parent.code)
