"""AST crossover: parent A with some named top-level definitions taken from parent B.

A definition is a top-level function, class, or `NAME = ...` assignment. A taken definition
replaces A's definition of the same name in place; any top-level names it needs that A lacks
come along from B, placed just before it. The child must compile.
"""

from __future__ import annotations

import ast
import random

import libcst as cst

from mutators.base import Parent, Proposal, Refusal, checked


def _defined_name(statement: cst.CSTNode) -> str | None:
    if isinstance(statement, (cst.FunctionDef, cst.ClassDef)):
        return statement.name.value
    if isinstance(statement, cst.SimpleStatementLine) and len(statement.body) == 1:
        assign = statement.body[0]
        if isinstance(assign, cst.Assign) and len(assign.targets) == 1 and isinstance(assign.targets[0].target, cst.Name):
            return assign.targets[0].target.value
    return None


def definitions(module: cst.Module) -> dict[str, cst.CSTNode]:
    """Top-level definitions by name (the last one wins, as at run time)."""
    found = {}
    for statement in module.body:
        name = _defined_name(statement)
        if name is not None:
            found[name] = statement
    return found


def _names_used(module: cst.Module, statement: cst.CSTNode) -> set[str]:
    tree = ast.parse(module.code_for_node(statement).strip() + "\n")
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _normalized(module: cst.Module, statement: cst.CSTNode) -> str:
    return ast.dump(ast.parse(module.code_for_node(statement).strip() + "\n"))


class Crossover:
    """Takes one to three differing top-level definitions from the second parent."""

    name = "crossover"
    parents_needed = 2

    def __init__(self, max_taken: int = 3):
        self.max_taken = max_taken

    def propose(self, parents: list[Parent], rng: random.Random) -> Proposal | Refusal:
        a, b = parents
        try:
            module_a, module_b = cst.parse_module(a.code), cst.parse_module(b.code)
        except cst.ParserSyntaxError as e:
            return Refusal(self.name, f"a parent does not parse: {e}")
        defs_a, defs_b = definitions(module_a), definitions(module_b)
        differing = sorted(
            n for n in defs_a.keys() & defs_b.keys()
            if _normalized(module_a, defs_a[n]) != _normalized(module_b, defs_b[n])
        )
        if not differing:
            return Refusal(self.name, "the parents share every top-level definition; nothing to cross")
        # Taking every definition in which they differ gives back the second parent (a duplicate:
        # in the search benchmark, all 5 of one run's crossovers were), so at least one stays A's.
        if len(differing) == 1:
            return Refusal(self.name, f"the parents differ only in {differing[0]}; crossing them gives back the second parent")
        taken = rng.sample(differing, k=rng.randint(1, min(self.max_taken, len(differing) - 1)))

        # Names the taken definitions need from B that A does not define, transitively.
        brought: list[str] = []
        queue = list(taken)
        while queue:
            for used in sorted(_names_used(module_b, defs_b[queue.pop()])):
                if used in defs_b and used not in defs_a and used not in brought:
                    brought.append(used)
                    queue.append(used)

        body, placed = [], set()
        for statement in module_a.body:
            name = _defined_name(statement)
            if name in taken:
                for extra in reversed(brought):  # deepest dependencies first
                    if extra not in placed:
                        body.append(defs_b[extra])
                        placed.add(extra)
                body.append(defs_b[name])
            else:
                body.append(statement)
        code = module_a.with_changes(body=body).code
        details = {"taken": sorted(taken), "brought": brought, "second_parent": b.id}
        hypothesis = f"take {', '.join(sorted(taken))} from {b.id}" + (f" (with {', '.join(brought)})" if brought else "")
        return checked(Proposal(code, self.name, details, hypothesis), a.code)
