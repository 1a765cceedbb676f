"""The one interface every operator implements: parents in, a proposed child or a refusal out.

Operators never run code. A proposal is parsed and compiled before it is offered, and a child
identical to its parent is refused.

A refusal says why. Two kinds are not the proposal's fault, and the engine treats them apart:
`outage` (the operator's server could not be reached, or timed out or answered 429/5xx on
every attempt: back off and try that operator again later) and `cancelled` (the run is
stopping: not a refusal at all). Operators that may block for long (the LLM ones) take the
engine's stop event through `set_cancel(event)`; see mutators/llm.py.
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
    outage: bool = False  # the server was unreachable or failing on every attempt; retry later
    cancelled: bool = False  # the cancel event was set; the run is stopping


@dataclass
class Parent:
    """What an operator may know about a parent: its code and validation numbers only."""

    id: str
    code: str
    val_bpb: float | None
    # The constant changes (name -> [old source, new source]) that made this parent from its own
    # parent, when it scored better than that parent; empty otherwise. Perturb may repeat them.
    winning_move: dict = field(default_factory=dict)
    # The constant changes that made one of the run's children clearly worse than its own parent,
    # starting from a value this parent holds, and that child's id; empty otherwise. Perturb may
    # take the opposite step from here.
    losing_move: dict = field(default_factory=dict)
    loser: str = ""
    # How many of the run's children so far moved each constant (by name), whatever their parent
    # or operator; None when the caller keeps no such memory ({} is a run that has moved nothing
    # yet). Perturb moves the least moved first, and a lever never moved before anything else.
    moved: dict | None = None


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
