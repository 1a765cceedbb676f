"""How busy evo keeps its workers, on one machine and on Ray, and how far it scales.

    python benchmarks/scaling.py executors [--workers 1 2 4 8] [--seconds 2]
    python benchmarks/scaling.py simulated [--workers 16] [--scale 0.005] [--ray]
    python benchmarks/scaling.py llm [--reply-seconds 30] [--eval-seconds 5] [--evaluations 24]

executors  Each executor (local, then Ray on a private one-machine cluster) runs 4 jobs per worker
           of a stand-in that sleeps `--seconds`, kept full the way the engine keeps it. Prints
           jobs per minute, the busy fraction (time slots held a job over slots x wall time) and
           the latency each job added to its sleep: Ray's added latency per job is the
           difference between the two executors' figures.
simulated  The whole engine (breeder, guard, recorder, checkpoints) with W stand-in workers whose
           run times are drawn like five-minute GPU runs (330 s +- 5%, budget plus start-up and
           scoring), scaled by `--scale`, against one worker: the speed-up in evaluations per
           hour and the busy fraction. With --ray the workers are Ray tasks on a local cluster.
llm        One worker, an LLM operator whose stand-in server on 127.0.0.1 takes `--reply-seconds`
           per reply, and stand-in evaluations of `--eval-seconds`: the busy fraction once the
           queue of bred-ahead children is warm (from the third evaluation on).

Run times are stand-ins (sleeps), so the figures measure evo's scheduling, not training.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, wait
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import prepare  # noqa: E402
from evo.config import Config  # noqa: E402
from evo.engine import Engine  # noqa: E402
from evo.executors.fake import FakeExecutor, ok  # noqa: E402
from evo.jobs import CHILD, Job  # noqa: E402
from evo.runs import start_run  # noqa: E402
from trainer.runner import RunResult, RunSettings  # noqa: E402


# ---- measuring ----

class Timeline:
    """When each job held a slot: from submit to its future's completion."""

    def __init__(self):
        self.spans: list[tuple[float, float]] = []
        self.lock = threading.Lock()

    def watch(self, executor):
        submit = executor.submit

        def timed(job):
            started = time.monotonic()
            future = submit(job)
            future.add_done_callback(lambda f: self._done(started))
            return future

        executor.submit = timed
        return executor

    def _done(self, started: float) -> None:
        with self.lock:
            self.spans.append((started, time.monotonic()))

    def busy(self, slots: int, start_index: int = 0) -> float:
        """Slot-seconds held over slots x wall, from the start_index-th submit to the last finish."""
        spans = sorted(self.spans)[start_index:]
        return self._held(spans[0][0], max(end for _, end in spans), slots)

    def steady(self, slots: int) -> tuple[float, float]:
        """(busy fraction, jobs per second) between the moment every slot first held a job and
        the last submit: a run's ramp-up (only the seed can run at first) and drain left out."""
        events = sorted([(start, 1) for start, _ in self.spans] + [(end, -1) for _, end in self.spans])
        active, t_full = 0, None
        for t, step in events:
            active += step
            if active >= slots:
                t_full = t
                break
        t_last = max(start for start, _ in self.spans)
        if t_full is None or t_last <= t_full:
            return float("nan"), float("nan")
        finished = sum(t_full <= end <= t_last for _, end in self.spans)
        return self._held(t_full, t_last, slots), finished / (t_last - t_full)

    def _held(self, t0: float, t1: float, slots: int) -> float:
        held = sum(max(0.0, min(end, t1) - max(start, t0)) for start, end in self.spans)
        return held / (slots * (t1 - t0))


def sleeping_job(job, device, gpu, threads, evaluator, cancel=None, folder=None) -> RunResult:
    """A stand-in for the runner: sleeps as long as the job's budget says, then reports a score."""
    time.sleep(job.settings.time_budget)
    return RunResult(status="ok", metrics={"val_bpb": 1.0 + random.gauss(0, 0.002), "heldout_bpb": 1.0},
                     wall_seconds=job.settings.time_budget)


# ---- executors ----

def _config(tmp: str, name: str, **sections) -> Config:
    data = {
        "run": {"name": name, "dir": tmp}, "seed_file": str(ROOT / "trainer" / "train_gpu.py"),
        "data": {"dir": ARGS.data_dir}, "stopping": {"max_evaluations": 10**6},
        "evaluation": {"mode": "in_process", "sandbox": "none"}, "guard": {"enabled": False},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return Config.model_validate(data)


def run_executor(executor, workers: int, jobs: int, seconds: float) -> dict:
    timeline = Timeline()
    timeline.watch(executor)
    code = (ROOT / "trainer" / "train_cpu.py").read_text()
    pending, in_flight, started = list(range(jobs)), set(), time.monotonic()
    with tempfile.TemporaryDirectory() as folders:
        while pending or in_flight:
            while pending and len(in_flight) < workers:
                i = pending.pop()
                settings = RunSettings(time_budget=seconds, data_dir=ARGS.data_dir, evaluation="in_process", sandbox="none")
                in_flight.add(executor.submit(Job(CHILD, f"v{i:05d}", code, settings, f"{folders}/v{i:05d}", f"t{i}")))
            done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                future.result()
    wall = time.monotonic() - started
    added = [end - start - seconds for start, end in timeline.spans]
    return {"jobs_per_min": 60 * jobs / wall, "busy": timeline.busy(workers), "added": sum(added) / len(added)}


def bench_executors() -> None:
    from evo.executors.local import LocalExecutor
    from evo.workers import WorkerSlot

    print(f"stand-in jobs of {ARGS.seconds:g} s, {ARGS.per_worker} per worker")
    print(f"{'executor':<8} {'W':>3} {'jobs/min':>9} {'ideal':>7} {'busy':>6} {'added s/job':>12}")
    for w in ARGS.workers:
        slots = [WorkerSlot(f"cpu#{i}", "cpu", None, 1) for i in range(w)]
        executor = LocalExecutor(slots, sandboxed=False, evaluation_mode="in_process", log_dir=tempfile.gettempdir(),
                                 run=sleeping_job)
        row = run_executor(executor, w, ARGS.per_worker * w, ARGS.seconds)
        executor.close()
        print(f"{'local':<8} {w:>3} {row['jobs_per_min']:>9.1f} {60 * w / ARGS.seconds:>7.1f} {row['busy']:>6.3f} "
              f"{row['added']:>12.3f}", flush=True)
    import ray

    from evo.executors.ray_cluster import RayExecutor

    ray.init(num_cpus=max(ARGS.workers), log_to_driver=False, logging_level="error", include_dashboard=False)
    with tempfile.TemporaryDirectory() as tmp:
        for w in ARGS.workers:
            config = _config(tmp, f"ray{w}", executor={"kind": "ray", "gpus_per_job": 0, "cpus_per_job": 1, "jobs": w})
            executor = RayExecutor(config, log=lambda line: None, run=sleeping_job)
            run_executor(executor, w, w, ARGS.seconds)  # warm: Ray starts its worker processes once
            row = run_executor(executor, w, ARGS.per_worker * w, ARGS.seconds)
            executor.close()
            print(f"{'ray':<8} {w:>3} {row['jobs_per_min']:>9.1f} {60 * w / ARGS.seconds:>7.1f} {row['busy']:>6.3f} "
                  f"{row['added']:>12.3f}", flush=True)
    ray.shutdown()


# ---- a simulated many-GPU run ----

def five_minute_run(job) -> float:
    """A GPU run's wall time: the 300 s budget plus start-up and scoring, +-5%, scaled down."""
    return random.Random(job.token).uniform(0.95, 1.05) * 330 * ARGS.scale


def simulated_run(workers: int, evaluations: int, tmp: str) -> dict:
    guard = {"enabled": True, "noise_runs": 3, "reruns": 3, "z": 0.0, "min_delta": 0.0005}
    config = _config(tmp, f"sim{workers}-{time.monotonic_ns()}", stopping={"max_evaluations": evaluations}, guard=guard,
                     population={"size": 16, "islands": 4}, mutators={"perturb": {"max_changes": 2}})
    config.operators = {"perturb": 1.0, "crossover": 0.3}
    engine = start_run(config, None, log=lambda line: None)
    if ARGS.ray:
        from evo.executors.ray_cluster import RayExecutor

        config.executor.kind = "ray"
        config.executor.gpus_per_job, config.executor.cpus_per_job, config.executor.jobs = 0, 1, workers

        def stand_in(job, device, gpu, threads, evaluator, cancel=None, folder=None, _seconds=five_minute_run):
            time.sleep(_seconds(job))
            return RunResult(status="ok", metrics={"val_bpb": 1.0 + random.gauss(0, 0.002), "heldout_bpb": 1.0})

        executor = RayExecutor(config, log=lambda line: None, run=stand_in)
    else:
        executor = FakeExecutor(lambda job: ok(1.0 + random.gauss(0, 0.002)), slots=workers, seconds=five_minute_run)
    timeline = Timeline()
    engine = Engine(config, engine.store, log=lambda line: None, executor=timeline.watch(executor))
    started = time.monotonic()
    engine.run()
    wall = time.monotonic() - started
    jobs = len(timeline.spans)
    steady_busy, steady_rate = timeline.steady(workers)
    return {"jobs": jobs, "children": engine.counters.evaluations, "guard": engine.counters.guard_runs,
            "per_hour": jobs / wall * 3600 * ARGS.scale, "busy": timeline.busy(workers),
            "steady_busy": steady_busy, "steady_per_hour": steady_rate * 3600 * ARGS.scale}


def bench_simulated() -> None:
    if ARGS.ray:
        import ray

        ray.init(num_cpus=max(ARGS.workers), log_to_driver=False, logging_level="error", include_dashboard=False)
    where = "Ray tasks on a local cluster" if ARGS.ray else "the fake executor"
    print(f"simulated 5-minute runs scaled x{ARGS.scale:g} ({330 * ARGS.scale:.2f} s each), {where}, guard on")
    print("whole run (ramp-up with only the seed running, and the drain at the end, included) | steady state")
    print(f"{'W':>3} {'jobs':>5} {'children':>9} {'guard':>6} {'runs/h':>8} {'busy':>6} {'speed-up':>9} | "
          f"{'runs/h':>8} {'busy':>6} {'speed-up':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        base = simulated_run(1, ARGS.rounds, tmp)
        for w, row in [(1, base)] + [(w, simulated_run(w, w * ARGS.rounds, tmp)) for w in ARGS.workers]:
            print(f"{w:>3} {row['jobs']:>5} {row['children']:>9} {row['guard']:>6} {row['per_hour']:>8.1f} "
                  f"{row['busy']:>6.3f} {row['per_hour'] / base['per_hour']:>9.2f} | {row['steady_per_hour']:>8.1f} "
                  f"{row['steady_busy']:>6.3f} {row['steady_per_hour'] / base['steady_per_hour']:>9.2f}", flush=True)
    if ARGS.ray:
        import ray

        ray.shutdown()


# ---- a slow LLM ----

class SlowLLM:
    """A chat-completions server on 127.0.0.1 that thinks `seconds` per reply, then adds a line."""

    def __init__(self, seconds: float):
        counter = itertools.count()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(seconds)
                n = next(counter)
                text = (f"HYPOTHESIS: idea {n}\n<<<<<<< SEARCH\nSLEEP = 0.2\n=======\nSLEEP = 0.2\nIDEA_{n} = {n}\n"
                        ">>>>>>> REPLACE\n")
                payload = json.dumps({
                    "id": "x", "object": "chat.completion", "created": 0, "model": body.get("model", "m"),
                    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"


def bench_llm() -> None:
    server = SlowLLM(ARGS.reply_seconds)
    with tempfile.TemporaryDirectory() as tmp:
        seed = Path(tmp) / "seed.py"
        seed.write_text("SLEEP = 0.2\nprint('a stand-in: the fake executor never runs it')\n")
        config = _config(tmp, "llm", stopping={"max_evaluations": ARGS.evaluations},
                         mutators={"llm": {"base_url": server.base_url, "models": {"stand-in": 1.0},
                                           "timeout": 10 * ARGS.reply_seconds, "concurrent_requests": ARGS.requests}})
        config.seed_file = str(seed)
        config.operators = {"llm": 1.0}
        engine = start_run(config, None, log=lambda line: None)
        timeline = Timeline()
        executor = FakeExecutor(lambda job: ok(1.0 + random.gauss(0, 0.01)), slots=1, seconds=ARGS.eval_seconds)
        engine = Engine(config, engine.store, log=lambda line: None, executor=timeline.watch(executor))
        started = time.monotonic()
        engine.run()
        wall = time.monotonic() - started
    print(f"LLM reply {ARGS.reply_seconds:g} s, {ARGS.requests} requests at once; evaluation {ARGS.eval_seconds:g} s; "
          f"1 worker; {engine.counters.evaluations} evaluations in {wall:.0f} s")
    print(f"busy fraction: {timeline.busy(1):.3f} overall, {timeline.busy(1, start_index=2):.3f} from the third "
          f"evaluation on (queue warm); target >= 0.9")


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("executors", "simulated", "llm"))
    parser.add_argument("--workers", type=int, nargs="+", default=None)
    parser.add_argument("--seconds", type=float, default=2.0, help="executors: stand-in job length")
    parser.add_argument("--per-worker", type=int, default=4, help="executors: jobs per worker")
    parser.add_argument("--scale", type=float, default=0.005, help="simulated: time scale of a 330 s run")
    parser.add_argument("--rounds", type=int, default=8, help="simulated: evaluations per worker")
    parser.add_argument("--ray", action="store_true", help="simulated: Ray tasks instead of the fake executor")
    parser.add_argument("--reply-seconds", type=float, default=30.0)
    parser.add_argument("--eval-seconds", type=float, default=5.0)
    parser.add_argument("--evaluations", type=int, default=24)
    parser.add_argument("--requests", type=int, default=8, help="llm: mutators.llm.concurrent_requests")
    parser.add_argument("--data-dir", default=prepare.DATA_DIR)
    ARGS = parser.parse_args()
    ARGS.workers = ARGS.workers or ([16] if ARGS.part == "simulated" else [1, 2, 4, 8])
    if ARGS.part == "simulated" and ARGS.rounds < 8:
        parser.error("--rounds: at least 8, or the steady state is too short to measure")
    prepare.verify(ARGS.data_dir)
    {"executors": bench_executors, "simulated": bench_simulated, "llm": bench_llm}[ARGS.part]()


ARGS = argparse.Namespace()

if __name__ == "__main__":
    main()
