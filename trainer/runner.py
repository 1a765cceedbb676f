"""Run one variant in isolation and return a plain result record.

One evaluation is one child process: its own session and process group, a fresh directory as
cwd, an environment built from an allow-list (no API keys reach it), output to a log file, and a
hard deadline after which everything it started is killed. The number that counts is the one
`prepare.evaluate_bpb` wrote to the metrics file; the printed `val_bpb:` is only cross-checked.

The runner never raises for a variant's failure: that is data (the result's status). It raises
only when the evaluation itself cannot be trusted any more (prepare.py changed under it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import prepare
from trainer.precheck import precheck
from trainer import processes

STATUSES = ("ok", "syntax", "import", "crash", "nan", "timeout", "oom", "no_metrics", "tampered")

# Variables a variant may inherit from the engine's environment. Everything else (API keys,
# cloud credentials, tokens) is dropped. OPENBLAS_* matter for correctness on some CPUs.
ENV_ALLOW_LIST = (
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR",
    "LD_LIBRARY_PATH", "CUDA_HOME", "CUDA_PATH", "NVIDIA_DRIVER_CAPABILITIES",
    "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "XDG_CACHE_HOME",
    "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
)

POLL_SECONDS = 0.2
LOG_TAIL_LINES = 40


class RunCancelled(Exception):
    """The caller asked the run to stop (Ctrl-C); its processes are dead, no result is recorded."""


class PrepareChanged(RuntimeError):
    """prepare.py is not the file the run started with: no evaluation can be trusted now."""


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
    startup_grace: float = 60.0  # imports, data, compile warm-up before training starts
    eval_grace: float = 60.0  # final evaluation after the budget is spent
    memory_limit_mb: float | None = None  # resident memory of the whole process group
    expected_prepare_hash: str | None = None  # None: the hash of prepare.py right now

    @property
    def deadline_seconds(self) -> float:
        return self.time_budget + self.startup_grace + self.eval_grace


@dataclass
class RunResult:
    status: str
    reason: str = ""
    metrics: dict = field(default_factory=dict)
    wall_seconds: float = 0.0
    peak_memory_mb: float = 0.0
    returncode: int | None = None
    printed_val_bpb: float | None = None
    log_tail: str = ""
    run_dir: str = ""

    @property
    def val_bpb(self) -> float | None:
        return self.metrics.get("val_bpb") if self.status == "ok" else None

    def to_dict(self) -> dict:
        return asdict(self)


def prepare_hash() -> str:
    return hashlib.sha256(Path(prepare.__file__).read_bytes()).hexdigest()


def child_environment(settings: RunSettings, metrics_path: str, run_token: str) -> dict[str, str]:
    env = {k: os.environ[k] for k in ENV_ALLOW_LIST if k in os.environ}
    env.update(
        EVO_TIME_BUDGET=repr(float(settings.time_budget)),
        EVO_SEED=str(settings.seed),
        EVO_DATA_DIR=str(settings.data_dir),
        EVO_DEVICE=settings.device,
        EVO_METRICS_PATH=metrics_path,
        EVO_HELDOUT="1" if settings.heldout else "0",
        EVO_SEQ_LEN=str(settings.seq_len),
        EVO_EVAL_TOKENS=str(settings.eval_tokens),
        EVO_RUN_TOKEN=run_token,  # inherited by every descendant: how the sweep finds them
        PYTHONUNBUFFERED="1",  # the log tail is current when the run is killed
        PYTHONSAFEPATH="1",  # a prepare.py dropped next to train.py is never imported
        PYTHONDONTWRITEBYTECODE="1",
    )
    if settings.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(settings.gpu)
    if settings.threads:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(settings.threads)
    return env


_PRINTED_BPB = re.compile(r"^val_bpb:\s*(\S+)\s*$", re.MULTILINE)
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit))\b", re.MULTILINE)


def _tail(log_path: Path) -> str:
    with open(log_path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        lines = f.read().decode("utf-8", "replace").splitlines()
    return "\n".join(lines[-LOG_TAIL_LINES:])


def _printed_val_bpb(log_text: str) -> float | None:
    found = _PRINTED_BPB.findall(log_text)
    if not found:
        return None
    try:
        return float(found[-1])
    except ValueError:
        return math.nan


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
    if returncode == -signal.SIGKILL:
        return "oom", "killed by SIGKILL from outside (usually the kernel's out-of-memory killer)"
    if last:
        return "crash", last
    return "crash", f"exit code {returncode}"


def run_variant(code: str, settings: RunSettings, run_dir: str | Path | None = None,
                run_token: str | None = None, cancel: threading.Event | None = None) -> RunResult:
    """Evaluate one variant; every failure of the variant comes back as a status, not an exception.

    run_token tags every process of the run (a caller that records it can sweep leftovers after
    its own crash); setting `cancel` kills the run and raises RunCancelled.
    """
    expected = settings.expected_prepare_hash or prepare_hash()
    if prepare_hash() != expected:
        raise PrepareChanged(
            f"{prepare.__file__} changed since the run started; evaluations are no longer comparable. "
            "Restore it (git checkout prepare.py) and resume."
        )
    run_dir = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="evo-run-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    _place_code(run_dir / "train.py", code)
    log_path = run_dir / "log.txt"

    refusal = precheck(code)
    if refusal is not None:
        log_path.write_text(f"refused before running: {refusal.reason}\n")
        return _finish(run_dir, RunResult(status=refusal.status, reason=refusal.reason, run_dir=str(run_dir)))

    # The metrics file lives outside the variant's directory, at a path it is not told about
    # except through the environment prepare reads.
    private = Path(tempfile.mkdtemp(prefix="evo-metrics-"))
    metrics_path = private / f"{uuid.uuid4().hex}.json"
    run_token = run_token or uuid.uuid4().hex
    env = child_environment(settings, str(metrics_path), run_token)

    started = time.monotonic()
    with open(log_path, "wb") as log:
        child = subprocess.Popen(
            [sys.executable, "-c", processes.LAUNCHER, "train.py"],
            cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    killed_for = None
    peak_mb = 0.0
    try:
        while True:
            returncode, child_peak_mb = processes.poll_with_peak(child)
            if returncode is not None:
                peak_mb = max(peak_mb, child_peak_mb)
                break
            peak_mb = max(peak_mb, processes.group_rss_mb(child.pid))
            if time.monotonic() - started > settings.deadline_seconds:
                killed_for = "timeout"
                break
            if settings.memory_limit_mb and peak_mb > settings.memory_limit_mb:
                killed_for = "oom"
                break
            if cancel is not None and cancel.is_set():
                killed_for = "cancelled"
                break
            time.sleep(POLL_SECONDS)
    finally:
        # Always, even after a clean exit: the group first, then anything that left the group
        # (setsid) but still carries the run's token.
        processes.kill_group(child.pid)
        if child.returncode is None:
            child.wait()
        processes.kill_by_token(run_token)
    wall = time.monotonic() - started
    code_intact = _code_intact(run_dir / "train.py", code)
    if not code_intact:  # the engine keeps the variant's code in this file: put it back
        _write_code(run_dir / "train.py", code)
    if killed_for == "cancelled":
        shutil.rmtree(private, ignore_errors=True)
        raise RunCancelled(str(run_dir))

    result = RunResult(status="ok", wall_seconds=round(wall, 3), peak_memory_mb=round(peak_mb, 1),
                       returncode=child.returncode, run_dir=str(run_dir))
    result.log_tail = _tail(log_path)
    log_text = log_path.read_text(errors="replace")
    result.printed_val_bpb = _printed_val_bpb(log_text)
    if metrics_path.is_file():
        try:
            result.metrics = json.loads(metrics_path.read_text())
        except json.JSONDecodeError:
            result.metrics = {}
        shutil.copyfile(metrics_path, run_dir / "metrics.json")
    shutil.rmtree(private, ignore_errors=True)

    _classify(result, killed_for, settings)
    if not code_intact:
        result.status, result.reason = "tampered", "the variant changed or removed its own train.py"
    if prepare_hash() != expected:
        result.status, result.reason = "tampered", "prepare.py changed during the run"
    return _finish(run_dir, result)


def _classify(result: RunResult, killed_for: str | None, settings: RunSettings) -> None:
    if killed_for == "timeout":
        result.status = "timeout"
        result.reason = f"still running after {settings.deadline_seconds:.0f}s (budget + start-up and eval grace)"
    elif killed_for == "oom":
        result.status = "oom"
        result.reason = f"resident memory above the limit of {settings.memory_limit_mb:.0f} MB"
    elif "tampered" in result.metrics:
        result.status, result.reason = "tampered", result.metrics["tampered"]
    elif result.returncode != 0:
        result.status, result.reason = classify_failure(result.returncode, result.log_tail)
    elif "val_bpb" not in result.metrics:
        result.status, result.reason = "no_metrics", "exited 0 without prepare.evaluate_bpb writing metrics"
    elif (problem := _metrics_problem(result.metrics, settings)) is not None:
        result.status, result.reason = "tampered", f"metrics file not written by evaluate_bpb: {problem}"
    elif not math.isfinite(result.metrics["val_bpb"]):
        result.status, result.reason = "nan", "val_bpb is not finite"
    elif result.printed_val_bpb is not None and not (abs(result.printed_val_bpb - result.metrics["val_bpb"]) <= 1e-5):
        result.status = "tampered"
        result.reason = f"printed val_bpb {result.printed_val_bpb} but evaluate_bpb measured {result.metrics['val_bpb']:.6f}"


_METRIC_KEYS = {"val_bpb", "val_loss", "eval_tokens", "eval_bytes", "seq_len", "data_fingerprint", "eval_seconds"}


def _metrics_problem(metrics: dict, settings: RunSettings) -> str | None:
    """What evaluate_bpb always writes, checked against what this run asked for."""
    missing = _METRIC_KEYS - set(metrics)
    if missing:
        return f"missing {', '.join(sorted(missing))}"
    if metrics["seq_len"] != settings.seq_len:
        return f"seq_len {metrics['seq_len']}, the run asked for {settings.seq_len}"
    if not 0 < metrics["eval_tokens"] <= settings.eval_tokens:
        return f"eval_tokens {metrics['eval_tokens']} outside (0, {settings.eval_tokens}]"
    if metrics["data_fingerprint"] != prepare.read_meta(settings.data_dir)["fingerprint"]:
        return "data fingerprint does not match the data directory"
    if settings.heldout != ("heldout_bpb" in metrics):
        return "held-out score present when not asked for, or missing when asked for"
    return None


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
    if path.is_dir() and not path.is_symlink():  # a variant may have put a folder in its place
        shutil.rmtree(path)
    _replace_with(path, code)  # a crash never leaves half a file where the code should be


def _replace_with(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _finish(run_dir: Path, result: RunResult) -> RunResult:
    _replace_with(run_dir / "result.json", json.dumps(result.to_dict(), indent=2))  # present means complete: resume may trust it
    return result
