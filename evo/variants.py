"""Naming variants on the command line, and comparing two of them.

An id may be given whole (`v00012`), by its number (`12`, `v12`) or by a prefix that only one id
has (`v0001` is ambiguous once there are ten). An unknown id is an error that lists the ids
closest to it, so a typo is fixed from the message.
"""

from __future__ import annotations

import difflib
import re

from evo.population import Population
from evo.store import RunStore, StoreError

_NUMBER = re.compile(r"^v?0*(\d+)$")


def resolve_id(population: Population, text: str, run_dir) -> str:
    """The one id `text` names, or StoreError saying which ids it could have meant."""
    ids = sorted(population.individuals)
    if text in population.individuals:
        return text
    number = _NUMBER.match(text)
    if number is not None:
        by_number = [i for i in ids if (m := _NUMBER.match(i)) and int(m.group(1)) == int(number.group(1))]
        if len(by_number) == 1:
            return by_number[0]
    matches = [i for i in ids if i.startswith(text)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        shown = ", ".join(matches[:10]) + (f" and {len(matches) - 10} more" if len(matches) > 10 else "")
        raise StoreError(f"{text!r} matches {len(matches)} variants in {run_dir} ({shown}); give more of the id")
    if not ids:
        raise StoreError(f"{run_dir} has no variants yet")
    close = difflib.get_close_matches(text, ids, n=5, cutoff=0.5)
    hint = f"closest: {', '.join(close)}" if close else f"ids run from {ids[0]} to {ids[-1]}"
    raise StoreError(f"no variant {text!r} in {run_dir}; {hint} (`evo status {run_dir}` lists the best)")


def code_diff(store: RunStore, population: Population, a: str, b: str) -> str:
    """A unified diff of two variants' train.py (empty when the code is the same)."""
    first, second = population.individuals[a], population.individuals[b]
    old, new = store.code(a, first.code_hash), store.code(b, second.code_hash)
    return "".join(difflib.unified_diff(_lines(old), _lines(new), f"{a}/train.py", f"{b}/train.py"))


def _lines(code: str) -> list[str]:
    """Lines that each end in a newline, so a last line without one does not run into the next."""
    return [line if line.endswith("\n") else line + "\n" for line in code.splitlines(True)]
