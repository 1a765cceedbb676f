"""LLM operators against a real HTTP server on 127.0.0.1, through the real openai client."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from pathlib import Path

import pytest

from evo.config import ConfigError, LLMSettings, load_config
from mutators import llm
from mutators.base import Context, Failure, Idea, Parent, Proposal, Refusal, Relative
from mutators.llm import LLMClient, LLMCrossover, LLMEdit
from tests.llm_server import ScriptedServer

PARENT = """import prepare

LR = 0.01
DEPTH = 4


def train():
    return LR * DEPTH
"""

GOOD_EDIT = """HYPOTHESIS: a larger learning rate trains faster in a short budget

<<<<<<< SEARCH
LR = 0.01
=======
LR = 0.02
>>>>>>> REPLACE
"""

MISSING_EDIT = """HYPOTHESIS: deeper
<<<<<<< SEARCH
DEPTH = 5
=======
DEPTH = 8
>>>>>>> REPLACE
"""


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(llm, "BACKOFF_SECONDS", 0.01)
    LLMClient._clients.clear()


def operator(server, tmp_path, cls=LLMEdit, **settings) -> LLMEdit:
    base = dict(base_url=server.base_url, models={"model-a": 1.0}, timeout=2.0, retries=2, api_key_env="EVO_TEST_KEY")
    tmp_path.mkdir(parents=True, exist_ok=True)  # the run directory
    return cls(LLMSettings(**{**base, **settings}), tmp_path)


def parent(code=PARENT, bpb=2.5):
    return Parent("v00001", code, bpb)


def test_a_good_edit_becomes_a_child_with_hypothesis_and_usage(tmp_path, monkeypatch):
    monkeypatch.setenv("EVO_TEST_KEY", "sk-local")
    with ScriptedServer([("reply", GOOD_EDIT)]) as server:
        proposal = operator(server, tmp_path).propose([parent()], random.Random(0), Context())
    assert isinstance(proposal, Proposal)
    assert "LR = 0.02" in proposal.code and "DEPTH = 4" in proposal.code
    assert proposal.hypothesis == "a larger learning rate trains faster in a short budget"
    usage = proposal.details["llm"]
    assert usage["total_tokens"] == 120 and usage["model"] == "model-a" and usage["latency_s"] >= 0
    assert json.loads((tmp_path / "llm_usage.json").read_text())["total_tokens"] == 120
    assert server.requests[0]["model"] == "model-a"


def test_search_text_that_does_not_match_gets_one_retry_that_shows_the_error(tmp_path):
    with ScriptedServer([("reply", MISSING_EDIT), ("reply", GOOD_EDIT)]) as server:
        proposal = operator(server, tmp_path).propose([parent()], random.Random(0))
        assert isinstance(proposal, Proposal) and "LR = 0.02" in proposal.code
        retry_prompt = server.requests[1]["messages"][-1]["content"]
    assert "does not appear in the file" in retry_prompt
    assert server.requests[1]["messages"][-2] == {"role": "assistant", "content": MISSING_EDIT}


def test_a_second_bad_reply_is_a_counted_refusal(tmp_path):
    ambiguous = "HYPOTHESIS: x\n<<<<<<< SEARCH\n\n=======\nX = 1\n>>>>>>> REPLACE\n"
    with ScriptedServer([("reply", MISSING_EDIT), ("reply", ambiguous)]) as server:
        result = operator(server, tmp_path).propose([parent()], random.Random(0))
    assert isinstance(result, Refusal) and "after a retry" in result.reason


@pytest.mark.parametrize("script, words, outage", [
    ([("reply", "I think you should try a bigger model!")] * 2, "no SEARCH/REPLACE blocks", False),
    ([("reply", "   ")], "empty reply", False),
    ([("garbage", "<html>not json</html>")], "unreadable response", False),
    ([("status", 500)] * 3, "server error (HTTP 500), after 3 attempts", True),
    ([("status", 429)] * 3, "rate limited (HTTP 429), after 3 attempts", True),
    ([("status", 400)], "request rejected (HTTP 400)", False),
    ([("status", 503), ("status", 400)], "request rejected (HTTP 400)", False),
    ([("sleep", 3.0)] * 3, "timeout after 2s", False),
])
def test_faults_are_refusals_with_reasons_and_only_the_servers_are_outages(tmp_path, script, words, outage):
    with ScriptedServer(script) as server:
        result = operator(server, tmp_path).propose([parent()], random.Random(0))
    assert isinstance(result, Refusal)
    assert words in result.reason
    assert result.outage is outage and not result.cancelled


def test_429_and_500_are_retried_with_backoff_then_succeed(tmp_path):
    with ScriptedServer([("status", 429), ("status", 502), ("reply", GOOD_EDIT)]) as server:
        result = operator(server, tmp_path).propose([parent()], random.Random(0))
        assert len(server.requests) == 3
    assert isinstance(result, Proposal)


def free_port() -> int:
    """A port nothing listens on (bound once, then let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_is_an_outage(tmp_path):
    settings = LLMSettings(base_url=f"http://127.0.0.1:{free_port()}/v1", retries=1, timeout=2.0)
    result = LLMEdit(settings, tmp_path).propose([parent()], random.Random(0))
    assert isinstance(result, Refusal) and "connection failed" in result.reason
    assert result.outage and not result.cancelled


def test_an_operator_proposes_again_once_its_server_is_back(tmp_path):
    port = free_port()
    settings = LLMSettings(base_url=f"http://127.0.0.1:{port}/v1", models={"model-a": 1.0}, retries=1, timeout=2.0)
    op = LLMEdit(settings, tmp_path)
    down = op.propose([parent()], random.Random(0))
    assert isinstance(down, Refusal) and down.outage
    with ScriptedServer([("reply", GOOD_EDIT)], port=port) as server:
        back = op.propose([parent()], random.Random(0))
        assert len(server.requests) == 1
    assert isinstance(back, Proposal) and "LR = 0.02" in back.code
    again = op.propose([parent()], random.Random(0))
    assert isinstance(again, Refusal) and again.outage


def set_later(event: threading.Event, seconds: float = 1.0) -> None:
    threading.Timer(seconds, event.set).start()


def request_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "evo-llm-request"]


def test_cancel_abandons_a_request_in_flight(tmp_path):
    cancel = threading.Event()
    with ScriptedServer([("sleep", 60.0, GOOD_EDIT)]) as server:
        op = operator(server, tmp_path, timeout=120.0)
        op.set_cancel(cancel)
        set_later(cancel)
        started = time.monotonic()
        result = op.propose([parent()], random.Random(0))
        elapsed = time.monotonic() - started
        assert len(server.requests) == 1
        assert all(t.daemon for t in request_threads())  # an abandoned request never blocks exit
    assert elapsed < 10, f"propose took {elapsed:.1f}s; the server would have taken 60s"
    assert isinstance(result, Refusal) and result.cancelled and not result.outage
    assert "cancelled" in result.reason


def test_cancel_ends_the_backoff_between_retries(tmp_path, monkeypatch):
    monkeypatch.setattr(llm, "BACKOFF_SECONDS", 60.0)
    cancel = threading.Event()
    with ScriptedServer([], default=("status", 503)) as server:
        op = operator(server, tmp_path, retries=3)
        op.set_cancel(cancel)
        set_later(cancel)
        started = time.monotonic()
        result = op.propose([parent()], random.Random(0))
        elapsed = time.monotonic() - started
        assert len(server.requests) == 1
    assert elapsed < 10, f"propose took {elapsed:.1f}s; the backoff was 60s"
    assert isinstance(result, Refusal) and result.cancelled and not result.outage
    assert "waiting to retry" in result.reason and "HTTP 503" in result.reason


@pytest.mark.parametrize("cls", [LLMEdit, LLMCrossover])
def test_a_cancelled_operator_sends_nothing(tmp_path, cls):
    cancel = threading.Event()
    cancel.set()
    with ScriptedServer([("reply", GOOD_EDIT)]) as server:
        op = operator(server, tmp_path, cls=cls)
        op.set_cancel(cancel)
        result = op.propose([parent(), Parent("v00002", PARENT.replace("4", "5"), 2.4)][: cls.parents_needed],
                            random.Random(0))
        assert server.requests == []
    assert isinstance(result, Refusal) and result.cancelled and not result.outage


def test_a_request_cancelled_while_waiting_for_a_slot_is_never_sent(tmp_path):
    with ScriptedServer([("sleep", 60.0, GOOD_EDIT), ("reply", GOOD_EDIT)]) as server:
        busy = operator(server, tmp_path, concurrent_requests=1, timeout=120.0)
        first = []
        holder = threading.Thread(target=lambda: first.append(busy.propose([parent()], random.Random(0))), daemon=True)
        holder.start()
        deadline = time.monotonic() + 30
        while not server.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(server.requests) == 1
        waiting = operator(server, tmp_path, concurrent_requests=1, timeout=120.0)
        assert waiting.client is busy.client  # one request cap per run
        cancel = threading.Event()
        waiting.set_cancel(cancel)
        set_later(cancel)
        result = waiting.propose([parent()], random.Random(0))
        assert isinstance(result, Refusal) and result.cancelled and "slot" in result.reason
        server.wake.set()  # the first request ends; its slot frees
        holder.join(30)
        for thread in request_threads():
            thread.join(30)
        assert isinstance(first[0], Proposal)
        assert len(server.requests) == 1


def test_a_child_that_does_not_compile_is_retried_then_refused(tmp_path):
    broken = "HYPOTHESIS: x\n<<<<<<< SEARCH\nLR = 0.01\n=======\nLR = = 0.02\n>>>>>>> REPLACE\n"
    with ScriptedServer([("reply", broken), ("reply", broken)]) as server:
        result = operator(server, tmp_path).propose([parent()], random.Random(0))
        assert "does not compile" in server.requests[1]["messages"][-1]["content"]
    assert isinstance(result, Refusal)


def test_whole_file_mode(tmp_path):
    reply = "HYPOTHESIS: rewrite\n```python\n" + PARENT.replace("DEPTH = 4", "DEPTH = 6") + "```\n"
    with ScriptedServer([("reply", reply)]) as server:
        result = operator(server, tmp_path, edit_format="full").propose([parent()], random.Random(0))
        assert "whole new file" in server.requests[0]["messages"][-1]["content"]
    assert isinstance(result, Proposal) and "DEPTH = 6" in result.code


def test_the_prompt_carries_program_relatives_failures_and_ideas(tmp_path):
    context = Context(
        relatives=[Relative("v00007", PARENT.replace("DEPTH = 4", "DEPTH = 3"), 2.31, 1)],
        failures=[Failure("v00004", "oom", "memory above the limit", "Traceback: RuntimeError: boom", "DEPTH 4 -> 64")],
        ideas=[Idea("perturb", "LR 0.01 -> 0.005", "val_bpb 2.6000 vs parent 2.5000")],
    )
    with ScriptedServer([("reply", GOOD_EDIT)]) as server:
        operator(server, tmp_path).propose([parent()], random.Random(0), context)
        prompt = server.requests[0]["messages"][1]["content"]
    program = (Path(__file__).resolve().parents[1] / "program.md").read_text()
    assert program.strip()[:200] in prompt
    assert "val_bpb 2.5000" in prompt and PARENT in prompt
    assert "-DEPTH = 4\n+DEPTH = 3" in prompt and "v00007" in prompt
    assert "oom" in prompt and "RuntimeError: boom" in prompt
    assert "LR 0.01 -> 0.005 -> val_bpb 2.6000 vs parent 2.5000" in prompt


def test_token_budget_switches_the_operator_off(tmp_path):
    with ScriptedServer([("reply", GOOD_EDIT)] * 3) as server:
        op = operator(server, tmp_path, token_budget=200)
        assert op.active
        assert isinstance(op.propose([parent()], random.Random(0)), Proposal)
        assert op.active  # 120 of 200 spent
        op.propose([parent()], random.Random(0))
        assert not op.active  # 240 of 200
        result = op.propose([parent()], random.Random(0))
        assert isinstance(result, Refusal) and "token budget" in result.reason
        assert len(server.requests) == 2


def test_llm_crossover_merges_two_parents(tmp_path):
    other = PARENT.replace("DEPTH = 4", "DEPTH = 2")
    merged = "HYPOTHESIS: B's depth with A's rate\n```python\n" + PARENT.replace("DEPTH = 4", "DEPTH = 2").replace("0.01", "0.015") + "```"
    with ScriptedServer([("reply", merged)]) as server:
        result = operator(server, tmp_path, cls=LLMCrossover).propose(
            [parent(), Parent("v00002", other, 2.4)], random.Random(0), Context())
        prompt = server.requests[0]["messages"][1]["content"]
    assert "val_bpb 2.5000" in prompt and "val_bpb 2.4000" in prompt and other in prompt
    assert isinstance(result, Proposal) and "0.015" in result.code and result.details["second_parent"] == "v00002"


def test_weighted_models(tmp_path):
    with ScriptedServer([("reply", GOOD_EDIT)] * 40) as server:
        op = operator(server, tmp_path, models={"big": 1.0, "small": 3.0, "off": 0.0})
        rng = random.Random(1)
        for _ in range(40):
            op.propose([parent()], rng)
        counts = {m: sum(r["model"] == m for r in server.requests) for m in ("big", "small", "off")}
    assert counts["off"] == 0 and counts["small"] > counts["big"] > 0


def test_max_outage_minutes_is_an_llm_setting_that_must_be_positive(tmp_path):
    assert LLMSettings().max_outage_minutes == 30
    path = tmp_path / "c.yaml"
    path.write_text("mutators:\n  llm:\n    max_outage_minutes: 0\n")
    with pytest.raises(ConfigError, match="mutators.llm.max_outage_minutes"):
        load_config(path)
    path.write_text("mutators:\n  llm:\n    max_outage_minutes: 2.5\n")
    assert load_config(path).mutators.llm.max_outage_minutes == 2.5


# ---- what the model was asked and answered ----

def transcripts(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "llm").glob("*.json"))]


def test_each_proposal_saves_its_prompt_and_reply_or_error_under_the_run_directory(tmp_path):
    with ScriptedServer([("reply", GOOD_EDIT), ("status", 400)]) as server:
        op = operator(server, tmp_path)
        proposal = op.propose([parent()], random.Random(0))
        refusal = op.propose([parent()], random.Random(0))
    assert isinstance(proposal, Proposal) and isinstance(refusal, Refusal)
    assert sorted(p.name for p in (tmp_path / "llm").iterdir()) == ["00001-llm.json", "00002-llm.json"]
    assert proposal.details["llm"]["transcript"] == "llm/00001-llm.json"
    good, bad = transcripts(tmp_path)
    assert good["model"] == "model-a" and good["operator"] == "llm" and good["parents"] == ["v00001"]
    assert [m["role"] for m in good["messages"]] == ["system", "user", "assistant"]
    assert PARENT in good["messages"][1]["content"] and good["messages"][2]["content"] == GOOD_EDIT
    assert good["outcome"] == "proposal" and good["usage"]["total_tokens"] == 120 and good["usage"]["latency_s"] >= 0
    assert good["requests"][0]["max_tokens"] == 4096 and good["hypothesis"].startswith("a larger learning rate")
    assert bad["outcome"] == "refused" and "HTTP 400" in bad["reason"] and "HTTP 400" in bad["requests"][0]["error"]
    assert [m["role"] for m in bad["messages"]] == ["system", "user"]  # what was asked, though nothing came back


def test_a_retry_is_saved_with_both_replies_and_the_error_shown(tmp_path):
    with ScriptedServer([("reply", MISSING_EDIT), ("reply", GOOD_EDIT)]) as server:
        operator(server, tmp_path).propose([parent()], random.Random(0))
    (saved,) = transcripts(tmp_path)
    assert [m["role"] for m in saved["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert "does not appear" in saved["requests"][0]["error"] and "error" not in saved["requests"][1]
    assert saved["usage"]["total_tokens"] == 240


def test_saved_transcripts_are_capped_and_numbering_continues_after_a_resume(tmp_path):
    huge = PARENT + "\n".join(f"X{n} = {n}  # padding" for n in range(20_000)) + "\n"
    with ScriptedServer([("status", 400)] * 2) as server:
        operator(server, tmp_path, context_tokens=1_000_000).propose([parent(huge)], random.Random(0))
        LLMClient._clients.clear()  # a resumed run: a new client over the same run directory
        operator(server, tmp_path, context_tokens=1_000_000).propose([parent(huge)], random.Random(0))
    assert sorted(p.name for p in (tmp_path / "llm").iterdir()) == ["00001-llm.json", "00002-llm.json"]
    assert len(huge) > 400_000
    for path in (tmp_path / "llm").iterdir():
        assert path.stat().st_size < 2 * llm.TRANSCRIPT_TEXT_LIMIT + 20_000
    assert "characters left out" in transcripts(tmp_path)[0]["messages"][1]["content"]


# ---- why proposals were refused ----

def test_refusal_reasons_are_shown_per_operator_and_tell_a_closed_port_from_a_long_prompt(tmp_path):
    from types import SimpleNamespace

    from evo.recorder import Counters, Recorder
    from evo.report import _refusal_lines

    (tmp_path / "a").mkdir()
    closed = LLMEdit(LLMSettings(base_url=f"http://127.0.0.1:{free_port()}/v1", retries=0, timeout=2.0), tmp_path / "a")
    down = closed.propose([parent()], random.Random(0))
    with ScriptedServer([("reply", GOOD_EDIT)]) as server:
        small = operator(server, tmp_path / "b", cls=LLMCrossover, context_tokens=200)
        too_long = small.propose([parent(), Parent("v00002", PARENT.replace("4", "5"), 2.4)], random.Random(0))
        assert server.requests == []  # never sent: it could only have been rejected
    counters = Counters(refusals={
        "llm": {down.reason: 4, "reply unusable after a retry: no SEARCH/REPLACE blocks found": 1},
        "llm_crossover": {too_long.reason: 2},
        "perturb": {"child is identical to its parent": 1},
    })
    top = Recorder.top_refusals(SimpleNamespace(counters=counters))
    assert top.startswith("llm: connection failed") and "(x4)" in top
    assert "; llm_crossover: prompt does not fit the model's context" in top and "context_tokens" in top
    assert "; perturb: child is identical to its parent (x1)" in top
    lines = _refusal_lines(counters)
    assert lines[1] == "refusal reasons (top 3 per operator):"
    assert lines[2].startswith("  llm: connection failed") and "no SEARCH/REPLACE" in lines[2]
    assert lines[3].startswith("  llm_crossover: prompt does not fit")
    assert _refusal_lines(Counters()) == []
    many = Counters(refusals={"llm": {f"reason {n}": n for n in range(1, 6)}})
    assert _refusal_lines(many)[2] == "  llm: reason 5 (x5), reason 4 (x4), reason 3 (x3), and 2 other reasons"


# ---- prompts ----

def test_whole_file_retry_asks_for_the_whole_file_not_search_text(tmp_path):
    rewrite = "HYPOTHESIS: rewrite\n```python\n" + PARENT.replace("DEPTH = 4", "DEPTH = 6") + "```\n"
    with ScriptedServer([("reply", "HYPOTHESIS: x\nno code here"), ("reply", rewrite)]) as server:
        result = operator(server, tmp_path, edit_format="full").propose([parent()], random.Random(0))
        retry = server.requests[1]["messages"][-1]["content"]
    assert isinstance(result, Proposal)
    assert "SEARCH" not in retry and "whole new file" in retry and "no ```python block" in retry


def test_diff_retry_still_asks_for_exact_search_text(tmp_path):
    with ScriptedServer([("reply", MISSING_EDIT), ("reply", GOOD_EDIT)]) as server:
        operator(server, tmp_path).propose([parent()], random.Random(0))
        assert "Copy SEARCH text exactly" in server.requests[1]["messages"][-1]["content"]


@pytest.mark.parametrize("cls", [LLMEdit, LLMCrossover])
def test_the_research_direction_heading_appears_once(tmp_path, cls):
    merged = "HYPOTHESIS: m\n```python\n" + PARENT.replace("DEPTH = 4", "DEPTH = 3") + "```"
    plain = tmp_path / "plain.md"
    plain.write_text("Try smaller models.\n")
    for n, program in enumerate(("program.md", str(plain))):
        LLMClient._clients.clear()
        with ScriptedServer([("reply", GOOD_EDIT if cls is LLMEdit else merged)]) as server:
            settings = LLMSettings(base_url=server.base_url, models={"m": 1.0}, timeout=2.0)
            (tmp_path / f"run{n}").mkdir()
            cls(settings, tmp_path / f"run{n}", program_path=program).propose(
                [parent(), Parent("v00002", PARENT.replace("4", "5"), 2.4)][: cls.parents_needed], random.Random(0))
            prompt = server.requests[0]["messages"][1]["content"]
        assert prompt.count("# Research direction") == 1, prompt[:300]
        assert prompt.startswith("# Research direction")


# ---- the prompt fits the model ----

def big_context() -> Context:
    tail = "Traceback (most recent call last):\n" + "  File train.py, line 9\n" * 40
    return Context(
        relatives=[Relative(f"v0001{n}", PARENT.replace("DEPTH = 4", f"DEPTH = {n}"), 2.3, 1) for n in range(2)],
        failures=[Failure(f"v0002{n}", "crash", "exit 1", tail, f"failure idea {n}") for n in range(3)],
        ideas=[Idea("perturb", f"idea number {n} " + "x" * 60, "crash") for n in range(30)],
    )


def test_a_small_context_drops_old_ideas_first_and_caps_max_tokens(tmp_path):
    with ScriptedServer([("reply", GOOD_EDIT)] * 2) as server:
        roomy = operator(server, tmp_path / "roomy", context_tokens=100_000).propose([parent()], random.Random(0), big_context())
        LLMClient._clients.clear()
        tight = operator(server, tmp_path / "tight", context_tokens=3500).propose([parent()], random.Random(0), big_context())
        full, small = server.requests
    assert isinstance(roomy, Proposal) and "fit" not in roomy.details["llm"]
    assert full["max_tokens"] == 4096
    assert isinstance(tight, Proposal)
    fit = tight.details["llm"]["fit"]
    assert fit["context_tokens"] == 3500 and fit["context_from"] == "mutators.llm.context_tokens"
    assert small["max_tokens"] == fit["max_tokens"] < 4096
    assert fit["prompt_tokens_estimate"] + fit["max_tokens"] <= 3500
    assert len(small["messages"][1]["content"]) < len(full["messages"][1]["content"])
    assert "idea number 0 " in small["messages"][1]["content"]  # the newest idea stays
    assert "idea number 29 " not in small["messages"][1]["content"]  # the oldest goes first
    assert fit["dropped"] == {"ideas": fit["dropped"]["ideas"]} and 1 <= fit["dropped"]["ideas"] < 30
    assert (tmp_path / "tight" / "llm" / "00001-llm.json").is_file()


def test_failures_then_relatives_go_when_dropping_ideas_is_not_enough(tmp_path):
    with ScriptedServer([("reply", GOOD_EDIT)]) as server:
        result = operator(server, tmp_path, context_tokens=2300).propose([parent()], random.Random(0), big_context())
        assert isinstance(result, Proposal), result
        prompt = server.requests[0]["messages"][1]["content"]
    fit = result.details["llm"]["fit"]
    assert fit["dropped"] == {"ideas": 30, "failures": 3}  # the relatives stay
    assert "idea number" not in prompt and "failure idea" not in prompt and "v00011" in prompt
    assert server.requests[0]["max_tokens"] == fit["max_tokens"] <= 2300 - fit["prompt_tokens_estimate"]


def test_a_prompt_that_cannot_fit_is_refused_before_sending_and_says_why(tmp_path):
    with ScriptedServer([("reply", GOOD_EDIT)]) as server:
        result = operator(server, tmp_path, context_tokens=600).propose([parent()], random.Random(0), big_context())
        assert server.requests == []
    assert isinstance(result, Refusal) and not result.outage
    assert "prompt does not fit the model's context" in result.reason and "600 tokens" in result.reason
    (saved,) = transcripts(tmp_path)
    assert saved["outcome"] == "refused" and saved["requests"] == []


@pytest.mark.parametrize("models, expected, source", [
    ([{"id": "model-a", "object": "model", "max_model_len": 3000}], 3000, "max_model_len"),  # vLLM
    ([{"id": "whatever.gguf", "object": "model", "meta": {"n_ctx_train": 3000}}], 3000, "n_ctx_train"),  # llama.cpp
    ([{"id": "model-a", "object": "model"}], llm.ASSUMED_CONTEXT_TOKENS, "assumed"),
    (None, llm.ASSUMED_CONTEXT_TOKENS, "assumed"),  # no listing at all
])
def test_the_context_length_comes_from_the_servers_model_listing(tmp_path, models, expected, source):
    with ScriptedServer([("reply", GOOD_EDIT)] * 2, models=models) as server:
        op = operator(server, tmp_path)
        op.propose([parent()], random.Random(0), big_context())
        op.propose([parent()], random.Random(0), big_context())
        bodies = server.requests
        listings = server.listings
    saved = transcripts(tmp_path)[0]["context"]
    assert saved["context_tokens"] == expected and source in saved["context_from"]
    assert listings == 1  # asked once per model, even when the server has no listing
    if expected == 3000:
        assert bodies[0]["max_tokens"] < 4096


# ---- a slow server ----

def test_a_read_timeout_is_final_exactly_one_request_is_sent(tmp_path):
    with ScriptedServer([], default=("sleep", 30.0, GOOD_EDIT)) as server:
        result = operator(server, tmp_path, timeout=1.0, retries=3).propose([parent()], random.Random(0))
        assert len(server.requests) == 1
    assert isinstance(result, Refusal) and not result.outage and not result.cancelled
    assert "timeout after 1s" in result.reason and "not sent again" in result.reason
    assert transcripts(tmp_path)[0]["outcome"] == "refused"


def test_connection_errors_are_still_retried(tmp_path):
    settings = LLMSettings(base_url=f"http://127.0.0.1:{free_port()}/v1", retries=2, timeout=2.0)
    result = LLMEdit(settings, tmp_path).propose([parent()], random.Random(0))
    assert result.outage and "after 3 attempts" in result.reason
    assert [r.get("error", "") for r in transcripts(tmp_path)[0]["requests"]][0].startswith("connection failed")


# ---- models weighted by their yield ----

def by_model(body: dict):
    return ("reply", GOOD_EDIT) if body["model"] == "good" else ("reply", "I would rather not.")


def test_model_weights_follow_recent_yield_with_a_floor_and_survive_a_resume(tmp_path):
    with ScriptedServer([], default=by_model) as server:
        op = operator(server, tmp_path, models={"good": 1.0, "bad": 1.0})
        assert op.weights() == {"good": 0.5, "bad": 0.5}
        rng = random.Random(3)
        results = [op.propose([parent()], rng) for _ in range(40)]
        weights = op.weights()
        LLMClient._clients.clear()  # a resumed run reads the yields back from llm_usage.json
        resumed = operator(server, tmp_path, models={"good": 1.0, "bad": 1.0}).weights()
    chosen = [r.details["llm"]["model"] if isinstance(r, Proposal) else "bad" for r in results]
    assert chosen[20:].count("good") > 3 * chosen[20:].count("bad")
    assert weights["good"] > 0.9 and weights["bad"] == llm.YIELD_FLOOR  # never zero: it can recover
    assert resumed == weights
    saved = json.loads((tmp_path / "llm_usage.json").read_text())["yield"]
    assert set(saved["bad"]) == {0} and 0 < len(saved["bad"]) <= llm.YIELD_WINDOW and len(saved["good"]) == llm.YIELD_WINDOW


def test_outages_do_not_count_against_a_models_yield_and_weights_can_stay_fixed(tmp_path):
    with ScriptedServer([("status", 503)] * 3) as server:
        op = operator(server, tmp_path, models={"a": 1.0, "b": 3.0})
        assert op.propose([parent()], random.Random(0)).outage
        assert op.weights() == {"a": 0.5, "b": 1.5}
    LLMClient._clients.clear()
    with ScriptedServer([], default=("reply", "no")) as server:
        fixed = operator(server, tmp_path / "fixed", models={"a": 1.0, "b": 3.0}, adapt_weights=False)
        for _ in range(3):
            fixed.propose([parent()], random.Random(0))
        assert fixed.weights() == {"a": 1.0, "b": 3.0}
