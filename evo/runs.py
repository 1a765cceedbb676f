"""Starting and resuming runs: the checks that come before the engine's loop."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import prepare
from evo.config import Config, dump_config, load_config
from evo.engine import Engine
from evo.store import RunStore, StoreError
from trainer.files import write_atomic
from trainer.runner import prepare_hash

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def resolve_seed_file(seed_file: str, config_path: str | Path | None) -> Path:
    """Relative seed paths: from the cwd, then from the config's folder's parent, then evo's root."""
    candidates = [Path(seed_file)]
    if config_path is not None:
        candidates.append(Path(config_path).resolve().parent.parent / seed_file)
    candidates.append(PACKAGE_ROOT / seed_file)
    for path in candidates:
        if path.is_file():
            return path
    looked = list(dict.fromkeys(str(c.resolve()) for c in candidates))  # a path reached two ways is named once
    raise StoreError(f"seed_file {seed_file!r} not found (looked in: {', '.join(looked)}). "
                     "Set seed_file in the config (or --set seed_file=PATH) to an existing train.py.")


def start_run(config: Config, config_path: str | Path | None, log: Callable[[str], None] = print) -> Engine:
    data_dir = config.data.dir or prepare.DATA_DIR
    meta = prepare.verify(data_dir)  # the files hash to what meta.json says, or a message on how to rebuild
    seed_path = resolve_seed_file(config.seed_file, config_path)
    store = RunStore(Path(config.run.dir) / config.run.name)
    store.create(dump_config(config), seed_path.read_text(), {
        "data_dir": str(data_dir),
        "data_fingerprint": meta["fingerprint"],
        "vocab_size": meta["vocab_size"],  # for the untrained score (evo/explain.py)
        "prepare_hash": prepare_hash(),
        "seed_file": str(seed_path),
    })
    engine = Engine(config, store, log)
    engine.checkpoint()
    return engine


def resume_run(run_dir: str | Path, overrides: list[str] = (), log: Callable[[str], None] = print) -> Engine:
    store = RunStore(run_dir)
    info = store.run_info()
    config = load_config(store.dir / "config.yaml", overrides)
    data_dir = config.data.dir or prepare.DATA_DIR
    fingerprint = prepare.verify(data_dir)["fingerprint"]
    if fingerprint != info["data_fingerprint"]:
        raise StoreError(
            f"the data in {data_dir} (fingerprint {fingerprint}) is not the data this run used "
            f"({info['data_fingerprint']}). Rebuild it with the run's prepare settings, or point data.dir at the original."
        )
    if prepare_hash() != info["prepare_hash"]:
        raise StoreError(
            "prepare.py changed since this run started, so new scores would not be comparable with old ones. "
            "Restore the original prepare.py (e.g. git checkout) to resume, or start a new run."
        )
    if overrides:  # the frozen config follows the run: a later plain resume keeps the change
        write_atomic(store.dir / "config.yaml", dump_config(config))
    engine = Engine(config, store, log)
    individuals, state = store.load()
    engine.restore(individuals, state)
    killed = engine.sweep_leftovers()
    adopted = engine.adopt_finished_results()
    pending = len(engine.population.pending())
    log(f"resumed {store.dir}: {len(individuals)} individuals, {engine.counters.evaluations} evaluations done, "
        f"{adopted} finished results recovered, {pending} re-queued, {killed} leftover processes killed")
    engine.checkpoint()
    return engine
