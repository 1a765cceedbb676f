"""Operators by name. The config's `operators:` section picks them and weights them."""

from __future__ import annotations

from mutators.constants import PerturbConstants

OPERATORS = {
    "perturb": lambda config: PerturbConstants(),
}


def build(config) -> dict:
    """The configured operators with a positive weight (names were checked by the config)."""
    return {name: OPERATORS[name](config) for name, weight in config.operators.items() if weight > 0}
