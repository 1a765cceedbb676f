"""The guard: who may become champion, and what its score honestly is.

Comparisons are paired by seed (common random numbers). The seed a run trains with decides its
initial weights and the order of its batches. On the CPU seed, the same code's runs on one seed
differ by 0.008 val_bpb (sd), the means of different seeds by 0.018; different code shares part
of a seed's effect, less the more the code differs (BENCHMARKS.md, "Pairing by seed"). So every
first draw uses the run's evaluation seed, and guard run i of any variant uses seed
GUARD_SEEDS + i: a candidate meets the champion on the very seeds the champion ran, and their
difference on each seed is free of the part of the noise they share.

- Noise floor: the seed is re-run k times on the guard's seeds; their spread is sigma.
- The scale's anchor: every first draw is set against the seed variant's standing on the
  evaluation seed. One draw of it is not steady: on the CPU seed the same code on the same seed
  moves 0.008 to 0.013 val_bpb (sd) between draws (how many steps fit the budget), and a lucky anchor
  makes every child look worse than the seed. So the seed variant runs once more on the
  evaluation seed (`anchor`), and its standing is the mean of the two draws. It was not selected,
  so re-running it on that seed repeats no lucky draw.
- Candidates: a variant whose first val_bpb beats the champion's standing on the evaluation seed
  (the seed variant's mean of two draws; a promoted champion's, where its re-runs placed it) by
  more than max(min_delta, z * sigma) is re-run n times on the guard's seeds, held-out split scored.
- Promotion: a one-sided paired t-test of its re-runs against the champion's, seed by seed, gives
  p < alpha, the mean gain is at least min_delta, and held-out agrees on the same seeds. (Welch's
  test where fewer than two seeds are shared: a run resumed from before pairing, failed re-runs.)
- Reported scores are re-run means; the first (selected, so lucky) draw is shown as a gap.
- Fresh-seed check: the shared seeds are reused for every decision, so selection can come to fit
  them, and held-out cannot tell (val and held-out score the same trained model). So each new
  champion and the one before also run on audit_runs seeds that no decision ever uses; the
  status reports, per promotion, the gain those seeds show next to the gain the re-runs claimed.
  It decides nothing: it says whether to believe the decisions.

Every guard run is a job for the same workers as the children. The guard owns its runs: queued,
in flight (`running`), and back in the queue when one is cancelled or its machine is lost; all
of them are in the checkpoint, so resume finishes every verdict.
Held-out numbers live only here: never in an individual's metrics or a prompt. They do veto
promotions, so selection does touch them: every such decision is counted (`heldout_consulted`),
and the count is shown beside every held-out number. A held-out split consulted often slowly
becomes a second validation split (Dwork et al., "The reusable holdout", 2015).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

from evo.stats import mean_std, paired_less, welch_less

NOISE, RERUN, TRANSFER, AUDIT, ANCHOR = "noise", "rerun", "transfer", "audit", "anchor"
AUDIT_SEEDS = 2000  # promotion p's fresh-seed checks use AUDIT_SEEDS + audit_runs * (p - 1) + j, nothing else does
GUARD_SEEDS = 1000  # guard run i of every variant uses seed GUARD_SEEDS + i, skipping the evaluation seed


@dataclass
class GuardRun:
    individual: str
    seed: int
    kind: str  # noise (the seed's floor), anchor (the seed on the evaluation seed), rerun (a candidate), audit, transfer
    budget_multiplier: float = 1.0
    token: str = ""  # run token while it runs: resume kills leftovers by it

    @property
    def key(self) -> str:
        return f"{self.kind}-{self.seed}"


@dataclass
class Sample:
    seed: int
    status: str
    val_bpb: float | None = None
    heldout_bpb: float | None = None
    # What results.tsv shows besides the scores (absent in checkpoints from before it existed).
    kind: str = ""
    train_seconds: float | None = None
    steps: int | None = None
    finished_at: float | None = None
    reason: str = ""


@dataclass
class Record:
    """Everything the guard knows about one individual's re-runs and verdict."""

    id: str
    first_val: float | None
    samples: list[Sample] = field(default_factory=list)
    transfer: list[Sample] = field(default_factory=list)
    audit: list[Sample] = field(default_factory=list)  # fresh-seed checks (see the module's docstring)
    anchor: list[Sample] = field(default_factory=list)  # the seed variant's second draw on the evaluation seed
    expected: int = 0
    verdict: str = ""  # "", "champion", "promoted", "not significant", "held-out disagrees", ...
    p_value: float | None = None
    against: str = ""  # the champion its re-runs were paired with, seed by seed ("" if never paired)

    def ok(self, which: str = "samples") -> list[Sample]:
        return [s for s in getattr(self, which) if s.status == "ok" and s.val_bpb is not None and s.heldout_bpb is not None]

    def stats(self) -> dict | None:
        ok = self.ok()
        if not ok:
            return None
        val_mean, val_std = mean_std([s.val_bpb for s in ok])
        held_mean, held_std = mean_std([s.heldout_bpb for s in ok])
        return {"val_mean": val_mean, "val_std": val_std, "held_mean": held_mean, "held_std": held_std,
                "n": len(ok), "p_value": self.p_value, "first_val": self.first_val,
                "first_draw_gap": None if self.first_val is None else self.first_val - val_mean}


class Guard:
    def __init__(self, settings, log=print, evaluation_seed: int = 0):
        self.s = settings
        self.log = log
        # Every first draw's seed. No guard run uses it but the seed variant's anchor: a re-run
        # of a candidate on it would repeat the very draw that made it a candidate (same seed, same
        # luck, bar timing); the seed variant was not selected.
        self.evaluation_seed = evaluation_seed
        self.records: dict[str, Record] = {}
        self.queue: list[GuardRun] = []
        self.running: list[GuardRun] = []
        self.champions: list[str] = []  # ids, oldest first; the last is the champion
        self.deferred: list[tuple[str, float]] = []  # candidates seen before the floor was known
        self.heldout_consulted = 0  # promotion decisions that looked at held-out numbers

    # ---- state ----
    def to_state(self) -> dict:
        return {
            "records": {k: asdict(r) for k, r in self.records.items()},
            "queue": [asdict(j) for j in self.running + self.queue],  # in flight goes back to the queue
            "champions": self.champions, "deferred": self.deferred,
            "heldout_consulted": self.heldout_consulted,
        }

    def restore(self, state: dict) -> None:
        self.records = {}
        for key, r in state["records"].items():
            r = dict(r)
            r["samples"] = [Sample(**s) for s in r["samples"]]
            r["transfer"] = [Sample(**s) for s in r["transfer"]]
            r["audit"] = [Sample(**s) for s in r.get("audit", [])]  # checkpoints from before the check: none
            r["anchor"] = [Sample(**s) for s in r.get("anchor", [])]  # ... and from before the anchor
            self.records[key] = Record(**r)
        self.queue = [GuardRun(**j) for j in state["queue"]]
        self.running = []
        self.champions = state["champions"]
        self.deferred = [tuple(d) for d in state["deferred"]]
        self.heldout_consulted = state.get("heldout_consulted", 0)  # runs from before it was counted: 0

    # ---- decisions ----
    @property
    def champion(self) -> Record | None:
        return self.records[self.champions[-1]] if self.champions else None

    def measured_sigma(self) -> float | None:
        """The spread of one variant's val_bpb across the guard's seeds, as measured (may be 0): the
        seed variant's noise runs, pooled by degrees of freedom with every re-run variant's re-runs,
        which measure the same spread. A few runs can agree by luck (4 noise runs once fell within
        0.004 where 0.02 is usual, and nearly every child became a candidate); each re-run set
        corrects that. None until the seed variant has two runs."""
        seed = self.records.get(self.champions[0]) if self.champions else None
        if seed is None or len(seed.ok()) < 2:
            return None
        runs = self._spread_runs()
        squares = sum(mean_std(values)[1] ** 2 * (len(values) - 1) for values in runs)
        return math.sqrt(squares / sum(len(values) - 1 for values in runs))

    def sigma_sources(self) -> int:
        """How many variants' runs the measured sigma pools, the seed variant's included."""
        return len(self._spread_runs())

    def _spread_runs(self) -> list[list[float]]:
        """Each variant's val_bpb on the guard's seeds, where it has two or more: what sigma pools."""
        runs = [[s.val_bpb for s in record.ok()] for record in self.records.values()]
        return [values for values in runs if len(values) >= 2]

    def sigma(self) -> float | None:
        """The noise floor the guard decides with: never below min_sigma, so a floor of 0 (identical
        noise runs) cannot let every difference pass as significant."""
        measured = self.measured_sigma()
        return None if measured is None else max(measured, self.s.min_sigma)

    def heldout_note(self) -> str:
        """Said beside every held-out number: how often selection has already looked at it."""
        n = self.heldout_consulted
        return f"(held-out consulted for {n} promotion decision{'s' * (n != 1)})"

    def _seed_jobs(self, individual_id: str, kind: str, count: int, multiplier: float = 1.0,
                   first: list[int] | None = None) -> None:
        """count runs on `first` (seeds to pair with), then on the guard's seeds in order: the same
        seeds for every variant, so comparisons pair by seed."""
        seeds, seed = list(first or [])[:count], GUARD_SEEDS
        while len(seeds) < count:
            if seed != self.evaluation_seed and seed not in seeds:
                seeds.append(seed)
            seed += 1
        self.queue.extend(GuardRun(individual_id, seed, kind, multiplier) for seed in seeds)

    def start(self, seed_id: str, first_val: float | None) -> None:
        """The seed is the first champion: its anchor run steadies the scale, its k noise runs measure sigma."""
        if not self.s.enabled or seed_id in self.records:
            return
        self.records[seed_id] = Record(seed_id, first_val, expected=self.s.noise_runs, verdict="champion")
        self.champions.append(seed_id)
        if self.s.anchor and first_val is not None:
            self.queue.append(GuardRun(seed_id, self.evaluation_seed, ANCHOR))
        self._seed_jobs(seed_id, NOISE, self.s.noise_runs)

    def consider(self, individual_id: str, val_bpb: float) -> bool:
        """Queue re-runs for a variant whose first draw beats the champion's, on the same evaluation
        seed, by more than the noise allows."""
        if not self.s.enabled or individual_id in self.records or self.champion is None:
            return False
        champion, sigma = self.champion.stats(), self.sigma()
        if champion is None or sigma is None or len(self.champion.samples) < self.champion.expected or self._anchoring():
            self.deferred.append((individual_id, val_bpb))  # decided once the floor and the anchor are measured
            return False
        margin = max(self.s.min_delta, self.s.z * sigma)
        bar = self.on_evaluation_seed(self.champion.id)
        bar = champion["val_mean"] if bar is None else bar  # a checkpoint without the champion's first draw
        if val_bpb >= bar - margin:
            return False
        self.records[individual_id] = Record(individual_id, val_bpb, expected=self.s.reruns)
        # First the seeds the champion ran ok, so a champion run that failed costs no unpaired re-run.
        self._seed_jobs(individual_id, RERUN, self.s.reruns, first=sorted(s.seed for s in self.champion.ok()))
        self.log(f"guard: {individual_id} ({val_bpb:.4f}) beats champion {self.champion.id} "
                 f"({bar:.4f} on the evaluation seed) by more than {margin:.4f}; {self.s.reruns} re-runs queued")
        return True

    def take(self) -> GuardRun | None:
        """The next run to start; it counts as running until finished or put back."""
        if not self.queue:
            return None
        run = self.queue.pop(0)
        self.running.append(run)
        return run

    def put_back(self, run: GuardRun) -> None:
        """A run that was cancelled or lost with its machine: first in line again."""
        if run in self.running:
            self.running.remove(run)
        self.queue.insert(0, run)

    def record(self, job: GuardRun, status: str, metrics: dict, train_seconds: float | None = None,
               steps: int | None = None, reason: str = "") -> list[tuple[str, float]]:
        """Store one guard run's outcome; returns deferred candidates now ready to consider."""
        if job in self.running:
            self.running.remove(job)
        record = self.records[job.individual]
        sample = Sample(job.seed, status, metrics.get("val_bpb") if status == "ok" else None,
                        metrics.get("heldout_bpb") if status == "ok" else None,
                        kind=job.kind, train_seconds=train_seconds, steps=steps, finished_at=time.time(),
                        reason=reason[:300])
        if job.kind in (TRANSFER, AUDIT, ANCHOR):
            getattr(record, job.kind).append(sample)
            return self._ready() if job.kind == ANCHOR else []
        record.samples.append(sample)
        if len(record.samples) < record.expected:
            return []
        if job.kind == NOISE:
            measured = self.measured_sigma()
            if measured is not None and measured < self.s.min_sigma:
                self.log(f"guard: WARNING: the seed's {len(record.ok())} noise runs differ by only {measured:.6f} val_bpb "
                         f"(sigma {measured:.4f}); the guard assumes guard.min_sigma={self.s.min_sigma:g} instead. Identical "
                         "numbers usually mean the seed did not learn (see the untrained score) or ignores EVO_SEED.")
            return self._ready()
        self._decide(record)
        return []

    def _anchoring(self) -> bool:
        """The seed variant's anchor run is queued or in flight (a checkpoint from before the anchor has none)."""
        return any(run.kind == ANCHOR for run in self.queue + self.running)

    def _ready(self) -> list[tuple[str, float]]:
        """The deferred candidates, handed back once the floor and the anchor are both measured."""
        seed = self.records.get(self.champions[0]) if self.champions else None
        if seed is None or len(seed.samples) < seed.expected or self._anchoring():
            return []
        ready, self.deferred = self.deferred, []
        return ready

    def _decide(self, candidate: Record) -> None:
        champion = self.champion
        ok, champion_ok = candidate.ok(), champion.ok()
        if len(ok) < 2 or len(champion_ok) < 2:
            candidate.verdict = f"re-runs failed ({len(ok)} of {len(candidate.samples)} ok)"
            self.log(f"guard: {candidate.id} not promoted: {candidate.verdict}")
            return
        cand, champ = candidate.stats(), champion.stats()
        pairs = paired_differences(candidate, champion)
        if len(pairs) >= 2:
            candidate.against = champion.id
            # min_sigma is one run's least noise; a difference of two runs has sqrt(2) times as much.
            candidate.p_value = paired_less([val for val, _ in pairs], math.sqrt(2) * self.s.min_sigma)
            gain, held_gain = -mean_std([val for val, _ in pairs])[0], -mean_std([held for _, held in pairs])[0]
            how = f"paired on {len(pairs)} seeds, mean difference {-gain:+.4f}"
        else:
            candidate.p_value = welch_less([s.val_bpb for s in ok], [s.val_bpb for s in champion_ok], self.s.min_sigma)
            gain, held_gain = champ["val_mean"] - cand["val_mean"], champ["held_mean"] - cand["held_mean"]
            how = "unpaired"
        cand["p_value"] = candidate.p_value
        if candidate.p_value >= self.s.alpha:
            candidate.verdict = "not significant"
        elif gain < self.s.min_delta:
            candidate.verdict = "gain below min_delta"
        else:
            self.heldout_consulted += 1  # the one decision that looks at held-out numbers
            candidate.verdict = "held-out disagrees" if held_gain <= 0 else "promoted"
        if candidate.verdict == "promoted":
            previous = champion.id
            self.champions.append(candidate.id)
            if self.s.audit_runs:  # both on seeds of this promotion's own, never used by any decision
                start = AUDIT_SEEDS + self.s.audit_runs * (len(self.champions) - 2)
                seeds = [seed + 10**6 if seed == self.evaluation_seed else seed
                         for seed in range(start, start + self.s.audit_runs)]
                for who in (candidate.id, previous):
                    self._seed_jobs(who, AUDIT, self.s.audit_runs, first=seeds)
            if self.s.transfer_multiplier:
                # On the same seeds, so each pair compares like with like. A champion that already
                # has its runs at the larger budget (it was the new one last time) keeps them.
                queued = {run.individual for run in self.queue + self.running if run.kind == TRANSFER}
                for who in (candidate.id, previous):
                    if not self.records[who].ok("transfer") and who not in queued:
                        self._seed_jobs(who, TRANSFER, self.s.transfer_runs, self.s.transfer_multiplier)
        # The log says what happened, never a held-out number (logs may reach an LLM).
        self.log(f"guard: {candidate.id} {candidate.verdict} (re-run mean {cand['val_mean']:.4f} vs "
                 f"{champ['val_mean']:.4f}, {how}, p={candidate.p_value:.3g})")

    # ---- reading ----
    def rerun_mean(self, individual_id: str) -> float | None:
        """Mean val_bpb of its ok re-runs (noise runs for the seed), once there are at least two."""
        record = self.records.get(individual_id)
        ok = record.ok() if record is not None else []
        return sum(s.val_bpb for s in ok) / len(ok) if len(ok) >= 2 else None

    @staticmethod
    def anchor_draws(record: Record) -> list[float]:
        """The seed variant's ok draws on the evaluation seed besides its first."""
        return [s.val_bpb for s in record.anchor if s.status == "ok" and s.val_bpb is not None]

    def anchored(self, record: Record) -> float | None:
        """The seed variant's standing on the evaluation seed: the mean of its first draw and its
        anchor run (the first draw alone until the anchor is in, or where it failed)."""
        if record.first_val is None:
            return None
        draws = [record.first_val] + self.anchor_draws(record)
        return sum(draws) / len(draws)

    def on_evaluation_seed(self, individual_id: str) -> float | None:
        """Where a variant stands on the scale of the run's evaluation seed, the one every first draw
        uses. The seed variant: its anchored standing (see `anchored`). A variant with re-runs: that
        standing plus the variant's mean difference from the seed variant, seed by seed on the guard
        seeds both ran ok (from the two re-run means where fewer than two are shared). That evidence
        was not selected for being low, as the first draw was. Otherwise its first draw; None if the
        guard never saw it."""
        record = self.records.get(individual_id)
        if record is None:
            return None
        base = self.records.get(self.champions[0]) if self.champions else None
        if base is record:
            return self.anchored(record)
        if base is None or base.first_val is None:
            return record.first_val
        pairs = paired_differences(record, base)
        if len(pairs) >= 2:
            return self.anchored(base) + mean_std([val for val, _ in pairs])[0]
        mine, theirs = self.rerun_mean(record.id), self.rerun_mean(base.id)
        return record.first_val if mine is None or theirs is None else self.anchored(base) + mine - theirs

    def paired_estimate(self, individual_id: str) -> float | None:
        """on_evaluation_seed for a variant the guard has re-run at least twice, or for the seed
        variant once its anchor run is in; else None (the first draw is all there is)."""
        if not self.champions:
            return None
        if individual_id == self.champions[0]:
            record = self.records[individual_id]
            return self.anchored(record) if self.anchor_draws(record) else None
        if self.rerun_mean(individual_id) is None:
            return None
        return self.on_evaluation_seed(individual_id)

    def estimate_label(self, individual_id: str) -> str:
        """What paired_estimate is for this variant, in words for a status line."""
        return "mean of 2 draws" if self.champions and individual_id == self.champions[0] else "paired estimate"

    def rerun_failed(self, individual_id: str) -> bool:
        """Its re-runs were given a verdict and too few of them ran ok to have a mean."""
        record = self.records.get(individual_id)
        return record is not None and record.verdict.startswith("re-runs failed")

    def awaiting(self, individual_id: str) -> bool:
        """A candidate whose verdict is still open: re-runs queued or in flight, or deferred; or the
        seed variant while its anchor run is still to come."""
        record = self.records.get(individual_id)
        if record is not None and len(record.samples) < record.expected:
            return True
        if self.champions and individual_id == self.champions[0] and self._anchoring():
            return True
        return any(who == individual_id for who, _ in self.deferred)

    def overfitting_alarm(self) -> str | None:
        """Val keeps improving over successive champions while held-out does not."""
        window = self.champions[-self.s.alarm_window:]
        if len(window) < self.s.alarm_window or len(window) < 2:
            return None
        first, last = self.records[window[0]].stats(), self.records[window[-1]].stats()
        if not first or not last:
            return None
        val_gain = first["val_mean"] - last["val_mean"]
        held_gain = first["held_mean"] - last["held_mean"]
        if val_gain > 0 and held_gain < 0.25 * val_gain:
            return (f"overfitting alarm: over the last {len(window)} champions val_bpb improved by {val_gain:.4f} "
                    f"but held-out only by {held_gain:.4f}. The search may be fitting the validation split; "
                    "treat recent gains with suspicion.")
        return None

    def _promotions(self, which: str):
        """(new champion, the one before, their val differences seed by seed on their `which` runs)
        for each promotion, oldest first."""
        for i in range(1, len(self.champions)):
            new, old = self.records[self.champions[i]], self.records[self.champions[i - 1]]
            yield new, old, [val for val, _ in paired_differences(new, old, which)]

    def audit_summary(self) -> list[str]:
        """Each promotion on seeds no decision used: the new champion minus the one before, seed by
        seed, next to what their re-runs on the shared seeds claimed."""
        lines, checked, claimed = [], [], []
        for new, old, fresh in self._promotions("audit"):
            if not fresh:
                continue
            gain = mean_std(fresh)[0]
            pairs = paired_differences(new, old)
            claim = mean_std([val for val, _ in pairs])[0] if pairs else None
            checked.append(gain)
            claimed.append(claim)
            said = f"; the re-runs claimed {claim:+.4f}" if claim is not None else ""
            lines.append(f"fresh-seed check: {new.id} vs {old.id}: {gain:+.4f} val_bpb on {len(fresh)} seed(s) no "
                         f"decision used{said}: the gain {'held' if gain < 0 else 'did NOT hold'}")
        if len(checked) > 1 and None not in claimed:
            lines.append(f"fresh-seed check, all {len(checked)} checked promotions together: {sum(checked):+.4f} val_bpb "
                         f"(the re-runs claimed {sum(claimed):+.4f})")
        return lines

    def transfer_summary(self) -> list[str]:
        """Each promotion at the larger budget: the new champion minus the one before, seed by seed
        (both run the same transfer seeds). Nothing while their runs are pending."""
        lines = []
        for new, old, differences in self._promotions("transfer"):
            multiplier = f" x{self.s.transfer_multiplier:g}" if self.s.transfer_multiplier else ""  # off since a resume
            head = f"scale transfer{multiplier}: {new.id} vs {old.id}:"
            if differences:
                gain = mean_std(differences)[0]
                lines.append(f"{head} {gain:+.4f} val_bpb on {len(differences)} shared seed(s): "
                             f"the gain {'held' if gain < 0 else 'did NOT hold'}")
            elif new.transfer and old.transfer:  # both ran, but on no seed did both run ok
                lines.append(f"{head} no seed where both ran ok")
        return lines


def paired_differences(record: Record, reference: Record, which: str = "samples") -> list[tuple[float, float]]:
    """(val, held-out) of record minus reference on each seed both ran ok, in seed order: their
    guard runs, or (which="audit" or "transfer") their fresh-seed checks or larger-budget runs."""
    theirs = {s.seed: s for s in reference.ok(which)}
    return [(s.val_bpb - theirs[s.seed].val_bpb, s.heldout_bpb - theirs[s.seed].heldout_bpb)
            for s in sorted(record.ok(which), key=lambda s: s.seed) if s.seed in theirs]
