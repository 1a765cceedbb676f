"""Module-level hyperparameters found and perturbed with libcst, leaving every other byte alone.

A hyperparameter is a top-level `NAME = value` with an UPPER_CASE name and a value that is a
number, a boolean, a tuple of numbers or a simple arithmetic expression such as `2**19`.
A trailing `# evo: fixed` comment takes a constant out of the search.
"""

from __future__ import annotations

import ast
import math
import random
from dataclasses import dataclass

import libcst as cst

from mutators.base import Parent, Proposal, Refusal, checked


@dataclass
class Constant:
    name: str
    value: object  # bool, int, float, or tuple of numbers
    source: str  # the value's code as written


def _evaluate(code: str):
    """The value of a constant expression made of literals and arithmetic, else None."""
    try:
        tree = ast.parse(code, mode="eval")
    except SyntaxError:
        return None
    allowed = (ast.Expression, ast.Constant, ast.BinOp, ast.UnaryOp, ast.Tuple, ast.Load,
               ast.operator, ast.unaryop)
    if not all(isinstance(n, allowed) for n in ast.walk(tree)):
        return None
    try:
        value = eval(compile(tree, "<constant>", "eval"), {"__builtins__": {}})
    except Exception:
        return None
    if isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, tuple) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return value
    return None


FIXED_MARK = "evo: fixed"  # a trailing comment that takes a constant out of the search


def _assignments(module: cst.Module):
    for statement in module.body:
        if not isinstance(statement, cst.SimpleStatementLine) or len(statement.body) != 1:
            continue
        comment = statement.trailing_whitespace.comment
        if comment is not None and FIXED_MARK in comment.value:
            continue
        assign = statement.body[0]
        if isinstance(assign, cst.Assign) and len(assign.targets) == 1:
            target = assign.targets[0].target
            if isinstance(target, cst.Name) and target.value.isupper():
                yield target.value, assign


def find_constants(code: str) -> list[Constant]:
    module = cst.parse_module(code)
    found = []
    for name, assign in _assignments(module):
        source = module.code_for_node(assign.value)
        value = _evaluate(source)
        if value is not None:
            found.append(Constant(name, value, source))
    return found


def _is_power_of_two(n: int) -> bool:
    return n >= 2 and n & (n - 1) == 0


def move(value, rng: random.Random):
    """One step away from value, shaped by what kind of number it is."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        if _is_power_of_two(value):
            return value * 2 if rng.random() < 0.5 else value // 2
        step = max(1, round(abs(value) * 0.25))
        new = value + rng.choice((-step, step))
        return new if value <= 0 or new > 0 else value + step
    if isinstance(value, float):
        if value == 0.0 or not math.isfinite(value):
            return None
        factor = rng.choice((1.25, 1.5, 2.0))
        return value * factor if rng.random() < 0.5 else value / factor
    if isinstance(value, tuple):
        i = rng.randrange(len(value))
        new = move(value[i], rng)
        return None if new is None else value[:i] + (new,) + value[i + 1 :]
    return None


def render(value) -> str:
    if isinstance(value, bool) or isinstance(value, int):
        if isinstance(value, int) and not isinstance(value, bool) and _is_power_of_two(value) and value >= 1024:
            return f"2**{value.bit_length() - 1}"
        return repr(value)
    if isinstance(value, float):
        text = f"{value:.4g}"
        return text if any(ch in text for ch in ".en") else text + ".0"  # stays a float
    if isinstance(value, tuple):
        return "(" + ", ".join(render(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    raise TypeError(value)


def replace_constants(code: str, new_values: dict[str, str]) -> str:
    """The same code with the given constants' values replaced by new source text."""

    class Replace(cst.CSTTransformer):
        def leave_Module(self, original, updated):
            body = []
            for statement in updated.body:
                if isinstance(statement, cst.SimpleStatementLine) and len(statement.body) == 1:
                    assign = statement.body[0]
                    if isinstance(assign, cst.Assign) and len(assign.targets) == 1:
                        target = assign.targets[0].target
                        if isinstance(target, cst.Name) and target.value in new_values:
                            value = cst.parse_expression(new_values[target.value])
                            statement = statement.with_changes(body=[assign.with_changes(value=value)])
                body.append(statement)
            return updated.with_changes(body=body)

    return cst.parse_module(code).visit(Replace()).code


class PerturbConstants:
    """Moves one or a few hyperparameters by one step each."""

    name = "perturb"
    parents_needed = 1

    def __init__(self, max_changes: int = 2):
        self.max_changes = max_changes

    def propose(self, parents: list[Parent], rng: random.Random) -> Proposal | Refusal:
        parent = parents[0]
        try:
            constants = find_constants(parent.code)
        except cst.ParserSyntaxError as e:
            return Refusal(self.name, f"parent does not parse: {e}")
        movable = [c for c in constants if move(c.value, random.Random(0)) is not None]
        if not movable:
            return Refusal(self.name, "no module-level constants to perturb")
        chosen = rng.sample(movable, k=min(len(movable), rng.randint(1, self.max_changes)))
        changes = {}
        for c in chosen:
            new = move(c.value, rng)
            if new is not None and new != c.value:
                changes[c.name] = (c.source, render(new))
        if not changes:
            return Refusal(self.name, "no constant moved")
        code = replace_constants(parent.code, {name: new for name, (_, new) in changes.items()})
        hypothesis = ", ".join(f"{name} {old} -> {new}" for name, (old, new) in changes.items())
        return checked(Proposal(code, self.name, {"changes": changes}, hypothesis), parent.code)
