"""The Ray executor: each job is a Ray task holding `gpus_per_job` GPUs and `cpus_per_job` cores on
whichever node has them, running the same runner (sandbox, clock, warm sealed evaluator) there.

- Data: before its first job, a node checks its data directory against the run's fingerprint,
  building it with the run's prepare settings where it is missing; a mismatch stops the run
  with a message naming the node.
- Faults: a node or worker lost mid-job is a system failure; Ray retries the task elsewhere
  (`max_retries`), and past that the engine re-queues it (JobLost). A variant's own crash is a
  status in its result, never an exception, so it is never retried.
- Files: the job runs in a temporary folder on the node; its result and the tail of its log come
  back with the task's return value and are written into the run directory here.

Ray is an optional extra (`pip install 'evo[ray]'`), imported only when this executor is chosen.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import prepare
from evo.executors import ExecutorUnavailable
from evo.jobs import Job, JobLost, run_job
from trainer.files import write_atomic
from trainer.runner import EvaluationUntrusted, RunCancelled, RunResult

TASK_RETRIES = 3  # Ray's own retries of a task whose worker or node died
LOG_BYTES_BACK = 1 << 20  # the tail of a job's log that travels back to the run directory
CAPACITY_REFRESH_SECONDS = 10.0


class RayUnavailable(ExecutorUnavailable):
    """Ray is not installed or no cluster could be reached; the message says what to do."""


class NodeSetupError(RuntimeError):
    """A node cannot run the run's jobs as they must run (other data, another prepare.py)."""


class RayExecutor:
    def __init__(self, config, log: Callable[[str], None] = print, run: Callable = run_job):
        try:
            import ray
        except ImportError:
            raise RayUnavailable("executor.kind is ray, but Ray is not installed: pip install 'evo[ray]' "
                                 "(on the driver and every node)") from None
        self.ray = ray
        self.config = config
        e = config.executor
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            address = None if e.address == "local" else e.address
            try:
                ray.init(address=address, log_to_driver=False, logging_level="warning", include_dashboard=False)
            except ConnectionError as error:
                raise RayUnavailable(f"no Ray cluster at executor.address {e.address!r} ({error}). Start one with "
                                     "`ray start --head`, or set executor.address: local for a one-machine cluster") from None
        data_dir = config.data.dir or prepare.DATA_DIR
        meta = prepare.verify(data_dir)
        self.node_setup = {
            "data_dir": e.data_dir,
            "prepare_settings": meta["settings"],
            "fingerprint": meta["fingerprint"],
            "sandbox": config.evaluation.sandbox,
            "evaluation": config.evaluation.mode,
            "gpus": e.gpus_per_job,
            "threads": max(1, int(e.cpus_per_job)),
            "run": run,  # what runs a job on the node: the runner (benchmarks pass a stand-in)
        }
        self._task = ray.remote(_run_on_node).options(
            num_gpus=e.gpus_per_job, num_cpus=e.cpus_per_job, max_retries=TASK_RETRIES, retry_exceptions=False)
        self._refs: dict[str, object] = {}
        self._lock = threading.Lock()
        self._capacity, self._capacity_at = 0, 0.0
        self.log = log
        try:
            self._check_fits()
        except RayUnavailable:
            self.close()
            raise
        self.log(f"ray: {self.describe()}")

    def _check_fits(self) -> None:
        """A job no single node can hold would wait at Ray forever, silently: refuse it now."""
        e = self.config.executor
        nodes = [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]
        if nodes and not any(r.get("GPU", 0) >= e.gpus_per_job and r.get("CPU", 0) >= e.cpus_per_job for r in nodes):
            largest = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)))
            raise RayUnavailable(
                f"no node of the Ray cluster can hold one job ({e.gpus_per_job:g} GPU, {e.cpus_per_job:g} CPU); the "
                f"largest has {largest.get('GPU', 0):g} GPU, {largest.get('CPU', 0):g} CPU. Lower executor.gpus_per_job "
                "or executor.cpus_per_job.")

    def describe(self) -> str:
        resources = self.ray.cluster_resources()
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        return (f"{len(nodes)} node(s), {resources.get('GPU', 0):g} GPU(s), {resources.get('CPU', 0):g} CPU(s); "
                f"{self.capacity()} job(s) at once ({self.config.executor.gpus_per_job:g} GPU, "
                f"{self.config.executor.cpus_per_job:g} CPU each)")

    def capacity(self) -> int:
        """Jobs the cluster can hold now; re-read every few seconds as nodes come and go."""
        e = self.config.executor
        if e.jobs != "auto":
            return e.jobs
        if time.monotonic() - self._capacity_at > CAPACITY_REFRESH_SECONDS:
            resources = self.ray.cluster_resources()
            if e.gpus_per_job > 0:
                self._capacity = int(resources.get("GPU", 0) // e.gpus_per_job)
            else:
                self._capacity = int(resources.get("CPU", 0) // e.cpus_per_job)
            self._capacity_at = time.monotonic()
        return max(1, self._capacity)  # at least one queued at Ray, which starts it when a node joins

    def submit(self, job: Job) -> Future:
        ref = self._task.remote(job, self.node_setup)
        with self._lock:
            self._refs[job.token] = ref
        out: Future = Future()
        ref.future().add_done_callback(lambda done: self._finished(job, done, out))
        return out

    def _finished(self, job: Job, done: Future, out: Future) -> None:
        exceptions = self.ray.exceptions
        with self._lock:
            self._refs.pop(job.token, None)
        try:
            payload = done.result()
        except exceptions.TaskCancelledError:
            out.set_exception(RunCancelled(job.key))
        except (exceptions.WorkerCrashedError, exceptions.NodeDiedError, exceptions.ObjectLostError,
                exceptions.RaySystemError) as e:
            out.set_exception(JobLost(f"{type(e).__name__}: {str(e)[:300]}"))
        except exceptions.RayTaskError as e:  # raised by evo's code on the node, e.g. NodeSetupError
            out.set_exception(NodeSetupError(str(getattr(e, "cause", None) or e)[:2000]))
        except Exception as e:  # noqa: BLE001 - anything else Ray raises is a lost job, not the variant's fault
            out.set_exception(JobLost(f"{type(e).__name__}: {str(e)[:300]}"))
        else:
            try:
                out.set_result(self._write_back(job, payload))
            except Exception as e:  # noqa: BLE001 - the run directory could not be written: say so
                out.set_exception(e)

    def _write_back(self, job: Job, payload: dict) -> RunResult:
        """The job's files, from the node into the run directory (result.json last: it means done)."""
        folder = Path(job.folder)
        folder.mkdir(parents=True, exist_ok=True)
        result = RunResult(**{k: v for k, v in payload["result"].items() if k in RunResult.__dataclass_fields__})
        result.run_dir = str(folder)
        (folder / "log.txt").write_text(f"[ran on Ray node {payload['node']}]\n" + payload["log"])
        write_atomic(folder / "result.json", json.dumps(result.to_dict(), indent=2).encode())
        return result

    def cancel(self, job: Job) -> None:
        with self._lock:
            ref = self._refs.get(job.token)
        if ref is not None:
            self.ray.cancel(ref, force=True)  # kills the worker; the variant and its sandbox die with it

    def close(self) -> None:
        with self._lock:
            refs = list(self._refs.values())
        for ref in refs:
            self.ray.cancel(ref, force=True)
        if self._owns_ray:
            self.ray.shutdown()


# ---- on the node ----

_checked_data: dict[tuple, str] = {}  # per Ray worker process: data directories already verified
_evaluators: dict[tuple, object] = {}  # per Ray worker process: warm evaluators by (device, gpu)


def _run_on_node(job: Job, setup: dict) -> dict:
    """A Ray task: one job on this node, in a temporary folder; returns its result and log tail."""
    import ray

    from trainer.evaluator import Evaluator
    from trainer.runner import use_sandbox

    node = ray.util.get_node_ip_address()
    data_dir = _node_data(setup, node)
    gpu, device = None, "cpu"
    if setup["gpus"] > 0:
        gpu, device = int(ray.get_gpu_ids()[0]), "cuda"
    sandboxed = use_sandbox(setup["sandbox"])
    evaluator = None
    if setup["evaluation"] == "sealed":
        key = (device, gpu, sandboxed)
        if key not in _evaluators:
            log = Path(tempfile.gettempdir()) / f"evo-evaluator-{os.getpid()}.log"
            _evaluators[key] = Evaluator(device, gpu, setup["threads"], sandboxed, log)
        evaluator = _evaluators[key]
    job = replace(job, settings=replace(job.settings, data_dir=data_dir, sandbox="bubblewrap" if sandboxed else "none"))
    scratch = Path(tempfile.mkdtemp(prefix="evo-job-"))
    folder = scratch / Path(job.folder).name  # named as in the run directory (v00042, rerun-1003)
    try:
        try:
            result = setup["run"](job, device, gpu, setup["threads"], evaluator, None, folder)
        except EvaluationUntrusted as e:
            raise NodeSetupError(f"node {node}: {e}") from None
        result.worker = f"{node}" + (f" cuda:{gpu}" if gpu is not None else "")
        smoke_failed = result.reason.startswith("smoke run:")
        log = _tail(folder / "smoke" / "log.txt" if smoke_failed else folder / "log.txt")
        return {"result": result.to_dict(), "log": log, "node": node}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - LOG_BYTES_BACK))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _node_data(setup: dict, node: str) -> str:
    """This node's data directory, checked (or first built) to be exactly the run's data."""
    data_dir = setup["data_dir"] or os.environ.get("EVO_DATA_DIR") or prepare.DATA_DIR
    key = (data_dir, setup["fingerprint"])
    if key in _checked_data:
        return _checked_data[key]
    settings = prepare.PrepareSettings(**setup["prepare_settings"])
    try:
        with _file_lock(Path(data_dir).parent / (Path(data_dir).name + ".build-lock")):  # one builder per node
            if (Path(data_dir) / "meta.json").is_file():
                meta = prepare.verify(data_dir)  # never rebuilt behind anyone's back: other runs may use it
            else:
                meta = prepare.build(settings, data_dir)
    except prepare.PrepareError as e:
        raise NodeSetupError(f"node {node}: its data directory {data_dir} cannot be used: {e}") from None
    if meta["fingerprint"] != setup["fingerprint"]:
        raise NodeSetupError(
            f"node {node}: the data in {data_dir} (fingerprint {meta['fingerprint']}) is not the run's "
            f"({setup['fingerprint']}). Build the run's data there (evo prepare with {asdict(settings)}; the embedded "
            "corpus also depends on the Python version), or point executor.data_dir at a copy of the run's data.")
    _checked_data[key] = str(Path(data_dir).resolve())
    return _checked_data[key]


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
