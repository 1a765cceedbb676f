"""The evaluator: a warm process that scores handed-over models and never runs a variant's code.

It owns everything that decides a score: the val and held-out tokens (a variant's sandbox does not
contain them), its own tokenizer's byte counts, the causality probe with a random plan the
variant cannot know, and bits per byte. A model arrives as bytes of the sealed format
(trainer/sealed.py), read by a loader that never unpickles or executes anything from them.

One evaluator serves one worker (its device, its GPU), so torch is imported once per worker, not
once per evaluation. Protocol, on stdin/stdout: a JSON request line followed by the model's bytes;
a JSON reply line. `Evaluator` is the runner's side: it starts the process (in the sandbox when
there is one), streams a model file to it, and kills it when it runs past its deadline or memory.
"""

from __future__ import annotations

import gc
import json
import os
import random
import select
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

READY_SECONDS = 180.0  # importing torch on a loaded machine
POLL_SECONDS = 0.2


# ---------------------------------------------------------------------------------------------
# The evaluator process
# ---------------------------------------------------------------------------------------------


class DataChanged(Exception):
    """The data directory is not the data the run started with."""


class _Data:
    """One data directory, verified against its fingerprint and held in memory."""

    def __init__(self, data_dir: str, expected_fingerprint: str | None):
        import numpy as np

        import prepare

        try:
            meta = prepare.verify(data_dir)
        except prepare.PrepareError as e:
            raise DataChanged(str(e)) from None
        if expected_fingerprint and meta["fingerprint"] != expected_fingerprint:
            raise DataChanged(f"the data in {data_dir} has fingerprint {meta['fingerprint']}, the run started "
                              f"with {expected_fingerprint}")
        self.fingerprint = meta["fingerprint"]
        tokenizer = prepare.get_tokenizer(data_dir)
        self.token_bytes, self.vocab_size = tokenizer.token_bytes, tokenizer.vocab_size
        self.splits = {s: np.array(prepare._tokens(s, data_dir)) for s in ("val", "heldout")}  # read once, kept
        self.donors = prepare._tokens("train", data_dir)
        self.rows: dict[tuple, object] = {}

    def rows_for(self, split: str, eval_tokens: int, seq_len: int):
        import prepare

        key = (split, eval_tokens, seq_len)
        if key not in self.rows:
            self.rows[key] = prepare.eval_rows(self.splits[split], eval_tokens, seq_len)
        return self.rows[key]


def _score(request: dict, blob: bytearray, data: _Data, device: str) -> dict:
    import torch

    import prepare
    from trainer import sealed

    started = time.perf_counter()
    torch.manual_seed(0)  # no state carried from one variant's scoring to the next (random ops are refused anyway)
    try:
        model = sealed.read_model(blob, device)
    except sealed.SealedFormatError as e:
        return {"status": "export_failed", "reason": f"the handed-over model was refused: {e}"}
    except Exception as e:  # a malformed file the checks did not foresee: still a refusal, never our crash
        return {"status": "export_failed", "reason": f"the handed-over model was refused: {sealed._short(e)[:500]}"}
    if model.seq_len != request["seq_len"]:
        return {"status": "export_failed", "reason": f"the model was captured at sequence length {model.seq_len}; "
                                                     f"the run scores at {request['seq_len']} (prepare.MAX_SEQ_LEN)"}
    loaded = time.perf_counter()
    rng = random.Random(int.from_bytes(os.urandom(8), "little"))  # the probe's plan: unknowable in advance
    metrics = {"seq_len": model.seq_len, "data_fingerprint": data.fingerprint, "batch_size": model.batch_size}
    try:
        with torch.no_grad():
            splits = ("val", "heldout") if request.get("heldout") else ("val",)
            for split in splits:
                rows = data.rows_for(split, request["eval_tokens"], model.seq_len)
                scored = prepare.score_rows(model, rows, model.batch_size, data.token_bytes, data.vocab_size,
                                            device, data.donors, rng if split == "val" else None)
                metrics.update({f"{split}_bpb": scored["bpb"], f"{split}_loss": scored["loss"]})
                if split == "val":
                    metrics.update(eval_tokens=scored["tokens"], eval_bytes=scored["bytes"], probed_rows=scored["probed_rows"])
    except prepare.CausalityViolation as e:
        return {"status": "tampered", "reason": str(e)}
    except sealed.SealedFormatError as e:
        return {"status": "export_failed", "reason": f"the handed-over model was refused: {e}"}
    except (torch.OutOfMemoryError, MemoryError) as e:
        return {"status": "oom", "reason": f"out of memory while scoring the model: {str(e).splitlines()[0][:300]}"}
    except Exception as e:  # the model's own graph failed (shapes, dtypes): the variant's failure
        return {"status": "crash", "reason": f"the handed-over model failed while scored: {sealed._short(e)}"}
    finally:
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    metrics.update(load_seconds=round(loaded - started, 3), eval_seconds=round(time.perf_counter() - loaded, 3))
    return {"status": "ok", "metrics": metrics}


def main() -> None:
    """Serve requests until stdin closes. Replies go to the real stdout; stray prints to stderr."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    device, threads = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0
    import torch

    import prepare  # noqa: F401  (warm: imported before the first model arrives)
    from trainer import sealed  # noqa: F401

    if threads:
        torch.set_num_threads(threads)
    replies.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    data: dict[tuple, _Data] = {}
    source = sys.stdin.buffer
    while line := source.readline():
        request = json.loads(line)
        blob = bytearray(request["nbytes"])
        view, got = memoryview(blob), 0
        while got < len(blob):
            n = source.readinto(view[got:])
            if not n:
                return
            got += n
        try:
            key = (request["data_dir"], request.get("fingerprint"))
            if key not in data:
                data[key] = _Data(*key)
            reply = _score(request, blob, data[key], device)
        except DataChanged as e:
            reply = {"status": "data_changed", "reason": str(e)}
        del blob, view
        replies.write(json.dumps(reply) + "\n")
        if device == "cuda" and reply["status"] in ("crash", "oom"):
            return  # a failed kernel can leave the CUDA context unusable: the runner starts a fresh evaluator


# ---------------------------------------------------------------------------------------------
# The runner's side
# ---------------------------------------------------------------------------------------------


class EvaluatorFailed(RuntimeError):
    """The evaluator process itself could not start (not a variant's failure: the run stops)."""


class Evaluator:
    """A warm evaluator process for one worker; restarted whenever it had to be killed."""

    def __init__(self, device: str, gpu: int | None = None, threads: int | None = None, sandboxed: bool = True,
                 log_path: Path | None = None):
        self.device, self.gpu, self.threads = device, gpu, threads
        self.sandboxed = sandboxed
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.family = None
        self.data_dirs: set[str] = set()

    def _command(self, data_dir: str) -> tuple[list[str], int | None]:
        from trainer import sandbox

        argv = [sys.executable, "-I", "-u", "-B", "-c", "from trainer.evaluator import main; main()",
                self.device, str(self.threads or 0)]
        if not self.sandboxed:
            return argv, None
        info_read, info_write = os.pipe()
        return sandbox.command(argv, readable=(Path(data_dir),), gpu=self.gpu,
                               cuda=self.device == "cuda", info_fd=info_write, tmp_mb=1024), (info_read, info_write)

    def _start(self, data_dir: str) -> None:
        from trainer import processes, sandbox

        argv, info = self._command(data_dir)
        env = {**processes.base_environment(self.gpu, self.threads), "HOME": "/tmp"}
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
                                            start_new_session=True, pass_fds=(info[1],) if info else ())
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        namespace_pid = None
        if info:
            os.close(info[1])
            namespace_pid = sandbox.child_pid(info[0])
        self.family = processes.Family(self.process.pid, token="", namespace_pid=namespace_pid)
        self.data_dirs = {data_dir}
        try:
            self._read_reply(time.monotonic() + READY_SECONDS, None, lambda: None)  # its "ready" line
        except _Stopped as stop:  # no variant's fault: nothing can be scored until this is fixed
            self.close()
            where = f"; its output is in {self.log_path}" if self.log_path else ""
            raise EvaluatorFailed(f"the evaluator process did not start ({stop.reason}){where}") from None

    def score(self, model_file: Path, request: dict, deadline_seconds: float, memory_limit_mb: float | None,
              watch: Callable[[], tuple[str, str] | None]) -> dict:
        """Stream the model to the evaluator and wait for its verdict; problems come back as statuses."""
        data_dir = request["data_dir"]
        if self.process is None or self.process.poll() is not None or data_dir not in self.data_dirs:
            self.close()
            self._start(data_dir)  # before the file is opened: read at once, it has no time to change
        try:
            fd = os.open(model_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            return {"status": "export_failed", "reason": f"the hand-over named {model_file.name}, which cannot be opened ({e.strerror})"}
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return {"status": "export_failed", "reason": f"{model_file.name} is not a regular file"}
            limit = request.pop("max_bytes")
            if info.st_size > limit:
                return {"status": "export_failed", "reason": f"the model file is {info.st_size / 2**20:.0f} MB, over the "
                                                             f"limit of {limit / 2**20:.0f} MB"}
            deadline = time.monotonic() + deadline_seconds
            self._send(fd, {**request, "nbytes": info.st_size}, info.st_size, deadline, memory_limit_mb)
            return self._read_reply(deadline, memory_limit_mb, watch)
        except _Stopped as stop:
            self.close()
            return {"status": stop.status, "reason": stop.reason}
        finally:
            os.close(fd)

    def _send(self, fd: int, request: dict, size: int, deadline: float, memory_limit_mb: float | None) -> None:
        pipe = self.process.stdin
        try:
            pipe.write((json.dumps(request) + "\n").encode())
            pipe.flush()
            sent = 0
            while sent < size:
                chunk = os.read(fd, min(1 << 20, size - sent))
                if not chunk:
                    raise _Stopped("export_failed", "the model file shrank while it was being read")
                if time.monotonic() > deadline:
                    raise _Stopped("timeout", "the evaluator did not take the model in time")
                if memory_limit_mb and sent % (64 << 20) < len(chunk) and self.family.memory_mb() > memory_limit_mb:
                    raise _Stopped("oom", f"the evaluator went above the memory limit of {memory_limit_mb:.0f} MB "
                                          "receiving this model")
                pipe.write(chunk)
                sent += len(chunk)
            pipe.flush()
        except BrokenPipeError:
            raise _Stopped("crash", "the evaluator exited while receiving the model") from None

    def _read_reply(self, deadline: float, memory_limit_mb: float | None, watch: Callable[[], tuple[str, str] | None]) -> dict:
        out = self.process.stdout
        while True:
            ready, _, _ = select.select([out], [], [], POLL_SECONDS)
            if ready:
                line = out.readline()
                if not line:
                    raise _Stopped("crash", f"the evaluator died (exit code {self.process.wait()})")
                return json.loads(line)
            if time.monotonic() > deadline:
                raise _Stopped("timeout", "scoring the model took longer than budget.eval_grace allows")
            if memory_limit_mb and self.family.memory_mb() > memory_limit_mb:
                raise _Stopped("oom", f"the evaluator went above the memory limit of {memory_limit_mb:.0f} MB scoring this model")
            problem = watch()  # the training process's own limits (memory, cancel) still hold
            if problem:
                raise _Stopped(*problem)

    def close(self) -> None:
        if self.process is not None:
            self.family.kill()
            self.process.wait()
            for stream in (self.process.stdin, self.process.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
        self.process, self.family = None, None


class _Stopped(Exception):
    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


