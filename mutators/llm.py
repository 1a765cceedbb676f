"""LLM operators over any OpenAI-compatible chat-completions server (OpenAI, vLLM, Ollama,
llama.cpp's server), through the official openai client.

Every fault (refused connection, timeout, 429, 5xx, an empty or malformed reply, an edit that
does not apply) ends as a refusal with its reason; the run never stops for one. Refusals whose
every attempt failed for the server's sake (no connection, 429 or 5xx, retried with backoff)
carry `outage=True`: the engine backs off and retries the operator instead of counting them
against it. An HTTP 4xx other than 429, an empty or malformed reply, or an edit that does not
apply is the proposal's failure (`outage=False`). So is a read timeout: the request reached the
server, which may still be generating it, so it is never sent again (a retry would only queue
behind the abandoned one on a slow local server and time out too).

Prompts fit the model: its context length comes from `context_tokens`, else the server's
`GET /v1/models`, else 8192 is assumed. A prompt that is too long loses the oldest ideas, then
the oldest failures, then the weakest relatives, and max_tokens is capped to the room left; the
proposal's details say so (`llm.fit`). Every proposal's conversation (messages, replies or the
error, model, tokens, latency, outcome) is saved as RUN_DIR/llm/<n>-<operator>.json.

Cancelling: the engine hands its stop event to each LLM operator once, with
`operator.set_cancel(event)` (edit and crossover each take it; they share one client). When the
event is set, the backoff between retries ends at once, a request in flight is abandoned within
about 0.1 s, and `propose` returns `Refusal(..., cancelled=True)`. A request runs in a daemon
thread, so an abandoned one never holds up the interpreter's exit; it ends with the server's
reply or the client's timeout, and its tokens, if any, are not counted.

Prompts are built from the templates in mutators/prompts/ and only ever carry validation
numbers and log tails, never held-out results.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from string import Template

import openai

from mutators.base import Context, Parent, Proposal, Refusal, checked

PROMPTS = Path(__file__).resolve().parent / "prompts"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
BACKOFF_SECONDS = 1.0  # first retry waits this long, then doubles
TRANSCRIPT_TEXT_LIMIT = 40_000  # characters kept of any one message in a saved transcript (head and tail)
ASSUMED_CONTEXT_TOKENS = 8192  # when neither the config nor the server's model listing gives one
CHARS_PER_TOKEN = 3.5  # prompt size estimate: a little below the usual 4, since code packs tighter
MESSAGE_OVERHEAD_TOKENS = 8  # per chat message (role, separators)
SAFETY_TOKENS = 64  # kept free of prompt and reply, for the estimate's error: this or 5% of the context
MIN_DIFF_REPLY_TOKENS = 1024  # the least room worth asking for SEARCH/REPLACE edits in
YIELD_WINDOW = 20  # a model's last this many answered proposals make its recent yield
YIELD_FLOOR = 0.1  # a model's weight never falls below this share of its configured weight


def template(name: str) -> Template:
    return Template((PROMPTS / name).read_text())


class LLMFailure(Exception):
    """A request that did not produce a usable reply; str(e) is the counted reason.

    `outage`: every attempt failed for the server's sake (unreachable, timeout, 429, 5xx).
    `cancelled`: the cancel event was set before a reply came.
    """

    def __init__(self, reason: str, outage: bool = False, cancelled: bool = False):
        super().__init__(reason)
        self.outage = outage
        self.cancelled = cancelled


NEVER = threading.Event()  # the cancel event of a client nobody cancels
CANCEL_POLL_SECONDS = 0.1  # how often a caller waiting for a reply looks at the cancel event


@dataclass
class Reply:
    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float


class Usage:
    """Token totals for the run, persisted in the run directory so budgets survive a resume."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.data = json.loads(path.read_text()) if path.is_file() else {
            "requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "by_model": {}}

    def add(self, model: str, prompt: int, completion: int) -> None:
        with self.lock:
            for bucket in (self.data, self.data["by_model"].setdefault(model, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})):
                bucket["requests"] += 1
                bucket["prompt_tokens"] += prompt
                bucket["completion_tokens"] += completion
                bucket["total_tokens"] += prompt + completion
            from trainer.files import write_atomic  # imported here: keeps this change to the lines it replaces
            write_atomic(self.path, json.dumps(self.data, indent=2))

    @property
    def total(self) -> int:
        return self.data["total_tokens"]

    def answered(self, model: str, usable: bool) -> None:
        """One more answered proposal of `model`: did its reply become a child?"""
        with self.lock:
            recent = self.data.setdefault("yield", {}).setdefault(model, [])
            recent.append(int(usable))
            del recent[:-YIELD_WINDOW]
            from trainer.files import write_atomic
            write_atomic(self.path, json.dumps(self.data, indent=2))

    def yield_of(self, model: str) -> float:
        """Usable replies over its recent answered proposals, with one of each assumed (a model
        not yet heard from has 0.5, as does every other one at the start)."""
        with self.lock:
            recent = list(self.data.get("yield", {}).get(model, []))
        return (sum(recent) + 1) / (len(recent) + 2)


class LLMClient:
    """The openai client with our retries and backoff, a cap on concurrent requests, and usage."""

    _clients: dict[tuple, "LLMClient"] = {}

    def __init__(self, settings, run_dir: Path):
        self.settings = settings
        api_key = os.environ.get(settings.api_key_env) or "unused"  # local servers take any key
        self.client = openai.OpenAI(base_url=settings.base_url, api_key=api_key, timeout=settings.timeout, max_retries=0)
        self.slots = threading.BoundedSemaphore(settings.concurrent_requests)
        self.usage = Usage(Path(run_dir) / "llm_usage.json")
        self.transcripts = Path(run_dir) / "llm"
        self.lock = threading.Lock()
        self._numbered = max((int(p.name.split("-", 1)[0]) for p in self.transcripts.glob("*-*.json")
                              if p.name.split("-", 1)[0].isdigit()), default=0)  # resume continues the numbering
        self._contexts: dict[str, tuple[int, str]] = {}

    @classmethod
    def shared(cls, settings, run_dir: Path) -> "LLMClient":
        """One client per run, so edit and crossover share the request cap and the usage file."""
        key = (str(run_dir), settings.model_dump_json())
        if key not in cls._clients:
            cls._clients[key] = cls(settings, run_dir)
        return cls._clients[key]

    def save_transcript(self, operator: str, record: dict) -> str:
        """RUN_DIR/llm/<n>-<operator>.json, atomically; returns its path relative to the run directory."""
        from trainer.files import write_atomic
        with self.lock:
            self._numbered += 1
            name = f"{self._numbered:05d}-{operator}.json"
        self.transcripts.mkdir(parents=True, exist_ok=True)
        write_atomic(self.transcripts / name, json.dumps(record, indent=1))
        return f"llm/{name}"

    def context_tokens(self, model: str) -> tuple[int, str]:
        """(the model's context length, where that number comes from), asked once per model."""
        if self.settings.context_tokens:
            return self.settings.context_tokens, "mutators.llm.context_tokens"
        with self.lock:
            if model in self._contexts:
                return self._contexts[model]
        found = self._listed_context(model)
        if found is None:  # the server could not be reached: assume, and ask again next time
            return ASSUMED_CONTEXT_TOKENS, "assumed (the server's /v1/models could not be reached)"
        with self.lock:
            self._contexts[model] = found
        return found

    def _listed_context(self, model: str) -> tuple[int, str] | None:
        """The context length that `GET /v1/models` gives for `model` (vLLM: max_model_len;
        llama.cpp: meta.n_ctx_train; others: context_length and the like); None if unreadable."""
        try:
            raw = self.client.with_options(timeout=min(10.0, self.settings.timeout), max_retries=0).models.with_raw_response.list()
            entries = json.loads(raw.text).get("data") or []
        except openai.APIConnectionError:  # not reached this time: ask again next time
            return None
        except (openai.OpenAIError, ValueError, AttributeError):  # answered, without a listing
            entries = []
        entries = [e for e in entries if isinstance(e, dict)]
        entry = next((e for e in entries if e.get("id") == model), entries[0] if len(entries) == 1 else None)
        for key in ("max_model_len", "context_length", "max_context_length", "context_window", "n_ctx", "n_ctx_train"):
            for where in (entry or {}, (entry or {}).get("meta") or {}):
                value = where.get(key) if isinstance(where, dict) else None
                if isinstance(value, int) and value > 0:
                    return value, f"the server's /v1/models ({key})"
        return (ASSUMED_CONTEXT_TOKENS,
                f"assumed (the server's /v1/models gives no context length for {model}; set mutators.llm.context_tokens)")

    def chat(self, messages: list[dict], model: str, cancel: threading.Event = NEVER, max_tokens: int | None = None) -> Reply:
        reason = "no attempt made"
        for attempt in range(self.settings.retries + 1):
            if cancel.is_set():
                raise LLMFailure("cancelled before the request was sent", cancelled=True)
            if attempt and cancel.wait(BACKOFF_SECONDS * 2 ** (attempt - 1)):
                raise LLMFailure(f"cancelled while waiting to retry ({reason})", cancelled=True)
            started = time.monotonic()
            try:
                response = self._create(cancel, model=model, messages=messages,
                                        temperature=self.settings.temperature, max_tokens=max_tokens or self.settings.max_tokens)
            except openai.APITimeoutError as e:
                if type(e.__cause__).__name__ in ("ConnectTimeout", "PoolTimeout"):  # never reached the server
                    reason = f"connection failed (timeout after {self.settings.timeout:.0f}s)"
                    continue
                # The request reached the server, which may still be generating it: sending it again
                # would only queue behind it. Final for this proposal, and not an outage.
                raise LLMFailure(f"timeout after {self.settings.timeout:.0f}s waiting for the reply; not sent again, "
                                 "the server may still be busy with it (slow server: raise mutators.llm.timeout "
                                 "or lower max_tokens)") from None
            except openai.APIConnectionError as e:
                reason = f"connection failed ({e.__cause__ or e})"
                continue
            except openai.RateLimitError:
                reason = "rate limited (HTTP 429)"
                continue
            except openai.APIStatusError as e:
                reason = f"server error (HTTP {e.status_code})"
                if e.status_code >= 500:
                    continue
                raise LLMFailure(f"request rejected (HTTP {e.status_code}): {str(e)[:200]}") from None
            except (ValueError, TypeError) as e:  # an answer that is not chat-completions JSON
                raise LLMFailure(f"unreadable response: {e}") from None
            if not hasattr(response, "choices"):  # e.g. an HTML error page served with status 200
                raise LLMFailure(f"unreadable response: not chat-completions JSON ({str(response)[:80]!r})")
            usage = response.usage
            prompt = usage.prompt_tokens if usage else 0
            completion = usage.completion_tokens if usage else 0
            self.usage.add(model, prompt, completion)
            choices = getattr(response, "choices", None) or []
            text = choices[0].message.content if choices and choices[0].message else None
            if not text or not text.strip():
                raise LLMFailure("empty reply")
            return Reply(text, model, prompt, completion, time.monotonic() - started)
        # Only the server's faults are retried, so every attempt failed for the server's sake.
        raise LLMFailure(f"{reason}, after {self.settings.retries + 1} attempts", outage=True)

    def _create(self, cancel: threading.Event, **request):
        """One request in a daemon thread, so that the caller can walk away when `cancel` is set.

        The thread takes a slot of the request cap and keeps it until the request ends, even if
        abandoned: the server is still busy with it.
        """
        done = threading.Event()
        outcome: dict = {}

        def send():
            try:
                with self.slots:
                    if not cancel.is_set():
                        outcome["sent"] = True
                        outcome["response"] = self.client.chat.completions.create(**request)
            except BaseException as e:  # handed to the caller, raised there
                outcome["error"] = e
            finally:
                done.set()

        threading.Thread(target=send, name="evo-llm-request", daemon=True).start()
        while not done.wait(CANCEL_POLL_SECONDS) and not cancel.is_set():
            pass
        if "error" in outcome:
            raise outcome["error"]
        if "response" in outcome:
            return outcome["response"]
        where = "the LLM server" if outcome.get("sent") else "a request slot"
        raise LLMFailure(f"cancelled while waiting for {where}", cancelled=True)


# ---- reading replies ----

_HYPOTHESIS = re.compile(r"^\s*HYPOTHESIS:\s*(.+)$", re.MULTILINE)
_BLOCK = re.compile(r"<<<<<<< SEARCH\n(.*?)\n?=======\n(.*?)\n?>>>>>>> REPLACE", re.DOTALL)
_FENCE = re.compile(r"```(?:python|py)?\n(.*?)```", re.DOTALL)


class ReplyError(ValueError):
    """A reply that cannot be turned into a child; the message is shown to the model on retry."""


def hypothesis_of(text: str) -> str:
    match = _HYPOTHESIS.search(text)
    return match.group(1).strip()[:300] if match else ""


def apply_edits(code: str, text: str) -> str:
    blocks = _BLOCK.findall(text)
    if not blocks:
        raise ReplyError("no SEARCH/REPLACE blocks found")
    for n, (search, replace) in enumerate(blocks, 1):
        count = code.count(search) if search else 0
        if count != 1:
            where = "does not appear in" if count == 0 else f"appears {count} times in"
            raise ReplyError(f"the SEARCH text of block {n} {where} the file; it must match exactly once")
        code = code.replace(search, replace, 1)
    return code


def whole_file(text: str) -> str:
    blocks = _FENCE.findall(text)
    if not blocks:
        raise ReplyError("no ```python block with the whole file found")
    return max(blocks, key=len)


def _must_compile(code: str) -> None:
    try:
        compile(code, "train.py", "exec")
    except SyntaxError as e:
        raise ReplyError(f"the result does not compile: line {e.lineno}: {e.msg}") from None


# ---- the operators ----


class _LLMOperator:
    wants_context = True

    def __init__(self, settings, run_dir: str | Path, program_path: str = "program.md"):
        self.settings = settings
        self.client = LLMClient.shared(settings, Path(run_dir))
        path = Path(program_path)
        if not path.is_file():
            path = PACKAGE_ROOT / program_path
        self.program = path.read_text() if path.is_file() else "(no research direction given)"
        self.cancel = NEVER

    def set_cancel(self, event: threading.Event) -> None:
        """The engine's stop event: once set, `propose` returns a cancelled refusal promptly."""
        self.cancel = event

    @property
    def active(self) -> bool:
        budget = self.settings.token_budget
        return budget is None or self.client.usage.total < budget

    def weights(self) -> dict[str, float]:
        """The configured weights, each scaled by its model's recent yield (never below
        YIELD_FLOOR of it, so a model that failed for a while is still tried and can recover)."""
        models = self.settings.models
        if not self.settings.adapt_weights:
            return dict(models)
        usage = self.client.usage
        return {name: round(w * max(YIELD_FLOOR, usage.yield_of(name)), 4) for name, w in models.items()}

    def _model(self, rng: random.Random) -> tuple[str, dict[str, float]]:
        weights = self.weights()
        names = list(weights)
        return rng.choices(names, [weights[n] for n in names])[0], weights

    def _program(self) -> str:
        """program.md under one "Research direction" heading: its own if it has one."""
        text = self.program.strip()
        return text if text.startswith("# ") else f"# Research direction\n\n{text}"

    def _fit(self, build, context: Context, model: str, min_reply: int, record: dict) -> tuple[list[dict], int]:
        """The messages and max_tokens that fit the model's context.

        What goes first when the prompt is too long: the oldest ideas, then the oldest failures,
        then the weakest relatives. max_tokens is capped to the room left. Raises LLMFailure
        when even the bare prompt leaves less than `min_reply` tokens for the reply.
        """
        limit, source = self.client.context_tokens(model)
        dropped = {"ideas": 0, "failures": 0, "relatives": 0}
        while True:
            messages = [{"role": "system", "content": template("system.md").substitute()},
                        {"role": "user", "content": build(context)}]
            prompt = estimate_tokens(messages)
            room = limit - prompt - _margin(limit)
            if room >= min(min_reply, self.settings.max_tokens):
                break
            kind = next((k for k in ("ideas", "failures", "relatives") if getattr(context, k)), None)
            if kind is None:
                raise LLMFailure(
                    f"prompt does not fit the model's context: about {prompt} prompt tokens + at least "
                    f"{min(min_reply, self.settings.max_tokens)} for the reply > {limit} tokens ({source}); "
                    "shorten program.md or set mutators.llm.context_tokens")
            context = dataclasses.replace(context, **{kind: getattr(context, kind)[:-1]})
            dropped[kind] += 1
        max_tokens = min(self.settings.max_tokens, room)
        fit = {"context_tokens": limit, "context_from": source, "prompt_tokens_estimate": prompt, "max_tokens": max_tokens}
        if any(dropped.values()) or max_tokens < self.settings.max_tokens:
            fit["dropped"] = {k: v for k, v in dropped.items() if v}
            record["fit"] = fit  # it had to: the proposal's details say so
        record["context"] = fit
        return messages, max_tokens

    def _converse(self, messages: list[dict], model: str, read, max_tokens: int, min_reply: int,
                  record: dict) -> tuple[str, str, dict]:
        """Ask; if the reply cannot be used, show the model the error once and ask again."""
        totals = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "latency_s": 0.0, "model": model}
        record["usage"] = totals
        limit = record["context"]["context_tokens"]
        for attempt in range(2):
            record["messages"] = messages
            request = {"max_tokens": max_tokens, "prompt_tokens_estimate": estimate_tokens(messages)}
            record["requests"].append(request)
            try:
                reply = self.client.chat(messages, model, self.cancel, max_tokens=max_tokens)
            except LLMFailure as e:
                request["error"] = str(e)
                raise
            request.update(prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens,
                           latency_s=round(reply.latency_s, 3))
            totals["prompt_tokens"] += reply.prompt_tokens
            totals["completion_tokens"] += reply.completion_tokens
            totals["total_tokens"] += reply.prompt_tokens + reply.completion_tokens
            totals["latency_s"] = round(totals["latency_s"] + reply.latency_s, 3)
            messages = messages + [{"role": "assistant", "content": reply.text}]
            record["messages"] = messages
            try:
                code = read(reply.text)
                _must_compile(code)
                return code, hypothesis_of(reply.text), totals
            except ReplyError as e:
                request["error"] = str(e)
                if attempt == 1:
                    raise LLMFailure(f"reply unusable after a retry: {e}") from None
                hint = ("Give the whole new file again in one ```python fenced block." if read is whole_file
                        else "Copy SEARCH text exactly from the parent shown above.")
                messages = messages + [{"role": "user", "content": template("retry.md").substitute(error=str(e), hint=hint)}]
                room = limit - estimate_tokens(messages) - _margin(limit)
                if room < min(min_reply, self.settings.max_tokens):
                    raise LLMFailure(f"reply unusable ({e}), and the model's context ({limit} tokens) has no room "
                                     "left for a retry") from None
                max_tokens = min(self.settings.max_tokens, room)
        raise AssertionError("unreachable")

    def _propose(self, build, context: Context, rng: random.Random, read, parents: list[Parent],
                 extra: dict, min_reply: int) -> Proposal | Refusal:
        """`build(context) -> prompt`; the context is trimmed until the prompt fits the model."""
        if not self.active:
            return Refusal(self.name, "token budget spent")
        model, weights = self._model(rng)
        record = {"operator": self.name, "model": model, "weights": weights, "parents": [p.id for p in parents],
                  "started_at": round(time.time(), 3), "requests": [], "messages": []}
        try:
            messages, max_tokens = self._fit(build, context, model, min_reply, record)
            code, hypothesis, usage = self._converse(messages, model, read, max_tokens, min_reply, record)
        except LLMFailure as e:
            record.update(outcome="cancelled" if e.cancelled else "outage" if e.outage else "refused", reason=str(e))
            if record["requests"] and not (e.cancelled or e.outage):  # the model was asked and let us down
                self.client.usage.answered(model, usable=False)
            self._save(record)
            return Refusal(self.name, str(e), outage=e.outage, cancelled=e.cancelled)
        details = {**extra, "llm": {**usage, **({"fit": record["fit"]} if "fit" in record else {})}}
        result = checked(Proposal(code, self.name, details, hypothesis or "(no hypothesis stated)"), parents[0].code)
        record.update(outcome="proposal" if isinstance(result, Proposal) else "refused",
                      reason=getattr(result, "reason", ""), hypothesis=hypothesis)
        self.client.usage.answered(model, usable=isinstance(result, Proposal))
        path = self._save(record)
        if path and isinstance(result, Proposal):
            result.details["llm"]["transcript"] = path
        return result

    def _save(self, record: dict) -> str:
        """Save what the model was asked and answered; a failure to save never costs the proposal."""
        record["finished_at"] = round(time.time(), 3)
        record["messages"] = [{**m, "content": _capped(m["content"])} for m in record["messages"]]
        try:
            return self.client.save_transcript(self.name, record)
        except OSError:
            return ""


def _margin(context_tokens: int) -> int:
    return max(SAFETY_TOKENS, context_tokens // 20)


def estimate_tokens(messages: list[dict]) -> int:
    """About how many tokens a chat prompt takes (no tokenizer of the server's model at hand)."""
    return sum(math.ceil(len(m["content"]) / CHARS_PER_TOKEN) + MESSAGE_OVERHEAD_TOKENS for m in messages)


def _capped(text: str, limit: int = TRANSCRIPT_TEXT_LIMIT) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n... ({len(text) - 2 * half} characters left out) ...\n{text[-half:]}"


def _bpb(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "not measured"


def _diff(a: str, b: str, limit: int = 3000) -> str:
    text = "".join(difflib.unified_diff(a.splitlines(True), b.splitlines(True), "parent", "relative", n=1))
    return text if len(text) <= limit else text[:limit] + "\n... (diff truncated)\n"


def render_context(parent: Parent, context: Context | None) -> dict[str, str]:
    context = context or Context()
    relatives = "\n\n".join(
        f"## {r.id} (island {r.island}, val_bpb {_bpb(r.val_bpb)})\n```diff\n{_diff(parent.code, r.code)}```"
        for r in context.relatives if r.code != parent.code
    ) or "(none yet)"
    failures = "\n\n".join(
        f"## {f.id}: {f.status}" + (f" ({f.reason})" if f.reason else "")
        + (f"\nIdea: {f.hypothesis}" if f.hypothesis else "") + f"\n```\n{f.log_tail}\n```"
        for f in context.failures
    ) or "(none)"
    ideas = "\n".join(f"- [{i.operator}] {i.hypothesis} -> {i.outcome}" for i in context.ideas) or "(none yet)"
    return {"relatives": relatives, "failures": failures, "ideas": ideas}


def _whole_file_reply_tokens(code: str) -> int:
    """The least room a reply that repeats the whole file needs."""
    return math.ceil(len(code) / CHARS_PER_TOKEN) + 128


class LLMEdit(_LLMOperator):
    """SEARCH/REPLACE edits (or a whole file) to one parent."""

    name = "llm"
    parents_needed = 1

    def propose(self, parents: list[Parent], rng: random.Random, context: Context | None = None) -> Proposal | Refusal:
        parent = parents[0]
        full = self.settings.edit_format == "full"

        def build(ctx: Context) -> str:
            return template("edit.md").substitute(
                program=self._program(), parent_bpb=_bpb(parent.val_bpb), parent_code=parent.code,
                format=template("format_full.md" if full else "format_diff.md").substitute(),
                **render_context(parent, ctx),
            )

        read = whole_file if full else (lambda text: apply_edits(parent.code, text))
        min_reply = _whole_file_reply_tokens(parent.code) if full else MIN_DIFF_REPLY_TOKENS
        return self._propose(build, context or Context(), rng, read, parents, {"format": self.settings.edit_format}, min_reply)


class LLMCrossover(_LLMOperator):
    """Two parents and their numbers in one prompt; a merged file back."""

    name = "llm_crossover"
    parents_needed = 2

    def propose(self, parents: list[Parent], rng: random.Random, context: Context | None = None) -> Proposal | Refusal:
        a, b = parents
        if a.code == b.code:
            return Refusal(self.name, "both parents are the same variant")

        def build(ctx: Context) -> str:
            return template("crossover.md").substitute(
                program=self._program(), a_bpb=_bpb(a.val_bpb), a_code=a.code, b_bpb=_bpb(b.val_bpb), b_code=b.code,
                ideas=render_context(a, ctx)["ideas"],
            )

        # Only the ideas are shown to a crossover: drop nothing else.
        context = Context(ideas=(context or Context()).ideas)
        return self._propose(build, context, rng, whole_file, parents, {"second_parent": b.id},
                             _whole_file_reply_tokens(max(a.code, b.code, key=len)))
