"""A run that explains itself: the untrained score, one word per number, guard work as it happens,
an honest time left, a hard max_hours, failed variants listed, held-out looks counted."""

from __future__ import annotations

import json
import math
import time

import pytest

from evo.config import GuardSection
from evo.executors.fake import FakeExecutor
from evo.explain import untrained_bpb
from evo.guard import Guard, GuardRun
from evo.report import export, status_text
from evo.store import RunStore
from tests.fakes import by_quality, engine_with, feed, scored
from trainer.runner import RunResult

GUARD = {"enabled": True, "noise_runs": 2, "reruns": 2, "z": 0.0, "min_delta": 0.0}
EVAL_TOKENS, EVAL_BYTES, VOCAB = 1000, 3000, 512  # small_data's vocabulary is 512
UNTRAINED = math.log(VOCAB) / math.log(2) * EVAL_TOKENS / EVAL_BYTES


def with_sizes(result: RunResult) -> RunResult:
    """As the evaluator reports it: how many tokens and bytes were scored."""
    result.metrics.update(eval_tokens=EVAL_TOKENS, eval_bytes=EVAL_BYTES)
    return result


# ---- the untrained score ----

def test_a_seed_that_did_not_learn_is_said_loudly_in_the_log_and_in_status(setup_run):
    lines = []
    engine, run_dir = engine_with(setup_run, FakeExecutor(lambda job: with_sizes(scored(job, UNTRAINED - 0.001))),
                                  max_evaluations=2, guard=GUARD)
    engine.log = lines.append
    engine.run()
    log = "\n".join(lines)
    assert "the seed v00001 DID NOT LEARN" in log and f"untrained score {UNTRAINED:.4f}" in log
    assert "scored on 1,000 val tokens (3,000 bytes)" in log  # what one evaluation amounts to
    status = status_text(run_dir)
    assert "DID NOT LEARN" in status and "budget.seconds" in status  # the fix, not only the symptom


def test_a_seed_that_learned_gets_no_warning(setup_run):
    lines = []
    engine, run_dir = engine_with(setup_run, FakeExecutor(lambda job: with_sizes(scored(job, UNTRAINED * 0.6))),
                                  max_evaluations=2, guard=GUARD)
    engine.log = lines.append
    engine.run()
    assert not any("DID NOT LEARN" in line for line in lines)
    assert "DID NOT LEARN" not in status_text(run_dir)


def test_untrained_bpb_is_what_the_evaluator_gives_a_uniform_guess(small_data):
    import torch

    import prepare

    tokenizer = prepare.get_tokenizer(str(small_data))
    rows = prepare.eval_rows(prepare._tokens("val", str(small_data)), 2048, 32)
    uniform = lambda x: torch.zeros(*x.shape, tokenizer.vocab_size)  # noqa: E731 - every token equally likely
    scored_ = prepare.score_rows(uniform, rows, 8, tokenizer.token_bytes, tokenizer.vocab_size, "cpu")
    metrics = {"eval_tokens": scored_["tokens"], "eval_bytes": scored_["bytes"]}
    assert scored_["loss"] == pytest.approx(math.log(tokenizer.vocab_size))
    assert untrained_bpb(metrics, tokenizer.vocab_size) == pytest.approx(scored_["bpb"], rel=1e-6)  # float32 logits


# ---- the noise floor ----

def test_a_noise_floor_of_zero_never_makes_a_difference_significant():
    lines = []
    guard = Guard(GuardSection(anchor=False, noise_runs=3, reruns=3, z=2.0, min_delta=0.0), log=lines.append)
    guard.start("seed", 6.0)
    feed(guard, {"seed": [(6.0, 6.1)] * 3})  # identical noise runs: measured sigma 0
    assert guard.measured_sigma() == 0.0 and guard.sigma() == guard.s.min_sigma
    assert any("WARNING" in line and "min_sigma" in line for line in lines)
    assert guard.consider("hair", 6.0 - guard.s.min_sigma) is False  # within 2 sigma of the floor
    assert guard.consider("clear", 5.9) is True
    feed(guard, {"clear": [(5.9995, 6.0)] * 3})  # re-runs a hair better, again without spread
    assert guard.records["clear"].verdict == "not significant"
    assert guard.champions == ["seed"]


# ---- held-out looks ----

def test_each_promotion_decision_that_reads_held_out_is_counted_and_survives_a_checkpoint():
    guard = Guard(GuardSection(anchor=False, noise_runs=2, reruns=2, z=0.0, min_delta=0.0, audit_runs=0), log=lambda line: None)
    guard.start("seed", 3.0)
    feed(guard, {"seed": [(3.0, 3.1), (3.02, 3.12)]})
    assert guard.heldout_consulted == 0
    guard.consider("a", 2.0)
    feed(guard, {"a": [(2.0, 3.5), (2.01, 3.5)]})  # held-out vetoes: it was read
    guard.consider("b", 3.5)  # not even a candidate: held-out not read
    guard.consider("c", 2.0)
    feed(guard, {"c": [(2.0, 2.1), (2.02, 2.12)]})
    assert [guard.records[k].verdict for k in ("a", "c")] == ["held-out disagrees", "promoted"]
    assert guard.heldout_consulted == 2
    restored = Guard(guard.s, log=lambda line: None)
    restored.restore(json.loads(json.dumps(guard.to_state())))
    assert restored.heldout_consulted == 2 and "consulted for 2 promotion decisions" in restored.heldout_note()


def test_status_and_export_show_the_held_out_count_beside_held_out_numbers(setup_run):
    engine, run_dir = engine_with(setup_run, FakeExecutor(lambda job: by_quality(job, noise=0.01)),
                                  max_evaluations=6, guard=GUARD)
    engine.run()
    consulted = engine.guard.heldout_consulted
    held_lines = [line for line in status_text(run_dir).splitlines() if "held-out " in line and "±" in line]
    assert held_lines and all(f"held-out consulted for {consulted} promotion decision" in line for line in held_lines)
    metadata = json.loads((export(run_dir) / "metadata.json").read_text())
    assert metadata["heldout_consulted"] == consulted


# ---- guard work as it happens, and time left ----

def test_guard_runs_are_logged_when_they_start_and_finish_with_their_val_number(setup_run):
    lines = []
    engine, _ = engine_with(setup_run, FakeExecutor(lambda job: scored(job, 2.5)), max_evaluations=1, guard=GUARD)
    engine.log = lines.append
    engine.run()
    started = [line for line in lines if line.startswith("guard: noise run of v00001 started")]
    finished = [line for line in lines if line.startswith("guard: noise run of v00001 finished: ok val_bpb 2.5000")]
    assert len(started) == 2 and len(finished) == 2
    assert not any("2.5500" in line for line in lines)  # the held-out number (val + 0.05) never reaches a log


def test_time_left_counts_the_guard_work_still_queued(setup_run):
    engine, _ = engine_with(setup_run, FakeExecutor(lambda job: scored(job, 2.5)), max_evaluations=1, guard=GUARD)
    engine.run()
    assert engine.snapshot().time_left == 0  # all children and guard runs done
    engine._draining = True
    engine.guard.queue += [GuardRun("v00001", 5000 + k, "rerun") for k in range(3)]
    snapshot = engine.snapshot()
    assert snapshot.guard_left == 3 and snapshot.time_left > 0  # the evaluations are done, the re-runs are not
    assert "guard runs left 3" in __import__("evo.progress", fromlist=["status_line"]).status_line(snapshot)


def test_max_hours_is_a_hard_stop_even_for_queued_guard_re_runs(setup_run):
    # Children are instant, guard runs take 30 s; after max_evaluations the run drains guard
    # work, and max_hours (3 s) must cut that short instead of waiting for every verdict.
    executor = FakeExecutor(lambda job: by_quality(job, noise=0.01), slots=1,
                            seconds=lambda job: 30.0 if job.kind != "child" else 0.0)
    engine, run_dir = engine_with(setup_run, executor, max_evaluations=2, guard=GUARD)
    engine.config.stopping.max_hours = 3 / 3600
    started = time.monotonic()
    reason = engine.run()
    assert time.monotonic() - started < 25
    assert reason.startswith("max_hours")
    _, state = RunStore(run_dir).load()
    assert state["guard"]["queue"]  # the guard work that was cut stays queued for `evo resume`


# ---- failures listed ----

def test_status_lists_failed_variants_with_status_and_reason(setup_run):
    def score(job):
        if job.individual == "v00001":
            return scored(job, 3.0)
        return RunResult(status="crash", reason=f"RuntimeError: deliberate failure of {job.individual}\n" + "x" * 500)

    engine, run_dir = engine_with(setup_run, FakeExecutor(score), max_evaluations=15)
    engine.run()
    text = status_text(run_dir)
    assert "failed variants (14; newest first, 10 shown)" in text
    listed = [line for line in text.splitlines() if "deliberate failure" in line]
    assert len(listed) == 10 and all(" crash " in line and len(line) < 180 for line in listed)
    assert "deliberate failure of v00015" in listed[0]
