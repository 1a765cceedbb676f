"""Optuna proposals for the constants libcst finds.

One study per code skeleton (the code with its constants' values masked), so the sampler learns
on one structure at a time. The study's search space is fixed when the study is created, from
the domains of the first parent with that skeleton, and that parent enters as a finished trial.
A child moves only a few of its parent's constants (max_changes); the rest enter the trial fixed
at the parent's values. A domain libcst inferred (not declared) reaches OPTUNA_REACH either way
of the value the study started from. ask() gives a child; the engine reports each child's val_bpb back (a failure is told as failed,
a duplicate that was never run as pruned). The storage is a journal file in the run directory,
so a resumed run continues every study where it stopped; or an RDB URL (PostgreSQL, say) that
several drivers share, so their samplers learn from each other's trials.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import threading
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from mutators.base import Parent, Proposal, Refusal, checked
from mutators.constants import (LEVER_WEIGHT, CommentError, Constant, Domain, find_constants, logistic, logit, render,
                                replace_constants, weighted_sample)

optuna.logging.set_verbosity(logging.WARNING)

SAMPLERS = {
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, n_startup_trials=5),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
    "cmaes": lambda seed: optuna.samplers.CmaEsSampler(seed=seed),
}


def skeleton_hash(code: str, constants: list[Constant]) -> str:
    masked = replace_constants(code, {c.name: "..." for c in constants})
    return hashlib.sha256(masked.encode()).hexdigest()[:12]


# How far (a factor either way; for a fraction, a factor on its odds) Optuna may move a constant
# whose domain was inferred, not declared.
# An inferred float domain spans 30x either way, and TPE's first trials on a skeleton are random
# draws from it: in the search benchmark (runs 2-3) 6 of 20 Optuna children scored over 0.1 bpb
# worse than their parent (learning rates moved 5-22x) and 3 of 20 better, against 11 of 21 better
# for perturb's small steps. A declared `# evo: range(...)` is taken as written.
OPTUNA_REACH = 4.0


def distribution(domain: Domain, value):
    if domain.inferred and domain.kind == "fraction" and isinstance(value, float) and 0 < value < 1:
        # The same reach in odds: 0.95 may go to 0.83..0.99, 0.5 to 0.2..0.8 (not a beta of 0.2).
        odds, reach = logit(value), math.log(OPTUNA_REACH)
        return FloatDistribution(logistic(odds - reach), min(1 - 1e-4, logistic(odds + reach)))
    if domain.inferred and domain.log and isinstance(value, (int, float)) and value > 0:
        low, high = max(domain.low, value / OPTUNA_REACH), min(domain.high, value * OPTUNA_REACH)
        domain = Domain(domain.kind, low=int(max(1, low)) if domain.kind == "int" else low,
                        high=int(high) if domain.kind == "int" else high, log=True)
    if domain.kind in ("bool", "choice"):
        return CategoricalDistribution(list(domain.choices))
    if domain.kind == "fraction":
        return FloatDistribution(0.0, 0.99)
    if domain.kind == "int":
        low, high = int(domain.low), int(domain.high)
        if domain.log and value >= 2 and value & (value - 1) == 0:  # keep powers of two
            powers = [2**k for k in range(max(low, 1).bit_length() - 1, high.bit_length()) if low <= 2**k <= high]
            return CategoricalDistribution(powers)
        return IntDistribution(low, high, log=domain.log and low >= 1)
    return FloatDistribution(float(domain.low), float(domain.high), log=domain.log)


def _space(constants: list[Constant]) -> dict[str, optuna.distributions.BaseDistribution]:
    space = {}
    for c in constants:
        if isinstance(c.value, tuple):
            for i, (v, d) in enumerate(zip(c.value, c.domain)):
                space[f"{c.name}[{i}]"] = distribution(d, v)
        else:
            space[c.name] = distribution(c.domain, c.value)
    return space


def _params_of(constants: list[Constant]) -> dict:
    params = {}
    for c in constants:
        if isinstance(c.value, tuple):
            params.update({f"{c.name}[{i}]": v for i, v in enumerate(c.value)})
        else:
            params[c.name] = c.value
    return params


def _values_from(params: dict, constants: list[Constant]) -> dict[str, str]:
    """New source text for each constant, from a trial's parameters."""
    out = {}
    for c in constants:
        if isinstance(c.value, tuple):
            value = tuple(params[f"{c.name}[{i}]"] for i in range(len(c.value)))
        else:
            value = params[c.name]
        if isinstance(value, float) and isinstance(c.value, float):
            value = float(f"{value:.4g}")
        out[c.name] = render(value)
    return out


ATTEMPTS = 3  # asks per proposal before giving up on a child that differs from its parent


def _contains(dist: optuna.distributions.BaseDistribution, value) -> bool:
    try:
        return dist._contains(dist.to_internal_repr(value))
    except (ValueError, TypeError):
        return False


def _derived_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "big")


class OptunaProposals:
    """One study per skeleton, one sampler object per study (kept for the object's life).

    A child moves only 1..max_changes of its parent's constants: the others enter the trial as
    fixed parameters (an enqueued trial) at the parent's values, so the sampler learns from the
    whole point while the child stays near its parent.
    """

    name = "optuna"
    parents_needed = 1

    def __init__(self, storage: str | Path, sampler: str = "tpe", seed: int = 0, max_changes: int = 3):
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
        if max_changes < 1:
            raise ValueError("max_changes must be at least 1")
        if "://" in str(storage):  # an RDB URL: postgresql://..., mysql://..., sqlite:///...
            self.storage = optuna.storages.RDBStorage(str(storage))
        else:
            self.storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(storage)))
        self.sampler_name = sampler
        self.seed = seed
        self.max_changes = max_changes
        self._studies: dict[str, optuna.Study] = {}  # study name -> study with its one sampler
        self._lock = threading.Lock()  # enqueue + ask must pair up; breeding may run in threads

    def _load(self, name: str, rng: random.Random | None) -> optuna.Study:
        """The study and its sampler, built once. A study new to storage gets its sampler seed from
        rng (the engine's), recorded in the study; a study that already exists (a resumed run,
        another driver) rebuilds its sampler from that seed mixed with its trial count and this
        driver's seed, so it does not replay the proposals already made."""
        if name in self._studies:
            return self._studies[name]
        fresh = rng.getrandbits(32) if rng is not None else _derived_seed(self.seed, name)
        probe = optuna.create_study(study_name=name, storage=self.storage, load_if_exists=True,
                                    direction="minimize", sampler=optuna.samplers.RandomSampler(0))
        if "sampler_seed" not in probe.user_attrs:
            probe.set_user_attr("sampler_seed", fresh)
            seed = fresh
        else:
            seed = _derived_seed(probe.user_attrs["sampler_seed"], len(probe.trials), self.seed)
        study = optuna.load_study(study_name=name, storage=self.storage, sampler=SAMPLERS[self.sampler_name](seed))
        self._studies[name] = study
        return study

    def _study(self, key: str, parent: Parent, constants: list[Constant], rng: random.Random) -> optuna.Study:
        study = self._load(f"skeleton-{key}", rng)
        if "space" not in study.user_attrs:
            space = _space(constants)
            study.set_user_attr("space", {k: optuna.distributions.distribution_to_json(d) for k, d in space.items()})
            if parent.val_bpb is not None:
                try:
                    study.add_trial(optuna.trial.create_trial(params=_params_of(constants), distributions=space,
                                                              value=parent.val_bpb))
                except ValueError:
                    pass  # a parent value outside the space (e.g. a non-listed choice): start cold
        return study

    def propose(self, parents: list[Parent], rng: random.Random) -> Proposal | Refusal:
        parent = parents[0]
        try:
            constants = find_constants(parent.code)
        except CommentError as e:
            return Refusal(self.name, f"cannot read the parent's constants: {e}")
        if not constants:
            return Refusal(self.name, "no module-level constants to tune")
        key = skeleton_hash(parent.code, constants)
        with self._lock:
            return self._propose(parent, constants, key, rng)

    def _propose(self, parent: Parent, constants: list[Constant], key: str, rng: random.Random) -> Proposal | Refusal:
        study = self._study(key, parent, constants, rng)
        space = {k: optuna.distributions.json_to_distribution(v) for k, v in study.user_attrs["space"].items()}
        current = _params_of(constants)
        if set(space) != set(current):
            return Refusal(self.name, "the parent's constants do not match its skeleton's study")
        # Values the parent has moved outside the study's space (other operators did) stay as they
        # are and out of the trial; the sampler moves only parameters inside its space.
        inside = sorted(k for k in space if _contains(space[k], current[k]))
        movable = [k for k in inside if not space[k].single()]
        if not movable:
            return Refusal(self.name, "none of the parent's constants lies inside its study's space")
        old = _values_from(current, constants)
        for _ in range(ATTEMPTS):  # a categorical draw often lands on the parent's own value
            chosen = self._pick(movable, constants, rng)
            token = f"{rng.getrandbits(64):016x}"
            study.enqueue_trial({k: current[k] for k in inside if k not in chosen}, user_attrs={"evo_token": token})
            trial = study.ask({k: space[k] for k in inside})
            if trial.user_attrs.get("evo_token") != token:  # another driver's queued trial: not ours to fill
                study.tell(trial.number, state=TrialState.PRUNED)
                return Refusal(self.name, "another driver took this trial from the shared queue; try again")
            new = _values_from(dict(current, **trial.params), constants)
            moved = {n: v for n, v in new.items() if v != old[n]}  # only these lines change
            if moved:
                break
            study.tell(trial.number, state=TrialState.PRUNED)
        else:
            return Refusal(self.name, "the sampler proposed the parent's own values")
        details = {"study": study.study_name, "trial": trial.number,
                   "changes": {n: (old[n], v) for n, v in moved.items()}}
        code = replace_constants(parent.code, moved)
        hypothesis = ", ".join(f"{n} {old[n]} -> {v}" for n, v in moved.items())
        result = checked(Proposal(code, self.name, details, hypothesis), parent.code)
        if isinstance(result, Refusal):
            study.tell(trial.number, state=TrialState.PRUNED)
        return result

    def _pick(self, movable: list[str], constants: list[Constant], rng: random.Random) -> list[str]:
        """1..max_changes of the movable parameters; a lever's (ADAM_BETAS[1] is ADAM_BETAS's) with
        LEVER_WEIGHT, as perturb picks. Without levers: uniform, the draw as it always was."""
        k = min(len(movable), rng.randint(1, self.max_changes))
        levers = {c.name for c in constants if c.lever}
        if not levers:
            return rng.sample(movable, k=k)
        weights = [LEVER_WEIGHT if name.split("[")[0] in levers else 1.0 for name in movable]
        return weighted_sample(movable, k, weights, rng)

    def feedback(self, details: dict, val_bpb: float | None, evaluated: bool) -> None:
        """The child's outcome: a score, a failure (evaluated, no score), or never run (pruned)."""
        if "study" not in details:
            return
        with self._lock:
            study = self._load(details["study"], None)
            if study.trials[details["trial"]].state != TrialState.RUNNING:
                return  # already told (e.g. before a crash); telling twice is an error in optuna
            if val_bpb is not None:
                study.tell(details["trial"], val_bpb)
            else:
                study.tell(details["trial"], state=TrialState.FAIL if evaluated else TrialState.PRUNED)

    def trials(self) -> list[tuple[str, int, str, float | None]]:
        rows = []
        for summary in optuna.get_all_study_summaries(self.storage):
            study = optuna.load_study(study_name=summary.study_name, storage=self.storage)
            rows += [(summary.study_name, t.number, t.state.name, t.value) for t in study.trials]
        return rows
