"""The run directory: everything needed to resume, written so a kill -9 loses nothing finished.

    run_dir/
      config.yaml           the frozen configuration
      run.json              data fingerprint, prepare.py hash, seed file, creation time
      seed.py               the seed variant as it was at the start
      population.parquet    every individual's record plus the engine state (in the file's metadata)
      population.prev.parquet   the previous good checkpoint
      variants/<id>/        train.py (written at birth), log.txt, metrics.json, result.json

The population and the engine state (RNG, counters, migrants) travel in one Parquet file, so
one os.replace switches both at once. A variant's code is written once, to its own train.py,
before the checkpoint that first names it: the Parquet file stays small and the engine keeps in
memory only the code it is using (a bounded cache), however large the population grows.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import OrderedDict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from evo.population import INDIVIDUAL_FIELDS, Individual, normalized_hash
from trainer.files import write_atomic

SCHEMA_VERSION = "2"  # 1 kept each variant's code in a column; 2 keeps it in variants/<id>/train.py
POPULATION = "population.parquet"
PREVIOUS = "population.prev.parquet"


class StoreError(Exception):
    """The run directory cannot be used as asked; the message says why and what to do."""


CODE_CACHE_SIZE = 256  # codes kept in memory: enough for every island's members in usual configs


class RunStore:
    def __init__(self, run_dir: str | Path, code_cache_size: int = CODE_CACHE_SIZE):
        self.dir = Path(run_dir)
        self._codes: OrderedDict[str, str] = OrderedDict()  # least recently used first
        self._code_cache_size = code_cache_size

    # ---- creation ----
    def create(self, config_yaml: str, seed_code: str, run_info: dict) -> None:
        if (self.dir / POPULATION).exists():
            raise StoreError(f"{self.dir} already holds a run; use `evo resume {self.dir}` or another run.name")
        (self.dir / "variants").mkdir(parents=True, exist_ok=True)
        write_atomic(self.dir / "config.yaml", config_yaml.encode())
        write_atomic(self.dir / "seed.py", seed_code.encode())
        write_atomic(self.dir / "run.json", json.dumps({**run_info, "created": time.time()}, indent=2).encode())

    def run_info(self) -> dict:
        path = self.dir / "run.json"
        if not path.is_file():
            raise StoreError(f"{self.dir} is not an evo run directory (no run.json)")
        return json.loads(path.read_text())

    def variant_dir(self, individual_id: str) -> Path:
        return self.dir / "variants" / individual_id

    # ---- code ----
    def write_code(self, individual_id: str, code: str) -> None:
        """Written once, at birth, before any checkpoint names the individual. (A variant that
        rewrites its own train.py gets it restored by the runner and is marked tampered.)"""
        folder = self.variant_dir(individual_id)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / "train.py", code.encode())
        self._remember(individual_id, code)

    def code(self, individual_id: str, code_hash: str | None = None) -> str:
        """The variant's code; read from disk (and checked against its recorded hash) unless cached."""
        cached = self._codes.get(individual_id)
        if cached is not None:
            self._codes.move_to_end(individual_id)
            return cached
        path = self.variant_dir(individual_id) / "train.py"
        try:
            code = path.read_text()
        except FileNotFoundError:
            raise StoreError(f"{path} is missing: {individual_id}'s code lives there; restore it from a copy of "
                             "the run directory (nothing else holds it)") from None
        if code_hash is not None and normalized_hash(code) != code_hash:
            raise StoreError(f"{path} is not the code {individual_id} was evaluated with (its hash changed); "
                             "restore it from a copy of the run directory")
        self._remember(individual_id, code)
        return code

    def _remember(self, individual_id: str, code: str) -> None:
        self._codes[individual_id] = code
        self._codes.move_to_end(individual_id)
        while len(self._codes) > self._code_cache_size:
            self._codes.popitem(last=False)

    def cached_codes(self) -> int:
        return len(self._codes)

    # ---- checkpoints ----
    def save(self, individuals: list[Individual], state: dict) -> None:
        columns = {name: [getattr(i, name) for i in individuals] for name in INDIVIDUAL_FIELDS}
        table = pa.table(columns) if individuals else pa.table({name: pa.array([], pa.string()) for name in INDIVIDUAL_FIELDS})
        table = table.replace_schema_metadata({"evo_schema": SCHEMA_VERSION, "evo_state": json.dumps(state)})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        current = self.dir / POPULATION
        if current.exists():  # keep the last good checkpoint; a hard link never leaves a gap
            link = self.dir / (PREVIOUS + ".tmp")
            link.unlink(missing_ok=True)
            os.link(current, link)
            os.replace(link, self.dir / PREVIOUS)
        write_atomic(current, sink.getvalue().to_pybytes())

    def load(self) -> tuple[list[Individual], dict]:
        errors = []
        for name in (POPULATION, PREVIOUS):
            path = self.dir / name
            if not path.exists():
                continue
            try:
                individuals, state = self._read(path)
            except Exception as e:  # pyarrow raises several types for truncated/corrupt files
                errors.append(f"{name}: {e}")
                continue
            if errors:
                print(f"evo: warning: {errors[0]}; resuming from {name}, the previous good checkpoint", file=sys.stderr)
            return individuals, state
        if errors:
            raise StoreError(f"no readable checkpoint in {self.dir}: " + "; ".join(errors))
        raise StoreError(f"{self.dir} has no {POPULATION}; it is not a run directory, or the run never started")

    def _read(self, path: Path) -> tuple[list[Individual], dict]:
        table = pq.read_table(path)
        meta = table.schema.metadata or {}
        version = meta.get(b"evo_schema", b"?").decode()
        if version == "1":
            table = self._move_code_to_files(table)
        elif version != SCHEMA_VERSION:
            raise StoreError(f"schema version {version}, this evo reads {SCHEMA_VERSION} (and 1)")
        state = json.loads(meta[b"evo_state"])
        rows = table.to_pylist()
        return [Individual(**row) for row in rows], state

    def _move_code_to_files(self, table: pa.Table) -> pa.Table:
        """Schema 1 checkpoints carried the code in a column: give each variant its train.py."""
        codes = table.column("code")
        for index, individual_id in enumerate(table.column("id").to_pylist()):
            self.write_code(individual_id, codes[index].as_py())
        return table.drop_columns(["code"])
