"""Individuals, islands, and how parents are chosen.

Each island keeps as members its best `size` evaluated individuals (truncation replacement, so
the best are never lost: elitism is built in), plus the migrants it received. Parents come from
a tournament among an island's members; failed variants are never members.

"Best" is by selection score, one number per individual (`score`), on the scale of the run's
evaluation seed that every first draw uses: the guard's paired estimate once it has re-runs (set
against the seed variant's runs seed by seed), else its first draw. A variant the guard re-ran therefore
competes on what its re-runs showed, not on the lucky draw that made it a candidate; one whose
re-runs mostly failed ranks after every variant that did not (`rerun_failed`). The guard feeds
both through `attach_guard`; without a guard every score is a first draw.

An individual is a small record: its code lives in the run directory (RunStore.code), so a
population of many thousands costs a few hundred bytes each in memory, not the size of its code.
"""

from __future__ import annotations

import ast
import hashlib
import random
from dataclasses import asdict, dataclass, field, fields

PENDING = "pending"  # bred and recorded, evaluation not finished (re-queued on resume)


@dataclass(slots=True)  # many thousands of these stay in memory: no per-object dict
class Individual:
    id: str
    birth: int
    island: int
    code_hash: str  # of the normalized code; the code itself is in variants/<id>/train.py
    operator: str
    parents: list[str] = field(default_factory=list)
    details: str = "{}"  # JSON from the operator
    hypothesis: str = ""
    status: str = PENDING
    reason: str = ""
    val_bpb: float | None = None
    metrics: str = "{}"  # JSON, as evaluate_bpb wrote it
    eval_seed: int = 0
    wall_seconds: float | None = None
    peak_memory_mb: float | None = None
    device: str = ""
    llm_tokens: int = 0
    verdict: str = ""  # the guard's word: champion, promoted, not significant, held-out disagrees, ...
    run_token: str = ""  # identifies the evaluation's processes while it runs
    created_at: float = 0.0
    finished_at: float | None = None
    train_seconds: float | None = None  # the runner's clock, start to hand-over (failed runs too)
    steps: int | None = None  # training steps as the variant's own summary printed them: shown, never trusted

    @property
    def evaluated_ok(self) -> bool:
        return self.status == "ok" and self.val_bpb is not None

    def to_row(self) -> dict:
        return asdict(self)


INDIVIDUAL_FIELDS = [f.name for f in fields(Individual)]


def normalized_hash(code: str) -> str:
    """Hash of the code with comments, whitespace and formatting ignored."""
    try:
        canonical = ast.unparse(ast.parse(code))
    except SyntaxError:
        canonical = code
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class Population:
    def __init__(self, islands: int, size: int):
        self.n_islands = islands
        self.size = size
        self.individuals: dict[str, Individual] = {}
        self.by_hash: dict[str, str] = {}
        self.migrants: list[list[str]] = [[] for _ in range(islands)]
        self._paired_estimate = lambda individual_id: None  # fed by the guard (attach_guard)
        self._rerun_failed = lambda individual_id: False
        self._estimate_label = lambda individual_id: "paired estimate"

    def attach_guard(self, guard) -> None:
        """Scores come from the guard's records from now on (paired estimates where they exist)."""
        self._paired_estimate, self._rerun_failed = guard.paired_estimate, guard.rerun_failed
        self._estimate_label = guard.estimate_label

    # ---- the one number selection uses ----
    def score(self, individual: Individual) -> float | None:
        """One scale for every variant, the run's evaluation seed, which every first draw uses: the
        guard's paired estimate once it has re-runs, set against the seed variant's seed by seed (a
        refused lucky draw drops to where its re-runs put it); for the seed variant, the mean of its
        two draws on that seed once its anchor run is in; else the first draw. A re-run mean is not
        on this scale: it averages other seeds."""
        estimate = self._paired_estimate(individual.id)
        return estimate if estimate is not None else individual.val_bpb

    def score_label(self, individual: Individual) -> str:
        """Which number `score` is, in words for a status line."""
        return self._estimate_label(individual.id) if self._paired_estimate(individual.id) is not None else "first draw"

    def rank_key(self, individual: Individual) -> tuple:
        """Lower is better: variants whose guard re-runs failed last, then by score, then oldest."""
        return (self._rerun_failed(individual.id), self.score(individual), individual.birth)

    def add(self, individual: Individual) -> None:
        self.individuals[individual.id] = individual
        self.by_hash.setdefault(individual.code_hash, individual.id)

    def known(self, code_hash: str) -> bool:
        return code_hash in self.by_hash

    def members(self, island: int) -> list[Individual]:
        """The island's best evaluated individuals, best first."""
        ids = {i.id for i in self._all() if i.island == island} | set(self.migrants[island])
        ok = [self.individuals[i] for i in ids if self.individuals[i].evaluated_ok]
        ok.sort(key=self.rank_key)
        return ok[: self.size]

    def tournament(self, island: int, k: int, rng: random.Random) -> Individual | None:
        members = self.members(island)
        if not members:
            members = self.ranked()[: self.size]  # an empty island borrows from the whole run
        if not members:
            return None
        drawn = rng.sample(members, k=min(k, len(members)))
        return min(drawn, key=self.rank_key)

    def mate(self, first: Individual, island: int, k: int, rng: random.Random) -> Individual | None:
        """A second parent for a crossover: code different from `first`'s, from another island when
        one has such members (so the two lines have drifted apart), else from `first`'s island,
        else from the whole run. None when no other code has been evaluated yet."""
        def differs(pool):
            return [i for i in pool if i.code_hash != first.code_hash]

        others = [j for j in range(self.n_islands) if j != island and differs(self.members(j))]
        if others:
            pool = differs(self.members(rng.choice(others)))
        else:
            pool = differs(self.members(island)) or differs(self.ranked())[: self.size]
        if not pool:
            return None
        drawn = rng.sample(pool, k=min(k, len(pool)))
        return min(drawn, key=self.rank_key)

    def ranked(self) -> list[Individual]:
        ok = [i for i in self._all() if i.evaluated_ok]
        return sorted(ok, key=self.rank_key)

    def best(self) -> Individual | None:
        ranked = self.ranked()
        return ranked[0] if ranked else None

    def best_first_draw(self) -> Individual | None:
        """The lowest single evaluation (oldest among equals): maybe a lucky draw the guard refused."""
        ok = [i for i in self._all() if i.evaluated_ok]
        return min(ok, key=lambda i: (i.val_bpb, i.birth)) if ok else None

    def migrate(self, count: int) -> list[tuple[str, int]]:
        """Ring migration: each island's best `count` members join the next island."""
        if self.n_islands < 2:
            return []
        moves = []
        for island in range(self.n_islands):
            target = (island + 1) % self.n_islands
            for member in self.members(island)[:count]:
                if member.id not in self.migrants[target] and member.island != target:
                    self.migrants[target].append(member.id)
                    moves.append((member.id, target))
        return moves

    def pending(self) -> list[Individual]:
        return [i for i in self._all() if i.status == PENDING]

    def _all(self) -> list[Individual]:
        """A snapshot of the individuals: breeder threads may add one while the scheduler reads
        (list() of a dict's values is one step under the GIL; iterating the live dict is not)."""
        return list(self.individuals.values())

    def lineage(self, individual_id: str) -> list[Individual]:
        """The individual, its first parent, that parent's first parent, ... back to the seed."""
        chain, current = [], self.individuals.get(individual_id)
        while current is not None:
            chain.append(current)
            current = self.individuals.get(current.parents[0]) if current.parents else None
        return chain
