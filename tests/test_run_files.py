"""What other tools read from a run: results.tsv, `evo status --json`, `evo export --id`,
`evo diff` and `evo runs`, each checked against the run's own checkpoint."""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
import subprocess
import sys
import threading
import time

import pytest

from evo.config import load_config
from evo.executors.fake import FakeExecutor
from evo.explain import printed_steps
from evo.results_tsv import COLUMNS, FILE_NAME
from evo.runs import resume_run, start_run
from evo.store import RunStore
from mutators.base import Proposal
from tests.fakes import by_quality, engine_with, quality
from tests.procs import run_processes, run_tokens

GUARD = {"enabled": True, "noise_runs": 3, "reruns": 2, "z": 2.0, "min_delta": 0.001}
AWKWARD = 'step\tto "{q}"\nwith a \\ backslash\r'  # every character the TSV must escape, and a quote


class Steps:
    """QUALITY up by 0.1 a child, with a hypothesis full of tabs and newlines; every fourth
    child breaks the code (a crash whose reason spans lines)."""

    name, parents_needed = "perturb", 1

    def __init__(self):
        self.lock, self.calls = threading.Lock(), 0

    def propose(self, parents, rng):
        with self.lock:
            self.calls += 1
            n = self.calls
        q = round(min(1.0, quality(parents[0].code) + 0.1), 3)
        code = re.sub(r"^QUALITY = .*$", f"QUALITY = {q}", parents[0].code, flags=re.MULTILINE)
        if n % 4 == 0:
            code += f"\nBROKEN = {n}\n"
        return Proposal(code, "perturb", {"n": n}, AWKWARD.format(q=q))


def scored_with_a_summary(job):
    """The stand-in's score, a summary block in the log as the seeds print it, the runner's clock;
    a child marked BROKEN crashes with a two-line reason."""
    if "BROKEN" in job.code:
        from trainer.runner import RunResult

        return RunResult(status="crash", reason="RuntimeError: bad\tthing\nsecond line", train_seconds=0.4,
                         log_tail="Traceback ...\nRuntimeError: bad")
    result = by_quality(job, noise=0.01)
    result.train_seconds = 1.0 + job.settings.seed % 7 / 10
    result.log_tail = f"step 10 | loss 3.0\n---\nval_bpb:          {result.metrics['val_bpb']:.6f}\nnum_steps:        {40 + job.settings.seed % 5}\n"
    return result


def read_tsv(run_dir) -> list[dict]:
    text = (run_dir / FILE_NAME).read_text()
    with open(run_dir / FILE_NAME, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert rows[0] == list(COLUMNS)
    assert len(text.splitlines()) == len(rows), "an evaluation spans more than one line"
    assert all(len(row) == len(COLUMNS) for row in rows), "a field holds a raw tab"
    return [dict(zip(COLUMNS, row)) for row in rows[1:]]


def unescape(field: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}[m.group(1)], field)


def number(field: str) -> float | None:
    return float(field) if field else None


def check_against_store(run_dir) -> list[dict]:
    """results.tsv holds exactly the checkpoint's evaluations: every child's first run and every
    guard run, with the same numbers, oldest first."""
    rows = read_tsv(run_dir)
    individuals, state = RunStore(run_dir).load()
    by_id = {i.id: i for i in individuals}
    assert len(rows) == state["counters"]["evaluations"] + state["counters"]["guard_runs"]
    children = [r for r in rows if r["kind"] == "child"]
    assert sorted(r["id"] for r in children) == sorted(i.id for i in individuals if i.status != "pending")
    for row in children:
        individual = by_id[row["id"]]
        assert row["status"] == individual.status and row["operator"] == individual.operator
        assert number(row["val_bpb"]) == pytest.approx(individual.val_bpb, abs=1e-6)
        assert row["heldout_bpb"] == ""  # a child's first run never sees held-out
        assert row["parent"] == ",".join(individual.parents) and row["seed"] == str(individual.eval_seed)
        assert unescape(row["hypothesis"]) == individual.hypothesis and unescape(row["reason"]) == individual.reason
        assert row["verdict"] == individual.verdict
        assert number(row["seconds"]) == pytest.approx(individual.train_seconds, abs=0.05)
        assert row["steps"] == ("" if individual.steps is None else str(individual.steps))
    guard_rows = {}
    for row in rows:
        if row["kind"] != "child":
            guard_rows.setdefault(row["id"], []).append(row)
    records = state["guard"]["records"]
    seed_id = state["guard"]["champions"][0]
    assert set(guard_rows) == {i for i, r in records.items() if r["samples"] or r["transfer"] or r["audit"] or r["anchor"]}
    # The seed variant's anchor: one run on the evaluation seed, once the seed has been evaluated.
    anchor_rows = [r for r in guard_rows.get(seed_id, []) if r["kind"] == "anchor"]
    assert [r["seed"] for r in anchor_rows] == [str(by_id[seed_id].eval_seed)] * len(records[seed_id]["anchor"])
    for individual_id, record in records.items():
        samples = record["samples"] + record["transfer"] + record["audit"] + record["anchor"]
        mine = guard_rows.get(individual_id, [])
        assert sorted(int(r["seed"]) for r in mine) == sorted(s["seed"] for s in samples)
        expected_kind = ("noise", "anchor") if individual_id == seed_id else ("rerun",)
        assert {r["kind"] for r in mine} <= {*expected_kind, "transfer", "audit"}
        for row in mine:  # the same seed may serve a re-run and a transfer run: matched by both
            sample = next(s for s in samples if s["seed"] == int(row["seed"]) and s["kind"] == row["kind"])
            assert row["status"] == sample["status"]
            assert number(row["val_bpb"]) == pytest.approx(sample["val_bpb"], abs=1e-6)
            assert number(row["heldout_bpb"]) == pytest.approx(sample["heldout_bpb"], abs=1e-6)
            assert row["steps"] == str(sample["steps"]) and row["verdict"] == by_id[individual_id].verdict
    times = [r["time"] for r in rows]
    assert all(times) and times == sorted(times)
    return rows


def guarded_run(setup_run, max_evaluations=8):
    engine, run_dir = engine_with(setup_run, FakeExecutor(scored_with_a_summary, slots=2), ops={"perturb": Steps()},
                                  max_evaluations=max_evaluations, workers=2, guard=GUARD,
                                  operators={"perturb": 1.0})
    return engine, run_dir


def test_results_tsv_is_current_at_every_checkpoint_and_right_after_resume(setup_run):
    engine, run_dir = guarded_run(setup_run)
    seen = []
    checkpoint = engine.recorder.checkpoint

    def checked_checkpoint():
        checkpoint()
        if (run_dir / FILE_NAME).exists():
            rows = read_tsv(run_dir)
            assert len(rows) == engine.counters.evaluations + engine.counters.guard_runs
            seen.append(len(rows))

    engine.recorder.checkpoint = checked_checkpoint
    engine.run()
    rows = check_against_store(run_dir)
    assert seen and seen[-1] == len(rows) and len(set(seen)) > 3  # it grew with the run, not only at the end
    kinds = {r["kind"] for r in rows}
    assert {"child", "noise", "anchor", "rerun"} <= kinds, kinds  # the guard's runs are there too
    anchor, = [r for r in rows if r["kind"] == "anchor"]  # the seed's second draw on the evaluation seed
    assert anchor["id"] == rows[0]["id"] and anchor["seed"] == rows[0]["seed"] and anchor["heldout_bpb"] == ""
    crashed = [r for r in rows if r["status"] == "crash"]
    assert crashed and unescape(crashed[0]["reason"]) == "RuntimeError: bad\tthing\nsecond line"
    assert any("\\t" in r["hypothesis"] and "\\n" in r["hypothesis"] for r in rows)

    # A crash between the checkpoint and the TSV, or a TSV deleted by hand: resume puts it right.
    (run_dir / FILE_NAME).unlink()
    engine = resume_run(run_dir, ["stopping.max_evaluations=12"], log=lambda line: None)
    assert read_tsv(run_dir) == rows  # rewritten at resume's first checkpoint, before anything runs
    engine.executor = FakeExecutor(scored_with_a_summary, slots=2)
    engine.run()
    after = check_against_store(run_dir)
    assert after[:len(rows)] == rows and len(after) > len(rows)  # the old lines stay, the new ones follow


def test_printed_steps_reads_the_last_summary_line_only():
    assert printed_steps("num_steps: 3\n---\nnum_steps:        120\n") == 120
    assert printed_steps("step 10 | num_steps: 4") is None and printed_steps("") is None


def evo(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evo.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_status_json_states_the_facts_of_the_checkpoint(setup_run):
    engine, run_dir = guarded_run(setup_run)
    engine.run()
    proc = evo("status", str(run_dir), "--json", "--top", "3")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    individuals, state = RunStore(run_dir).load()
    counters, guard = state["counters"], state["guard"]
    assert doc["state"] == "finished" and doc["reason"] == "max_evaluations (8) reached"
    assert doc["counters"]["evaluations"] == counters["evaluations"] == 8
    assert doc["counters"]["guard_runs"] == counters["guard_runs"] and doc["counters"]["by_status"] == counters["by_status"]
    champion = doc["champion"]
    assert champion["id"] == guard["champions"][-1] and doc["champions"] == guard["champions"]
    samples = [s for s in guard["records"][champion["id"]]["samples"] if s["status"] == "ok"]
    assert champion["n"] == len(samples)
    assert champion["val_mean"] == pytest.approx(sum(s["val_bpb"] for s in samples) / len(samples))
    assert champion["held_mean"] == pytest.approx(sum(s["heldout_bpb"] for s in samples) / len(samples))
    assert champion["heldout_consulted"] == guard["heldout_consulted"] >= len(guard["champions"]) - 1  # each promotion looked
    assert champion["val_bpb"] == champion["val_mean"] and champion["val_bpb_is"] == "re-run mean"
    # The floor pools, by degrees of freedom, every variant's runs across the guard's seeds.
    runs = [[s["val_bpb"] for s in r["samples"] if s["status"] == "ok"] for r in guard["records"].values()]
    runs = [values for values in runs if len(values) >= 2]
    assert len(runs) > 1  # a candidate's re-runs joined the seed's noise runs
    pooled = sum(statistics.variance(values) * (len(values) - 1) for values in runs) / sum(len(v) - 1 for v in runs)
    assert doc["noise_floor_sigma"] == pytest.approx(math.sqrt(pooled))
    ok = [i for i in individuals if i.status == "ok"]
    best_first = min(ok, key=lambda i: i.val_bpb)
    assert doc["best_first_draw"]["id"] == best_first.id and doc["best_first_draw"]["val_bpb"] == best_first.val_bpb
    assert len(doc["best"]) == 3 and doc["best"][0]["score"] <= doc["best"][-1]["score"]
    failed = {f["id"]: f for f in doc["failed"]}
    assert set(failed) == {i.id for i in individuals if i.status not in ("ok", "pending")} and failed
    assert all(f["status"] == "crash" and f["reason"].endswith("second line") for f in failed.values())
    perturb = next(o for o in doc["operators"] if o["operator"] == "perturb")
    assert perturb["evaluated"] == 7 and perturb["ok"] == 7 - len(failed) and perturb["weight"]["share"] == 1.0
    assert doc["in_flight_or_queued"] == []


def test_export_any_variant_and_diff_two_by_id_number_or_prefix(setup_run, tmp_path):
    engine, run_dir = guarded_run(setup_run)
    engine.run()
    store = RunStore(run_dir)
    individuals = {i.id: i for i in store.load()[0]}
    ids = sorted(individuals)
    broken = next(i for i in individuals.values() if i.status == "crash")
    proc = evo("export", str(run_dir), "--id", broken.id.lstrip("v0"))  # by its number: "4" is v00004
    assert proc.returncode == 0, proc.stderr
    out = run_dir / f"export-{broken.id}"
    assert f"exported to {out}" in proc.stdout
    assert (out / "train.py").read_text() == store.code(broken.id)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["id"] == broken.id and meta["status"] == "crash" and meta["is_champion"] is False
    assert "+BROKEN" in (out / "seed.diff").read_text()
    assert evo("export", str(run_dir)).returncode == 0  # the default is still the champion, in export/
    assert json.loads((run_dir / "export" / "metadata.json").read_text())["is_champion"] is True

    proc = evo("diff", str(run_dir), "v00001", broken.id)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["--- v00001/train.py", f"+++ {broken.id}/train.py"]
    assert "-QUALITY = 0.5" in lines and f"+BROKEN = {json.loads(broken.details)['n']}" in lines
    same = evo("diff", str(run_dir), "1", "v00001")
    assert same.returncode == 0 and same.stdout == "" and "same code" in same.stderr

    ambiguous = sum(i.startswith("v0000") for i in ids)
    assert ambiguous > 1
    for args, message in ((["v00090"], "closest: v000"), (["v0000"], f"matches {ambiguous} variants"),
                          (["zzz"], f"ids run from v00001 to {ids[-1]}")):
        proc = evo("diff", str(run_dir), "v00001", *args)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = evo("export", str(run_dir), "--id", "v00042")
    assert proc.returncode == 2 and "no variant 'v00042'" in proc.stderr
    proc = evo("diff", str(tmp_path), "a", "b")
    assert proc.returncode == 2 and "not an evo run directory" in proc.stderr


def runs_table(folder) -> dict[str, list[str]]:
    proc = evo("runs", str(folder))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:5] == ["run", "state", "evaluations", "champion", "val_bpb"]
    return {line.split()[0].rsplit("/", 1)[-1]: line.split() for line in lines[1:]}


def test_runs_lists_running_finished_stopped_and_resumable_runs(held_seed, setup_run, tmp_path):
    # The held seed's clock runs while it waits: allowance enough for `evo runs` x3 on a busy machine.
    config_path, run_dir, ledger, flag = held_seed(max_evaluations=1, budget={"startup_grace": 600})
    runs = run_dir.parent
    config = load_config(config_path)
    # Beside it: a run stopped by a hard stop, and one whose engine never stopped cleanly.
    stopped = start_run(config.model_copy(update={"run": config.run.model_copy(update={"name": "stopped"})}),
                        config_path, log=lambda line: None)
    stopped.executor = FakeExecutor(by_quality, seconds=30)
    threading.Timer(1.0, stopped.stop, ("a test asked",)).start()
    stopped.run()
    start_run(config.model_copy(update={"run": config.run.model_copy(update={"name": "crashed"})}),
              config_path, log=lambda line: None)
    engine = subprocess.Popen([sys.executable, "-m", "evo.cli", "run", str(config_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (ledger.exists() and ledger.read_text().startswith("start")):
            assert time.time() < deadline and engine.poll() is None, "the seed never started"
            time.sleep(0.1)
        table = runs_table(runs)
        assert table["r"][1:3] == ["running", "0"] and f"pid {engine.pid}" in " ".join(table["r"])
        assert table["stopped"][1] == "stopped" and "a test asked" in " ".join(table["stopped"])
        assert table["crashed"][1] == "resumable" and "killed or crashed" in " ".join(table["crashed"])
        flag.unlink()
        _, stderr = engine.communicate(timeout=180)
    finally:
        engine.kill()
        engine.wait()
    assert engine.returncode == 0, stderr  # asking about it never disturbed the engine
    table = runs_table(runs)
    seed = RunStore(run_dir).load()[0][0]
    assert table["r"][1:5] == ["finished", "1", "v00001", f"{seed.val_bpb:.4f}"]
    assert "max_evaluations (1) reached" in " ".join(table["r"])
    assert not run_processes(run_tokens(run_dir))
    assert list(runs_table(run_dir)) == ["r"]  # a run directory itself lists just that run
    proc = evo("runs", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "no folder" in proc.stderr
