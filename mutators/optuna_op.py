"""Optuna proposals for the constants libcst finds.

One study per code skeleton (the code with its constants' values masked), so the sampler learns
on one structure at a time. The study's search space is fixed when the study is created, from
the domains of the first parent with that skeleton, and that parent enters as a finished trial.
ask() gives a child; the engine reports each child's val_bpb back (a failure is told as failed,
a duplicate that was never run as pruned). The storage is a journal file in the run directory,
so a resumed run continues every study where it stopped; or an RDB URL (PostgreSQL, say) that
several drivers share, so their samplers learn from each other's trials.
"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from mutators.base import Parent, Proposal, Refusal, checked
from mutators.constants import CommentError, Constant, Domain, find_constants, render, replace_constants

optuna.logging.set_verbosity(logging.WARNING)

SAMPLERS = {
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, n_startup_trials=5),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
    "cmaes": lambda seed: optuna.samplers.CmaEsSampler(seed=seed),
}


def skeleton_hash(code: str, constants: list[Constant]) -> str:
    masked = replace_constants(code, {c.name: "..." for c in constants})
    return hashlib.sha256(masked.encode()).hexdigest()[:12]


def distribution(domain: Domain, value):
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


class OptunaProposals:
    name = "optuna"
    parents_needed = 1

    def __init__(self, storage: str | Path, sampler: str = "tpe", seed: int = 0):
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
        if "://" in str(storage):  # an RDB URL: postgresql://..., mysql://..., sqlite:///...
            self.storage = optuna.storages.RDBStorage(str(storage))
        else:
            self.storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(storage)))
        self.sampler_name = sampler
        self.seed = seed

    def _study(self, key: str, parent: Parent, constants: list[Constant]) -> optuna.Study:
        name = f"skeleton-{key}"
        study = optuna.create_study(study_name=name, storage=self.storage, load_if_exists=True,
                                    sampler=SAMPLERS[self.sampler_name](self.seed), direction="minimize")
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
        study = self._study(key, parent, constants)
        space = {k: optuna.distributions.json_to_distribution(v) for k, v in study.user_attrs["space"].items()}
        if set(space) != set(_params_of(constants)):
            return Refusal(self.name, "the parent's constants do not match its skeleton's study")
        trial = study.ask(space)
        code = replace_constants(parent.code, _values_from(trial.params, constants))
        details = {"study": study.study_name, "trial": trial.number}
        if code == parent.code:
            study.tell(trial.number, state=TrialState.PRUNED)
            return Refusal(self.name, "the sampler proposed the parent's own values")
        changed = {c.name: render(c.value) for c in constants}
        new = _values_from(trial.params, constants)
        hypothesis = ", ".join(f"{n} {changed[n]} -> {new[n]}" for n in new if new[n] != changed[n])
        return checked(Proposal(code, self.name, details, hypothesis), parent.code)

    def feedback(self, details: dict, val_bpb: float | None, evaluated: bool) -> None:
        """The child's outcome: a score, a failure (evaluated, no score), or never run (pruned)."""
        if "study" not in details:
            return
        study = optuna.load_study(study_name=details["study"], storage=self.storage,
                                  sampler=SAMPLERS[self.sampler_name](self.seed))
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
