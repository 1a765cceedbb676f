"""Run one variant: sandboxed training, a hand-over, a score from the evaluator, a plain record.

One evaluation, in phases, each on the runner's own clock:
  start-up   the launcher imports torch and prepare (not charged) and says "started";
  training   the variant's own code, until evaluate_bpb hands the model over; past
             budget + startup_grace it is killed (`over_budget`);
  scoring    the evaluator (a separate process) scores the handed-over file within eval_grace
             and the score is sent back to the variant, which may print it;
  exit       a short grace for the variant to print and exit, then everything is killed.
The training process runs in the sandbox (trainer/sandbox.py) when bubblewrap works here, with
its stdout/stderr going to a size-capped log the runner writes, and its memory summed over every
process it started. Everything the runner keeps for the engine (train.py, log.txt, result.json,
metrics.json) lives in the variant's folder, outside `work/`, the only folder it may write.

The runner never raises for a variant's failure: that is data (the result's status). It raises
only when no evaluation can be trusted any more (prepare.py or the data changed under it) or the
caller cancelled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import prepare
from trainer import processes, sandbox
from trainer.evaluator import Evaluator, EvaluatorFailed  # noqa: F401  (EvaluatorFailed: callers catch it here)
from trainer.files import write_atomic
from trainer.precheck import precheck

STATUSES = ("ok", "syntax", "import", "crash", "nan", "timeout", "over_budget", "oom", "export_failed",
            "no_metrics", "tampered")

POLL_SECONDS = 0.2
EXIT_GRACE = 30.0  # after the score is back, for printing a summary and exiting
LAUNCH_SECONDS = 120.0  # evo's own imports before the variant's first line, on a busy machine too
MESSAGE_LIMIT = 64 * 1024  # bytes of one hand-over message; longer lines are dropped
MAX_PROCESSES = 1024  # processes one variant may have at once (cgroups' pids.max would be firmer)
REASON_LIMIT = 2000  # characters of a reason kept in the record
_WARNED: set[str] = set()


class RunCancelled(Exception):
    """The caller asked the run to stop (Ctrl-C); its processes are dead, no result is recorded."""


class EvaluationUntrusted(RuntimeError):
    """Something every evaluation depends on changed: no score can be compared with earlier ones."""


class PrepareChanged(EvaluationUntrusted):
    """prepare.py is not the file the run started with."""


class DataChanged(EvaluationUntrusted):
    """The data directory is not the data the run started with."""


class SandboxUnavailable(RuntimeError):
    """The sandbox was required (evaluation.sandbox: bubblewrap) but cannot be built here."""


@dataclass
class RunSettings:
    time_budget: float = 60.0
    seed: int = 0
    data_dir: str = prepare.DATA_DIR
    device: str = "cpu"
    gpu: int | None = None  # pins the child to one GPU through CUDA_VISIBLE_DEVICES
    threads: int | None = None  # CPU threads for the child (workers share the cores)
    heldout: bool = False
    seq_len: int = prepare.DEFAULT_SEQ_LEN
    eval_tokens: int = prepare.DEFAULT_EVAL_TOKENS
    startup_grace: float = 60.0  # the allowance: training may run this long past the budget (compile, export)
    eval_grace: float = 60.0  # scoring the handed-over model
    memory_limit_mb: float | None = None  # everything the variant's processes hold (PSS, private tmpfs)
    expected_prepare_hash: str | None = None  # None: the hash of prepare.py right now
    data_fingerprint: str | None = None  # None: what meta.json says now
    evaluation: str = "sealed"  # "sealed" (the evaluator scores a handed-over graph) or "in_process"
    sandbox: str = "auto"  # "auto", "bubblewrap" (required) or "none"
    max_model_mb: float = 16384.0  # a handed-over file above this is refused

    @property
    def training_limit(self) -> float:
        return self.time_budget + self.startup_grace


@dataclass
class RunResult:
    status: str
    reason: str = ""
    metrics: dict = field(default_factory=dict)
    wall_seconds: float = 0.0
    train_seconds: float | None = None  # the runner's clock: the variant's first line to its hand-over
    peak_memory_mb: float = 0.0
    returncode: int | None = None
    log_tail: str = ""
    run_dir: str = ""
    sealed: bool = True  # the score came from the evaluator, not from the variant's own process
    sandbox: str = "none"  # "bubblewrap" or "none"
    run_token: str = ""  # ties result.json to the evaluation that wrote it
    code_sha256: str = ""
    worker: str = ""  # the worker slot or Ray node that ran it

    @property
    def val_bpb(self) -> float | None:
        return self.metrics.get("val_bpb") if self.status == "ok" else None

    def to_dict(self) -> dict:
        return asdict(self)


def prepare_hash() -> str:
    return hashlib.sha256(Path(prepare.__file__).read_bytes()).hexdigest()


def code_sha256(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def use_sandbox(mode: str, warn=None) -> bool:
    """Whether to sandbox; with mode auto and no bubblewrap, say so once, plainly, and go on without."""
    if mode == "none":
        return False
    problem = sandbox.probe()
    if problem is None:
        return True
    if mode == "bubblewrap":
        raise SandboxUnavailable(f"{problem}. Or set evaluation.sandbox: none to run variants unsandboxed.")
    if problem not in _WARNED:
        _WARNED.add(problem)
        (warn or (lambda line: print(line, file=sys.stderr)))(
            f"evo: warning: variants run WITHOUT a sandbox: {problem}. Unsandboxed, a variant can read your "
            "files and the held-out split, reach the network and write outside its folder; its score still "
            "comes from the evaluator. Every result records sandbox: none.")
    return False


def child_environment(settings: RunSettings, run_token: str, sandboxed: bool, work: Path, fd: int) -> dict[str, str]:
    env = processes.base_environment(settings.gpu, settings.threads)
    env.update(
        HOME="/tmp" if sandboxed else str(work),
        EVO_TIME_BUDGET=repr(float(settings.time_budget)),
        EVO_SEED=str(settings.seed),
        EVO_DATA_DIR=str(settings.data_dir),
        EVO_DEVICE=settings.device,
        EVO_SEQ_LEN=str(settings.seq_len),
        EVO_EVAL_TOKENS=str(settings.eval_tokens),
        EVO_HANDOVER_FD=str(fd),
        EVO_EVALUATION=settings.evaluation,
        EVO_HELDOUT="1" if settings.heldout and settings.evaluation == "in_process" else "0",
        EVO_SANDBOX="bubblewrap" if sandboxed else "none",
        EVO_RUN_TOKEN=run_token,  # unsandboxed, how the sweep finds descendants
    )
    return env


_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit))\b", re.MULTILINE)


def classify_failure(returncode: int, log_tail: str) -> tuple[str, str]:
    """Status and reason for a child that exited non-zero on its own."""
    exceptions = _EXCEPTION_LINE.findall(log_tail)
    last = exceptions[-1] if exceptions else ""
    lowered = log_tail.lower()
    if last in {"ModuleNotFoundError", "ImportError"}:
        return "import", last
    if "MemoryError" in last or "out of memory" in lowered or "OutOfMemoryError" in last:
        return "oom", last or "out of memory"
    if re.search(r"^FAIL\b", log_tail, re.MULTILINE):
        return "nan", "training loss was NaN or exploded"
    if returncode in (-signal.SIGKILL, 128 + signal.SIGKILL):
        return "oom", "killed by SIGKILL from outside (usually the kernel's out-of-memory killer)"
    if last:
        return "crash", last
    return "crash", f"exit code {returncode}"


def run_variant(code: str, settings: RunSettings, run_dir: str | Path | None = None, run_token: str | None = None,
                cancel: threading.Event | None = None, evaluator: Evaluator | None = None) -> RunResult:
    """Evaluate one variant; every failure of the variant comes back as a status, not an exception.

    `evaluator` is the worker's warm evaluator (one is started and closed here when None);
    run_token tags the run's processes; setting `cancel` kills the run and raises RunCancelled.
    """
    expected = settings.expected_prepare_hash or prepare_hash()
    if prepare_hash() != expected:
        raise PrepareChanged(f"{prepare.__file__} changed since the run started; evaluations are no longer "
                             "comparable. Restore it (git checkout prepare.py) and resume.")
    # Absolute paths: the variant runs in another cwd, and bubblewrap binds absolute paths only.
    run_dir = Path(run_dir).resolve() if run_dir else Path(tempfile.mkdtemp(prefix="evo-run-"))
    settings = dataclasses.replace(settings, data_dir=str(Path(settings.data_dir).resolve()))
    run_dir.mkdir(parents=True, exist_ok=True)
    _place_code(run_dir / "train.py", code)
    run_token = run_token or uuid.uuid4().hex
    stamp = {"run_dir": str(run_dir), "run_token": run_token, "code_sha256": code_sha256(code)}

    refusal = precheck(code)
    if refusal is not None:
        _write_text(run_dir / "log.txt", f"refused before running: {refusal.reason}\n")
        return _finish(run_dir, RunResult(status=refusal.status, reason=refusal.reason, **stamp))

    sandboxed = use_sandbox(settings.sandbox)
    own_evaluator = evaluator is None and settings.evaluation == "sealed"
    if own_evaluator:
        evaluator = Evaluator(settings.device, settings.gpu, settings.threads, sandboxed, run_dir / "evaluator.log")
    try:
        result = _Evaluation(code, settings, run_dir, run_token, cancel, evaluator, sandboxed).run()
    finally:
        if own_evaluator:
            evaluator.close()
    result.run_token, result.code_sha256 = run_token, stamp["code_sha256"]
    if not _code_intact(run_dir / "train.py", code):  # only reachable unsandboxed
        _write_code(run_dir / "train.py", code)
        result.status, result.reason = "tampered", "the variant changed or removed its own train.py"
    if prepare_hash() != expected:
        result.status, result.reason = "tampered", "prepare.py changed during the run"
    return _finish(run_dir, result)


class _Evaluation:
    """One run of one variant, from spawn to the last kill."""

    def __init__(self, code: str, settings: RunSettings, run_dir: Path, token: str, cancel, evaluator, sandboxed: bool):
        self.code, self.s, self.run_dir, self.token = code, settings, run_dir, token
        self.cancel, self.evaluator, self.sandboxed = cancel, evaluator, sandboxed
        self.work = run_dir / "work"
        self.started_at = self.handover_at = self.scored_at = None
        self.score: dict | None = None  # the evaluator's reply (or the in-process metrics)
        self.export_failure: str | None = None
        self.killed_for: tuple[str, str] | None = None
        self.peak_mb = 0.0
        self.buffer = b""

    def run(self) -> RunResult:
        self._fresh_work_folder()
        ours, theirs = socket.socketpair()
        self.channel = ours
        code_fd = os.open(self.run_dir / "train.py", os.O_RDONLY)
        argv, info = self._command(theirs.fileno(), code_fd)
        env = child_environment(self.s, self.token, self.sandboxed, self.work, theirs.fileno())
        begun = time.monotonic()
        passed = (theirs.fileno(), code_fd) + ((info[1],) if info else ())
        self.child = processes.spawn(argv, cwd=self.work, env=env, pass_fds=passed)
        theirs.close()
        os.close(code_fd)
        namespace_pid = None
        if info:
            os.close(info[1])
            namespace_pid = sandbox.child_pid(info[0])
        self.family = processes.Family(self.child.pid, self.token, namespace_pid, tmpfs=(str(self.work),))
        self.seen_work = sandbox.inside(namespace_pid, self.work) if namespace_pid else self.work
        self.log = processes.LogCapture(self.child.stdout, self.run_dir / "log.txt")
        try:
            self._watch(begun)
        finally:
            self.family.kill()
            self.child.wait()
            self.channel.close()
            shutil.rmtree(self.work, ignore_errors=True)  # models can be GBs; the record keeps what matters
        log_tail = "\n".join(self.log.finish().splitlines()[-40:])
        if self.killed_for and self.killed_for[0] == "cancelled":
            raise RunCancelled(str(self.run_dir))
        result = RunResult(status="ok", wall_seconds=round(time.monotonic() - begun, 3), peak_memory_mb=round(self.peak_mb, 1),
                           returncode=self.child.returncode, log_tail=log_tail, run_dir=str(self.run_dir),
                           sealed=self.s.evaluation == "sealed", sandbox="bubblewrap" if self.sandboxed else "none")
        if self.started_at is not None and self.handover_at is not None:
            result.train_seconds = round(self.handover_at - self.started_at, 3)
        self._classify(result)
        return result

    def _fresh_work_folder(self) -> None:
        """work/ holds a copy of train.py and whatever the variant writes; a re-run starts it empty.
        In the sandbox it is a tmpfs over this (empty) folder; unsandboxed it is the folder itself."""
        if self.work.is_symlink() or self.work.is_file():
            self.work.unlink()
        elif self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir()
        if not self.sandboxed:
            (self.work / "train.py").write_text(self.code)

    def _command(self, fd: int, code_fd: int) -> tuple[list[str], tuple[int, int] | None]:
        argv = [sys.executable, "-I", "-u", "-B", "-c", processes.LAUNCHER]
        if not self.sandboxed:
            return argv, None
        data = Path(self.s.data_dir)
        visible = ["tokenizer.json", "meta.json", "train.bin"]
        if self.s.evaluation == "in_process":  # unsealed: the variant scores itself, so it must see the splits
            visible += ["val.bin"] + (["heldout.bin"] if self.s.heldout else [])
        hidden = json.loads((data / prepare.EVAL_SOURCES).read_text()) if (data / prepare.EVAL_SOURCES).is_file() else []
        info = os.pipe()
        tmp_mb = int(self.s.memory_limit_mb or 4096)
        return sandbox.command(argv, readable=tuple(data / name for name in visible), workdir=self.work,
                               files=((code_fd, "train.py"),), gpu=self.s.gpu, cuda=self.s.device == "cuda",
                               tmp_mb=tmp_mb, info_fd=info[1], hidden=tuple(hidden),
                               stub=data / "hidden_module.py"), info

    # ---- watching ----
    def _watch(self, begun: float) -> None:
        while True:
            ready, _, _ = select.select([self.channel], [], [], POLL_SECONDS)
            if ready:
                self._read_messages()
            if self.child.poll() is not None:
                self._read_messages()
                return
            if self._limits_broken(begun):
                return

    def _limits_broken(self, begun: float) -> bool:
        now = time.monotonic()
        if self.started_at is None and now - begun > LAUNCH_SECONDS + self.s.startup_grace:
            self.killed_for = ("timeout", f"the launcher did not reach the variant's code within "
                                          f"{LAUNCH_SECONDS + self.s.startup_grace:.0f} s (importing torch and prepare)")
        elif self.handover_at is None and self.started_at is not None and now - self.started_at > self.s.training_limit:
            self.killed_for = ("over_budget", f"trained past budget + allowance ({self.s.time_budget:g} s + "
                                              f"{self.s.startup_grace:g} s startup_grace) without handing over a model; "
                                              "the runner's clock runs from the variant's first line to evaluate_bpb")
        elif self.scored_at is not None and now - self.scored_at > EXIT_GRACE:
            return True  # scored: whatever it still does no longer matters
        elif self.score is None and self.handover_at is not None and now - self.handover_at > self.s.eval_grace:
            self.killed_for = ("timeout", f"scoring inside the variant's process took longer than eval_grace "
                                          f"({self.s.eval_grace:g} s)")
        else:
            self.killed_for = self._memory_or_cancel()
        return self.killed_for is not None

    def _memory_or_cancel(self) -> tuple[str, str] | None:
        self.peak_mb = max(self.peak_mb, self.family.memory_mb())
        if self.s.memory_limit_mb and self.peak_mb > self.s.memory_limit_mb:
            return "oom", f"the variant's processes held more than the memory limit of {self.s.memory_limit_mb:.0f} MB"
        if len(self.family.pids()) > MAX_PROCESSES:
            return "oom", f"the variant started more than {MAX_PROCESSES} processes"
        if self.cancel is not None and self.cancel.is_set():
            return "cancelled", "cancelled"
        return None

    def _read_messages(self) -> None:
        try:
            chunk = self.channel.recv(1 << 16, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        self.buffer += chunk
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            try:
                message = json.loads(line) if len(line) <= MESSAGE_LIMIT else {}
            except (ValueError, RecursionError):  # whatever the variant sends, the runner goes on
                message = {}
            if isinstance(message, dict):
                self._on_message(message)
        if len(self.buffer) > MESSAGE_LIMIT:
            self.buffer = b""

    def _on_message(self, message: dict) -> None:
        event = message.get("event")
        now = time.monotonic()
        if event == "started" and self.started_at is None:
            self.started_at = now
        elif event == "export_failed" and self.started_at is not None and self.handover_at is None:
            self.export_failure = str(message.get("reason", ""))[:2000]
        elif event in ("handover", "metrics") and self.started_at is not None:
            if self.handover_at is None:  # the training clock stops here
                self.handover_at = now
                if now - self.started_at > self.s.training_limit:
                    self.killed_for = ("over_budget", f"handed over after {now - self.started_at:.1f} s, past budget + "
                                                      f"allowance ({self.s.training_limit:g} s)")
                    return
            if self.score is None:
                self.score = self._score(message)
                if self.score is not None:
                    self.scored_at = time.monotonic()
            self._reply_to_variant()

    def _score(self, message: dict) -> dict | None:
        """The verdict on a hand-over; None while in_process metrics are still being computed."""
        event = message.get("event")
        if self.s.evaluation == "in_process":
            if event == "handover":
                return None  # evaluate_bpb scores next, inside the variant, and sends the metrics
            metrics = message.get("metrics")
            if not isinstance(metrics, dict):
                return {"status": "no_metrics", "reason": "in_process evaluation, but evaluate_bpb sent no metrics"}
            return {"status": "ok", "metrics": metrics}
        if event != "handover":
            return {"status": "tampered", "reason": "sent metrics of its own; under sealed evaluation only the evaluator scores"}
        name = str(message.get("file", ""))
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", name) or name in (".", ".."):
            return {"status": "export_failed", "reason": f"the hand-over named {name[:100]!r}, not a file in its folder"}
        limit_mb = min(self.s.max_model_mb, (self.s.memory_limit_mb or 2 * self.s.max_model_mb) / 2)  # it is held twice
        request = {"data_dir": str(self.s.data_dir), "fingerprint": self.s.data_fingerprint, "seq_len": self.s.seq_len,
                   "eval_tokens": self.s.eval_tokens, "heldout": self.s.heldout, "max_bytes": int(limit_mb * 2**20)}
        # Frozen while it is scored: nothing it runs can rewrite the file or keep training meanwhile.
        self.family.signal_all(signal.SIGSTOP)
        try:
            return self.evaluator.score(self.seen_work / name, request, self.s.eval_grace, self.s.memory_limit_mb,
                                        self._memory_or_cancel)
        finally:
            self.family.signal_all(signal.SIGCONT)

    def _reply_to_variant(self) -> None:
        if self.score is None:
            return
        reply = ({"val_bpb": self.score["metrics"]["val_bpb"]} if self.score["status"] == "ok"
                 else {"error": f"{self.score['status']}: {self.score['reason']}"})
        try:
            self.channel.sendall((json.dumps(reply) + "\n").encode())
        except OSError:
            pass  # it did not wait for the answer

    # ---- the verdict ----
    def _classify(self, result: RunResult) -> None:
        score = self.score
        if score is not None and score["status"] == "cancelled":
            raise RunCancelled(str(self.run_dir))
        if score is not None and score["status"] == "data_changed":
            raise DataChanged(score["reason"])
        if score is not None and score["status"] == "ok":
            result.metrics = {**score["metrics"], "train_seconds": result.train_seconds, "sealed": result.sealed,
                              "sandbox": result.sandbox}
            val = result.metrics.get("val_bpb")
            if not isinstance(val, (int, float)) or not math.isfinite(val):
                result.status, result.reason = "nan", "val_bpb is not finite"
            _write_json(self.run_dir / "metrics.json", result.metrics)
        elif score is not None:
            result.status, result.reason = score["status"], score["reason"]
        elif self.killed_for is not None:
            result.status, result.reason = self.killed_for
        elif self.export_failure is not None:
            result.status, result.reason = "export_failed", self.export_failure
        elif result.returncode != 0:
            result.status, result.reason = classify_failure(result.returncode, result.log_tail)
        else:
            result.status, result.reason = "no_metrics", "exited 0 without handing a model over (prepare.evaluate_bpb)"
        result.reason = result.reason[:REASON_LIMIT]


def _code_intact(path: Path, code: str) -> bool:
    try:
        return path.read_text() == code
    except (OSError, UnicodeDecodeError):
        return False


def _place_code(path: Path, code: str) -> None:
    """The variant's train.py; an identical copy already there (the engine's own) is left alone."""
    if not _code_intact(path, code):
        _write_code(path, code)


def _write_code(path: Path, code: str) -> None:
    if path.is_dir() and not path.is_symlink():  # an unsandboxed variant may have put a folder in its place
        shutil.rmtree(path)
    _write_text(path, code)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text.encode())


def _write_json(path: Path, data: dict) -> None:
    _write_text(path, json.dumps(data, indent=2))


def _finish(run_dir: Path, result: RunResult) -> RunResult:
    _write_json(run_dir / "result.json", result.to_dict())  # present means complete: resume may trust it
    return result
