"""Operators by name. The config's `operators:` section picks and weights them; the `mutators:`
section holds each one's settings."""

from __future__ import annotations

from pathlib import Path

from mutators.constants import PerturbConstants
from mutators.crossover import Crossover
from mutators.optuna_op import OptunaProposals


def _optuna(config, run_dir: Path):
    s = config.mutators.optuna
    return OptunaProposals(s.storage or run_dir / "optuna.journal", sampler=s.sampler, seed=config.seed,
                           max_changes=s.max_changes)


def _llm(config, run_dir: Path):
    from mutators.llm import LLMEdit

    return LLMEdit(config.mutators.llm, run_dir, program_path=config.mutators.program)


def _llm_crossover(config, run_dir: Path):
    from mutators.llm import LLMCrossover

    return LLMCrossover(config.mutators.llm, run_dir, program_path=config.mutators.program)


OPERATORS = {
    "perturb": lambda config, run_dir: PerturbConstants(config.mutators.perturb.max_changes,
                                                        config.mutators.perturb.follow,
                                                        config.mutators.perturb.reflect),
    "crossover": lambda config, run_dir: Crossover(config.mutators.crossover.max_taken),
    "optuna": _optuna,
    "llm": _llm,
    "llm_crossover": _llm_crossover,
}


def build(config, run_dir: Path) -> dict:
    """The configured operators with a positive weight (names were checked by the config)."""
    return {name: OPERATORS[name](config, Path(run_dir)) for name, weight in config.operators.items() if weight > 0}
