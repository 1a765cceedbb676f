"""The one interface every operator implements: parents in, a proposed child or a refusal out.

Operators never run code. A proposal is parsed and compiled before it is offered, and a child
identical to its parent is refused.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Proposal:
    code: str
    operator: str
    details: dict = field(default_factory=dict)
    hypothesis: str = ""


@dataclass
class Refusal:
    operator: str
    reason: str


@dataclass
class Parent:
    """What an operator may know about a parent: its code and validation numbers only."""

    id: str
    code: str
    val_bpb: float | None


class Operator(Protocol):
    name: str
    parents_needed: int

    def propose(self, parents: list[Parent], rng: random.Random) -> Proposal | Refusal: ...
    # Operators with `wants_context = True` receive a third argument, a Context.


def checked(proposal: Proposal, parent_code: str) -> Proposal | Refusal:
    """The gate every proposal passes: it must compile and differ from its parent."""
    try:
        compile(proposal.code, "train.py", "exec")
    except (SyntaxError, ValueError) as e:
        return Refusal(proposal.operator, f"child does not compile: {e}")
    if proposal.code == parent_code:
        return Refusal(proposal.operator, "child is identical to its parent")
    return proposal


@dataclass
class Relative:
    """A strong variant from another island, shown to an LLM with its diff to the parent."""

    id: str
    code: str
    val_bpb: float | None
    island: int


@dataclass
class Failure:
    id: str
    status: str
    reason: str
    log_tail: str
    hypothesis: str


@dataclass
class Idea:
    operator: str
    hypothesis: str
    outcome: str


@dataclass
class Context:
    """What the engine tells operators that want more than the parents. Validation data only."""

    relatives: list[Relative] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    ideas: list[Idea] = field(default_factory=list)
