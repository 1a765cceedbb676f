"""Population bookkeeping and the Parquet checkpoint."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evo.population import Individual, Population, normalized_hash
from evo.store import POPULATION, PREVIOUS, RunStore, StoreError


def make(i, island=0, val=None, status="ok", code=None):
    code = code or f"X = {i}\n"
    return Individual(id=f"v{i:05d}", birth=i, island=island, code_hash=normalized_hash(code),
                      operator="perturb", status=status, val_bpb=val)


def test_normalized_hash_ignores_comments_and_formatting():
    assert normalized_hash("X = 1  # fast\ny=(1,2)\n") == normalized_hash("X = 1\n\ny = (1, 2)")
    assert normalized_hash("X = 1\n") != normalized_hash("X = 2\n")


def test_members_are_the_best_ok_individuals_and_failures_never_parent():
    pop = Population(islands=2, size=2)
    pop.add(make(1, val=3.0))
    pop.add(make(2, val=2.0))
    pop.add(make(3, val=2.5))
    pop.add(make(4, val=None, status="crash"))
    pop.add(make(5, island=1, val=1.0))
    assert [m.id for m in pop.members(0)] == ["v00002", "v00003"]
    rng = random.Random(0)
    parents = {pop.tournament(0, 2, rng).id for _ in range(50)}
    assert parents <= {"v00002", "v00003"} and "v00004" not in parents


def test_ring_migration_sends_the_best_to_the_next_island():
    pop = Population(islands=3, size=4)
    pop.add(make(1, island=0, val=2.0))
    pop.add(make(2, island=1, val=1.5))
    moves = pop.migrate(count=1)
    assert ("v00001", 1) in moves and ("v00002", 2) in moves
    assert pop.members(1)[0].id == "v00002" and "v00001" in [m.id for m in pop.members(1)]


def test_checkpoint_roundtrip_with_state_and_schema(tmp_path):
    store = RunStore(tmp_path)
    store.create("run: {}\n", "X = 1\n", {"data_fingerprint": "f", "prepare_hash": "h"})
    individuals = [make(1, val=2.0), make(2, val=None, status="pending")]
    store.save(individuals, {"counters": {"births": 2}, "rng": [1]})
    loaded, state = store.load()
    assert [i.id for i in loaded] == ["v00001", "v00002"] and loaded[0].val_bpb == 2.0
    assert state == {"counters": {"births": 2}, "rng": [1]}
    schema = pq.read_schema(tmp_path / POPULATION)
    assert schema.metadata[b"evo_schema"] == b"2"
    assert "code" not in schema.names  # code lives in variants/<id>/train.py
    assert pq.ParquetFile(tmp_path / POPULATION).metadata.row_group(0).column(0).compression == "ZSTD"


def test_corrupt_checkpoint_falls_back_to_the_previous_good_one(tmp_path, capsys):
    store = RunStore(tmp_path)
    store.create("run: {}\n", "X = 1\n", {})
    store.save([make(1, val=2.0)], {"n": 1})
    store.save([make(1, val=2.0), make(2, val=1.0)], {"n": 2})
    data = (tmp_path / POPULATION).read_bytes()
    (tmp_path / POPULATION).write_bytes(data[: len(data) // 2])  # as if cut off mid-write
    individuals, state = store.load()
    assert state == {"n": 1} and len(individuals) == 1
    assert "previous good checkpoint" in capsys.readouterr().err
    (tmp_path / PREVIOUS).write_bytes(b"garbage")
    with pytest.raises(StoreError, match="no readable checkpoint"):
        store.load()


def test_a_second_run_in_the_same_directory_is_refused(tmp_path):
    store = RunStore(tmp_path)
    store.create("", "", {})
    store.save([], {})
    with pytest.raises(StoreError, match="evo resume"):
        RunStore(tmp_path).create("", "", {})


def test_code_lives_on_disk_and_memory_holds_a_bounded_cache(tmp_path):
    store = RunStore(tmp_path, code_cache_size=8)
    codes = {f"v{i:05d}": f"X = {i}\n" + "# padding\n" * 50 for i in range(1, 41)}
    for individual_id, code in codes.items():
        store.write_code(individual_id, code)
        assert store.cached_codes() <= 8
    for individual_id, code in codes.items():  # most come back from disk, each checked
        assert store.code(individual_id, normalized_hash(code)) == code
        assert store.cached_codes() <= 8
    assert (tmp_path / "variants" / "v00017" / "train.py").read_text() == codes["v00017"]
    fresh = RunStore(tmp_path)  # a resumed engine starts with nothing cached
    assert fresh.cached_codes() == 0 and fresh.code("v00003") == codes["v00003"]


def test_changed_or_missing_code_is_a_clear_error(tmp_path):
    store = RunStore(tmp_path)
    store.write_code("v00001", "X = 1\n")
    store.write_code("v00002", "X = 2\n")
    (tmp_path / "variants" / "v00001" / "train.py").write_text("X = 99\n")
    with pytest.raises(StoreError, match="v00001/train.py is not the code v00001 was evaluated with"):
        RunStore(tmp_path).code("v00001", normalized_hash("X = 1\n"))
    # comments and formatting are not a change of code
    (tmp_path / "variants" / "v00001" / "train.py").write_text("X = 1  # note\n")
    assert RunStore(tmp_path).code("v00001", normalized_hash("X = 1\n")) == "X = 1  # note\n"
    (tmp_path / "variants" / "v00002" / "train.py").unlink()
    with pytest.raises(StoreError, match="v00002/train.py is missing"):
        RunStore(tmp_path).code("v00002")


def test_a_schema_1_checkpoint_with_a_code_column_still_resumes(tmp_path):
    """Runs started before code moved to files: each variant gets its train.py from the column."""
    store = RunStore(tmp_path)
    store.create("run: {}\n", "X = 1\n", {})
    individuals = [make(1, val=2.0), make(2, status="pending")]
    rows = [{**i.to_row(), "code": f"X = {n}\n"} for n, i in enumerate(individuals, start=1)]
    table = pa.Table.from_pylist(rows).replace_schema_metadata(
        {"evo_schema": "1", "evo_state": json.dumps({"counters": {"births": 2}})})
    pq.write_table(table, tmp_path / POPULATION)
    loaded, state = store.load()
    assert [i.id for i in loaded] == ["v00001", "v00002"] and state == {"counters": {"births": 2}}
    assert RunStore(tmp_path).code("v00002", loaded[1].code_hash) == "X = 2\n"
