"""The breeder: makes children in its own threads, so no evaluation slot waits for an LLM.

Proposals run in the breeder's own threads (as many at once as the LLM may take requests), and
each child is recorded as pending the moment it is born: the scheduler takes pending children
oldest first. An operator that raises is a counted refusal. An LLM whose server cannot be
reached is paused and retried with backoff while the other operators go on; only an outage
longer than `mutators.llm.max_outage_minutes` stops the run.
"""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from libcst import ParserSyntaxError

from evo.population import PENDING, normalized_hash
from evo.progress import clock
from evo.recorder import FAILED, IMPROVED, OK, RECENT_OUTCOMES, Recorder
from evo.stats import moving_average
from mutators.base import Context, Failure, Idea, Parent, Refusal, Relative
from mutators.constants import CommentError, find_constants, opposite_steps

# Operator weights follow each operator's recent yield, a bandit with a floor:
#   effective = configured x (YIELD_FLOOR + rate),  rate = (sum of rewards + YIELD_PRIOR) / (n + YIELD_PRIOR)
# over its last RECENT_OUTCOMES outcomes (kept by the recorder, so resume keeps them). Reward 0
# for a refusal, a duplicate or a failed evaluation, 1 for a child evaluated ok, 1 + YIELD_BONUS
# for one better than its parent. The prior starts every operator at a rate of 1 (as if
# evaluated ok), so none is judged on its first few tries; the floor keeps even an operator that
# always fails being tried now and then. An LLM outage is not counted: it pauses the operator.
YIELD_FLOOR = 0.1
YIELD_BONUS = 0.5
YIELD_PRIOR = 2  # pseudo-outcomes at reward 1
REWARDS = {FAILED: 0.0, OK: 1.0, IMPROVED: 1.0 + YIELD_BONUS}


def effective_weights(configured: dict[str, float], recent: dict[str, list[int]]) -> dict[str, float]:
    """Each operator's configured weight scaled by its recent yield (see YIELD_*); never below configured x floor."""
    weights = {}
    for name, weight in configured.items():
        outcomes = recent.get(name, [])[-RECENT_OUTCOMES:]
        rate = (sum(REWARDS[o] for o in outcomes) + YIELD_PRIOR) / (len(outcomes) + YIELD_PRIOR)
        weights[name] = weight * (YIELD_FLOOR + rate)
    return weights


# A losing step is reflected only when it lost by more than this many noise floors. Run 7 of the
# search benchmark reflected losses over 1 sigma: the two that paid big (-0.09, -0.11) had lost
# 0.029 and 0.147 (sigma 0.03), so a bar of 2 sigma would have dropped one of them.
LOSS_NOISE = 1.0

BREED_ATTEMPTS = 20  # proposals one breeding task may try for a new, valid, unseen child
OUTAGE_FIRST_RETRY = 15.0  # seconds before an unreachable LLM is asked again; doubles each time
OUTAGE_MAX_RETRY = 300.0


@dataclass
class Outage:
    since: float  # time.time() of the first failed attempt
    retry_at: float
    wait: float


class Breeder:
    def __init__(self, config, operators: dict, recorder: Recorder, cancel: threading.Event,
                 log: Callable[[str], None]):
        self.config = config
        self.operators = operators
        self.recorder = recorder
        self.population = recorder.population
        self.cancel = cancel
        self.log = log
        self.uses_llm = any(name.startswith("llm") for name in operators)
        self.threads = config.mutators.llm.concurrent_requests if self.uses_llm else 1
        self.seconds_per_child: float | None = None  # moving average of a breeding task that made a child
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="evo-breeder")
        self._breeding: set[Future] = set()
        self.fruitless = 0  # breeding tasks in a row that produced nothing (outages and cancels aside)
        self.outages: dict[str, Outage] = {}
        self._next_island = 0
        self._used_steps: dict[str, set[str]] = {}  # ids whose winning or losing step has been handed out (_handed_out)
        self._parsed_details: dict[str, dict] = {}  # individual id -> its details (_details)
        for operator in operators.values():
            if hasattr(operator, "set_cancel"):  # LLM operators abandon requests in flight on cancel
                operator.set_cancel(cancel)

    # ---- what the scheduler sees ----
    def in_flight(self) -> int:
        return len(self._breeding)

    def futures(self) -> list[Future]:
        return list(self._breeding)

    def top_up(self, more: int) -> None:
        """Start up to `more` breeding tasks, never more in flight than breeder threads."""
        for _ in range(min(more, self.threads - len(self._breeding))):
            if self.cancel.is_set():
                return
            self._breeding.add(self._pool.submit(self.breed))

    def collect(self) -> None:
        for future in [f for f in self._breeding if f.done()]:
            self._breeding.discard(future)
            child, waiting = future.result()
            if child is not None:
                self.fruitless = 0
            elif not waiting and not self.cancel.is_set():
                self.fruitless += 1

    def close(self) -> None:
        self.cancel.set()
        self._pool.shutdown(wait=True)

    def note(self) -> str:
        """A word for the status line while an operator's server is down."""
        now = time.time()
        return "; ".join(f"{name}: server unreachable for {clock(now - o.since)}, next try in {clock(max(0, o.retry_at - now))}"
                         for name, o in sorted(self.outages.items()))

    def outage_reason(self) -> str | None:
        minutes = self.config.mutators.llm.max_outage_minutes
        limit = minutes * 60
        for name, o in sorted(self.outages.items()):
            if time.time() - o.since > limit:
                return (f"the LLM server of operator {name} ({self.config.mutators.llm.base_url}) has been unreachable "
                        f"for {clock(time.time() - o.since)}, longer than mutators.llm.max_outage_minutes "
                        f"({minutes:g}); start it and `evo resume`")
        return None

    # ---- breeding ----
    def _choose_operator(self):
        """A weighted draw among the operators still active and not waiting out an outage."""
        now = time.time()
        names = [n for n, w in self.config.operators.items()
                 if w > 0 and n in self.operators and getattr(self.operators[n], "active", True)
                 and not (n in self.outages and self.outages[n].retry_at > now)]
        if not names:
            return None
        effective = effective_weights(self.config.operators, self.recorder.counters.recent)
        weights = [effective[n] for n in names]
        return self.operators[self.recorder.rng.choices(names, weights)[0]]

    def breed(self):
        """(a new child, False) or (None, waiting): waiting is True when every operator is paused by an outage."""
        started = time.monotonic()
        child, waiting = self._breed()
        if child is not None:
            self.seconds_per_child = moving_average(self.seconds_per_child, time.monotonic() - started)
        return child, waiting

    def _breed(self):
        for _ in range(BREED_ATTEMPTS):
            if self.cancel.is_set():
                return None, False
            with self.recorder.lock:
                island = self._next_island
                self._next_island = (island + 1) % self.config.population.islands
                operator = self._choose_operator()
                if operator is None:
                    waiting = bool(self.outages)
            if operator is None:
                if waiting:
                    self.cancel.wait(1.0)  # every operator waits out an outage: look again in a second
                return None, waiting
            with self.recorder.lock:
                chosen = self._parents(operator.parents_needed, island)
                if chosen is None:
                    return None, False
                if len(chosen) < operator.parents_needed:  # no second code to cross with yet
                    self.recorder.refused(operator.name, "no evaluated variant with different code to cross with yet")
                    continue
                parents = [self._parent(p, operator) for p in chosen]
                context = self.context_for(parents[0].id, island) if getattr(operator, "wants_context", False) else None
                op_rng = random.Random(self.recorder.rng.getrandbits(64))  # operators never share the engine's RNG
            proposal = self._propose(operator, parents, op_rng, context)
            if isinstance(proposal, Refusal):
                if proposal.cancelled or self.cancel.is_set():
                    return None, False
                self.recorder.refused(operator.name, proposal.reason)
                if proposal.outage:  # the server's fault, not the operator's: paused, not down-weighted
                    self._outage(operator.name, proposal.reason)
                else:
                    self.recorder.outcome(operator.name, FAILED)
                continue
            self._reachable(operator.name)
            self.recorder.proposed(operator.name)
            with self.recorder.lock:
                if self.population.known(normalized_hash(proposal.code)):
                    self.recorder.duplicate()
                    self.recorder.outcome(operator.name, FAILED)
                    self.feedback(operator.name, proposal.details, None, evaluated=False)
                    continue
                if self.cancel.is_set():
                    self.feedback(operator.name, proposal.details, None, evaluated=False)
                    return None, False
                child = self.recorder.new_individual(proposal.code, proposal.operator, [p.id for p in parents], island,
                                                     proposal.details, proposal.hypothesis)
                return child, False
        return None, False

    def _parents(self, needed: int, island: int):
        """The first parent by tournament on the island; any further one by `Population.mate`:
        different code, from another island when one has members. None: nothing evaluated yet;
        fewer than needed: no second code exists yet. Caller holds the lock."""
        k, rng = self.config.population.tournament_size, self.recorder.rng
        first = self.population.tournament(island, k, rng)
        if first is None:
            return None
        chosen = [first]
        while len(chosen) < needed:
            mate = self.population.mate(first, island, k, rng)
            if mate is None:
                break
            chosen.append(mate)
        return chosen

    def _parent(self, individual, operator) -> Parent:
        """What the operator sees of a parent. An operator that reads the run's memory
        (`follows_winning_steps`: perturb) also gets the parent's winning step, or else a losing step
        it can reflect (each handed out once: see _winning_move, _losing_move), and how often the
        run has moved each constant. Caller holds the lock."""
        parent = Parent(individual.id, self.recorder.code_of(individual.id), self.population.score(individual))
        if getattr(operator, "follows_winning_steps", False):
            parent.winning_move = self._winning_move(individual)
            if not parent.winning_move and getattr(operator, "reflect", 0) > 0:
                parent.loser, parent.losing_move = self._losing_move(parent.code)
            parent.moved = self._moved()
        return parent

    def _details(self, individual) -> dict:
        """An individual's details, parsed once: they are written at birth and never change."""
        details = self._parsed_details.get(individual.id)
        if details is None:
            details = self._parsed_details[individual.id] = json.loads(individual.details or "{}")
        return details

    def _moved(self) -> dict[str, int]:
        """How many of the run's children moved each constant (the changes perturb and Optuna record),
        counted whether or not they were evaluated: a step tried is a step tried. Caller holds the lock."""
        counts: dict[str, int] = {}
        for child in self.population.individuals.values():
            changes = self._details(child).get("changes")
            if isinstance(changes, dict):
                for name in changes:
                    counts[name] = counts.get(name, 0) + 1
        return counts

    def _noise(self) -> float:
        return self.recorder.guard.sigma() or 0.0  # a difference inside the seed's own spread is no direction

    def _handed_out(self, key: str) -> set[str]:
        """Ids whose step children have used (details[key]: "follows" or "reflects"), read from the
        population once per process, so a resumed run goes on where it stopped."""
        if key not in self._used_steps:
            self._used_steps[key] = set()
            for child in self.population.individuals.values():
                used = self._details(child).get(key)
                if used:
                    self._used_steps[key].add(used)
        return self._used_steps[key]

    def _losing_move(self, code: str) -> tuple[str, dict]:
        """(id, constant changes) of the run's child that its step made worse than its own parent by
        the most (those that moved one constant first: the loss is theirs alone), when by more than
        LOSS_NOISE x the noise floor sigma (selection scores), among those whose step this parent
        `code` can take the other way (it holds the starting value of a constant the step moved, and
        that constant has another way: DEPTH 4 -> 8 lost anywhere, so any parent at DEPTH 4 may try
        4 -> 2); ("", {}) when none. Each loser is offered once.
        Children that repeated or reflected a step are left out: their opposite is code the run
        already has. Caller holds the lock."""
        reflected = self._handed_out("reflects")
        try:
            constants = find_constants(code)
        except (ParserSyntaxError, CommentError):  # perturb will refuse this parent and say why
            return "", {}
        worst, rank, bar = ("", {}), (False, 0.0), LOSS_NOISE * self._noise()
        for child in self.population.individuals.values():
            if not child.parents or not child.evaluated_ok or child.id in reflected:
                continue
            details = self._details(child)
            changes = details.get("changes")
            if "follows" in details or "reflects" in details or not isinstance(changes, dict):
                continue
            parent = self.population.individuals.get(child.parents[0])
            theirs = self.population.score(child)
            base = self.population.score(parent) if parent is not None else None
            if theirs is None or base is None or theirs - base <= bar:
                continue
            # A one-constant loss says which constant hurt; a two-constant one may reverse the
            # step that helped along with the one that hurt, so clean losers come first.
            candidate = (len(changes) == 1, theirs - base)
            if candidate > rank and opposite_steps(constants, changes):
                worst, rank = (child.id, changes), candidate
        if worst[0]:
            reflected.add(worst[0])
        return worst

    def _winning_move(self, individual) -> dict:
        """The constant changes that made `individual` from its first parent, when it scores better
        than that parent by more than the guard's noise floor sigma (by selection score, on the evaluation
        seed; no floor before it is measured or without the guard); {} otherwise, and once it has been handed
        out: each winning step is offered once, whether its child is then evaluated, refused or a
        duplicate. Read from the population (a child with "follows" marks a step used), so a
        resumed run goes on where it stopped. Caller holds the lock."""
        followed = self._handed_out("follows")
        if individual.id in followed:
            return {}
        parent = self.population.individuals.get(individual.parents[0]) if individual.parents else None
        if parent is None or not individual.evaluated_ok:
            return {}
        mine, theirs = self.population.score(individual), self.population.score(parent)
        if mine is None or theirs is None or theirs - mine <= self._noise():
            return {}
        changes = self._details(individual).get("changes")
        if not isinstance(changes, dict) or not changes:
            return {}
        followed.add(individual.id)
        return changes

    def _propose(self, operator, parents, rng, context):
        """The operator's proposal; an exception in an operator is a refusal, never the end of the run."""
        try:
            if context is not None:
                return operator.propose(parents, rng, context)
            return operator.propose(parents, rng)
        except Exception as e:  # noqa: BLE001 - any operator bug becomes a counted refusal
            return Refusal(operator.name, f"operator raised {type(e).__name__}: {str(e)[:200]}")

    def _outage(self, name: str, reason: str) -> None:
        with self.recorder.lock:
            now = time.time()
            o = self.outages.get(name)
            if o is None:
                o = self.outages[name] = Outage(since=now, retry_at=now, wait=OUTAGE_FIRST_RETRY / 2)
                self.log(f"{name}: LLM server unreachable ({reason}); other operators go on, it is retried with backoff")
            o.wait = min(OUTAGE_MAX_RETRY, o.wait * 2)
            o.retry_at = now + o.wait

    def _reachable(self, name: str) -> None:
        with self.recorder.lock:
            o = self.outages.pop(name, None)
        if o is not None:
            self.log(f"{name}: LLM server reachable again after {clock(time.time() - o.since)}")

    def feedback(self, operator_name: str, details: dict, val_bpb: float | None, evaluated: bool) -> None:
        """Operators that learn (Optuna) hear how their children did."""
        operator = self.operators.get(operator_name)
        if operator is not None and hasattr(operator, "feedback"):
            operator.feedback(details, val_bpb, evaluated)

    def context_for(self, parent_id: str, island: int) -> Context:
        """What an LLM may see besides the parent: validation numbers and log tails, never held-out."""
        llm = self.config.mutators.llm
        store = self.recorder.store
        others = [i for i in self.population.ranked() if i.island != island and i.id != parent_id][: llm.relatives]
        relatives = [Relative(i.id, self.recorder.code_of(i.id), i.val_bpb, i.island) for i in others]
        finished = [i for i in self.population.individuals.values() if i.status not in (PENDING, "ok")]
        finished.sort(key=lambda i: i.finished_at or 0, reverse=True)
        failures = []
        for i in finished[: llm.failures]:
            result = store.variant_dir(i.id) / "result.json"
            try:
                tail = json.loads(result.read_text()).get("log_tail", "") if result.is_file() else ""
            except (OSError, ValueError):
                tail = ""
            failures.append(Failure(i.id, i.status, i.reason, tail[-1500:], i.hypothesis))
        ideas = []
        for i in sorted(self.population.individuals.values(), key=lambda i: i.birth, reverse=True):
            if i.operator == "seed" or i.status == PENDING or not i.hypothesis:
                continue
            parent = self.population.individuals.get(i.parents[0]) if i.parents else None
            base = self.population.score(parent) if parent is not None else None
            if i.evaluated_ok and base is not None:
                outcome = f"val_bpb {i.val_bpb:.4f} vs parent {base:.4f}"
            else:
                outcome = i.status if i.status != "ok" else f"val_bpb {i.val_bpb}"
            ideas.append(Idea(i.operator, i.hypothesis, outcome))
            if len(ideas) >= llm.ideas:
                break
        return Context(relatives, failures, ideas)
