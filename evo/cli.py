"""The `evo` command: one sub-command per job, each with --help."""

from __future__ import annotations

import argparse
import json
import os
import signal
import select
import sys
import tempfile
from contextlib import nullcontext
from importlib import metadata
from pathlib import Path

import prepare


def _cmd_prepare(args: argparse.Namespace, rest: list[str]) -> int:
    return prepare.main(rest, prog="evo prepare")


def _cmd_eval(args: argparse.Namespace, rest: list[str]) -> int:
    from trainer.runner import RunSettings, run_variant

    path = Path(args.file)
    if not path.is_file():
        print(f"evo eval: error: no such file: {path}", file=sys.stderr)
        return 2
    try:
        prepare.verify(args.data_dir)
    except prepare.PrepareError as e:
        print(f"evo eval: error: {e}", file=sys.stderr)
        return 2
    settings = RunSettings(
        time_budget=args.budget, seed=args.seed, data_dir=args.data_dir, device=args.device,
        heldout=args.heldout, seq_len=args.seq_len, eval_tokens=args.eval_tokens, startup_grace=args.startup_grace,
        eval_grace=args.eval_grace, memory_limit_mb=args.memory_limit_mb or None, evaluation=args.evaluation,
        sandbox=args.sandbox,
    )
    # Without --run-dir the evaluation's folder is temporary: removed afterwards, on failure and Ctrl-C too.
    with tempfile.TemporaryDirectory(prefix="evo-eval-") if args.run_dir is None else nullcontext(args.run_dir) as run_dir:
        result = run_variant(path.read_text(), settings, run_dir=run_dir)
    if args.run_dir is None:
        result.run_dir = "(temporary, removed; pass --run-dir DIR to keep train.py, log and metrics)"
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(format_result(result))
    return 0 if result.status == "ok" else 1


def _run_defaults():
    """What `evo run configs/default.yaml` evaluates with, so `evo eval` scores a file the same way."""
    from evo.config import Config, load_config
    from evo.runs import PACKAGE_ROOT

    path = PACKAGE_ROOT / "configs" / "default.yaml"
    return load_config(path) if path.is_file() else Config()


def _finish_run(engine, how: str) -> int:
    from evo.progress import Display
    from evo.report import export, status_text

    run_dir = engine.store.dir
    try:
        with Display() as display:
            # `evo run ... | head`: once the reader is gone, the run stops as after Ctrl-C.
            engine.log, engine.on_tick = output.guarded(display.log, on_close=lambda: engine.stop("the output was closed")), display.update
            if output.closed:  # already while the run was being set up
                engine.stop("the output was closed")
            reason = engine.run()
    except KeyboardInterrupt:
        output.print(f"\ninterrupted: running variants killed, checkpoint written. Continue with: evo resume {run_dir}")
        return 130
    if output.closed:
        print(f"evo: standard output was closed, so the run stopped: running variants killed, checkpoint written. "
              f"Continue with: evo resume {run_dir}", file=sys.stderr)
        return SIGPIPE_EXIT
    output.print(f"\nrun {how}: {reason}\n")
    output.print(status_text(run_dir))
    if engine.population.best() is not None:
        out = export(run_dir)
        output.print(f"\nresults: {run_dir}\nchampion exported to: {out}/train.py (metadata.json, seed.diff beside it)"
                     f"\nplots and lineage: evo report {run_dir}")
    failure = seed_failure(engine.population, engine.store)
    if failure is not None:
        print(f"evo: error: {failure}", file=sys.stderr)
        return 1
    return SIGPIPE_EXIT if output.closed else 0


def seed_failure(population, store) -> str | None:
    """Why a run had nothing to evolve: its seed was evaluated and failed. None when it did not fail.

    (Run after the engine returns; a seed still pending, e.g. after a stop, is not a failure.)
    """
    from evo.population import PENDING

    seed = next((i for i in population.individuals.values() if i.operator == "seed"), None)
    if seed is None or seed.status == PENDING or seed.evaluated_ok:
        return None
    log = store.variant_dir(seed.id) / "log.txt"
    last = _last_line(log)
    return (f"the seed ({seed.id}) failed with status {seed.status}" + (f": {seed.reason}" if seed.reason else "")
            + (f"\n  its log ends: {last}" if last and last != seed.reason else "")
            + f"\n  its log: {log}\n  Nothing can be bred from a seed that fails. Fix the seed file (`evo eval FILE` "
            "runs it alone) and start a new run.")


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip()[:300] if lines else ""


def _cmd_run(args: argparse.Namespace, rest: list[str]) -> int:
    from evo.config import load_config
    from evo.lock import RunLock
    from evo.runs import start_run

    config = load_config(args.config, args.set)
    with RunLock(Path(config.run.dir) / config.run.name):  # held until the engine is done
        engine = start_run(config, args.config, log=output.print)
        output.print(f"run directory: {engine.store.dir}")
        return _finish_run(engine, "finished")


def _cmd_resume(args: argparse.Namespace, rest: list[str]) -> int:
    from evo.lock import RunLock
    from evo.runs import resume_run
    from evo.store import RunStore

    RunStore(args.run_dir).run_info()  # not a run directory: say so, and leave it untouched
    # Locked before resume_run, which kills the processes of evaluations it finds in flight.
    with RunLock(args.run_dir, create=False):
        return _finish_run(resume_run(args.run_dir, args.set, log=output.print), "finished")


def _cmd_status(args: argparse.Namespace, rest: list[str]) -> int:
    if args.json:
        from evo.status_json import status_facts

        print(json.dumps(status_facts(args.run_dir, top=args.top), indent=2))
        return 0
    from evo.report import status_text

    print(status_text(args.run_dir, top=args.top))
    return 0


def _cmd_export(args: argparse.Namespace, rest: list[str]) -> int:
    from evo.report import export

    out = export(args.run_dir, args.out, variant=args.id)
    print(f"exported to {out}: train.py, metadata.json, seed.diff")
    return 0


def _cmd_report(args: argparse.Namespace, rest: list[str]) -> int:
    from evo.report_html import write_report

    page = write_report(args.run_dir, args.out)
    print(f"report written to {page} (self-contained: open it in a browser; the plots are also beside it as PNGs)")
    return 0


def _cmd_diff(args: argparse.Namespace, rest: list[str]) -> int:
    from evo.report import load_population
    from evo.store import RunStore
    from evo.variants import code_diff, resolve_id

    store = RunStore(args.run_dir)
    store.run_info()  # not a run directory: say so
    population, _, _ = load_population(store)
    a, b = (resolve_id(population, name, store.dir) for name in (args.a, args.b))
    diff = code_diff(store, population, a, b)
    print(diff, end="")
    if not diff:
        print(f"{a} and {b} have the same code", file=sys.stderr)
    return 0


def _cmd_runs(args: argparse.Namespace, rest: list[str]) -> int:
    from evo.run_list import runs_text

    print(runs_text(args.dir))
    return 0


def format_result(result) -> str:
    rows = [("status", result.status)]
    if result.reason:
        rows.append(("reason", result.reason))
    for key in ("val_bpb", "heldout_bpb", "eval_tokens", "eval_seconds"):
        if key in result.metrics:
            value = result.metrics[key]
            rows.append((key, f"{value:.6f}" if isinstance(value, float) else str(value)))
    if result.train_seconds is not None:
        rows.append(("train_seconds", f"{result.train_seconds:.1f} (the runner's clock, to the hand-over)"))
    rows += [
        ("scored", "sealed (by the evaluator)" if result.sealed else "UNSEALED (inside the variant's process)"),
        ("sandbox", result.sandbox),
        ("wall_seconds", f"{result.wall_seconds:.1f}"),
        ("peak_memory_mb", f"{result.peak_memory_mb:.0f}"),
        ("run_dir", result.run_dir),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if result.status != "ok" and result.log_tail:
        lines += ["", "log tail:", result.log_tail]
    return "\n".join(lines)


def _default_memory_limit_mb() -> float:
    return 0.75 * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20


def _version() -> str:
    try:
        return metadata.version("evo")
    except metadata.PackageNotFoundError:
        return "(version unknown: not installed; pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evo", description="Evolve ML training scripts.")
    parser.add_argument("--version", action="version", version=f"evo {_version()}")
    run_defaults = _run_defaults()
    budget, data = run_defaults.budget, run_defaults.data
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", add_help=False, help="build the data directory (runs prepare.py; see evo prepare --help)")
    p.set_defaults(handler=_cmd_prepare)

    p = sub.add_parser("eval", help="run one variant through the isolated runner and print its result record")
    p.add_argument("file", help="the variant, a train.py file")
    p.add_argument("--seed", type=int, default=0, help="EVO_SEED (default: %(default)s)")
    p.add_argument("--budget", type=float, default=budget.seconds, help="training seconds (default: %(default)s, as configs/default.yaml)")
    p.add_argument("--device", default=prepare.DEVICE, help="cuda, cpu or mps (default: %(default)s)")
    p.add_argument("--data-dir", default=prepare.DATA_DIR, help="prepared data (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=data.seq_len, help="evaluation context (default: %(default)s)")
    p.add_argument("--eval-tokens", type=int, default=data.eval_tokens, help="validation tokens scored (default: %(default)s)")
    p.add_argument("--heldout", action="store_true", help="also score the held-out split")
    p.add_argument("--startup-grace", type=float, default=budget.startup_grace, help="allowance past the budget before the variant is killed as over_budget (default: %(default)s)")
    p.add_argument("--eval-grace", type=float, default=budget.eval_grace, help="seconds the evaluator may take to score (default: %(default)s)")
    p.add_argument("--memory-limit-mb", type=float, default=_default_memory_limit_mb(),
                   help="kill the variant above this memory, all its processes counted; 0: none (default: 3/4 of RAM, %(default).0f)")
    p.add_argument("--evaluation", choices=("sealed", "in_process"), default="sealed",
                   help="sealed: a separate evaluator scores the handed-over model (default); in_process: unsealed")
    p.add_argument("--sandbox", choices=("auto", "bubblewrap", "none"), default="auto",
                   help="auto: bubblewrap where it works (default); bubblewrap: required; none: off")
    p.add_argument("--run-dir", default=None, help="where to keep train.py, log and metrics (default: a new temp dir)")
    p.add_argument("--json", action="store_true", help="print the result record as JSON")
    p.set_defaults(handler=_cmd_eval)

    override_help = "override a config key, e.g. --set budget.seconds=60 (repeatable)"
    p = sub.add_parser("run", help="start an evolution from a YAML config")
    p.add_argument("config", help="the run configuration, e.g. configs/default.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=override_help)
    p.set_defaults(handler=_cmd_run)

    run_dir_help = "a run directory, <run.dir>/<run.name>, e.g. runs/default"
    p = sub.add_parser("resume", help="continue a run from its checkpoint")
    p.add_argument("run_dir", help=run_dir_help)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=override_help + "; e.g. raise stopping.max_evaluations to extend a finished run")
    p.set_defaults(handler=_cmd_resume)

    p = sub.add_parser("status", help="champion, best variants, failures, counts by status and operator, time used")
    p.add_argument("run_dir", help=run_dir_help)
    p.add_argument("--top", type=int, default=5, help="how many of the best to list (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="the same facts as one JSON document, for scripts")
    p.set_defaults(handler=_cmd_status)

    p = sub.add_parser("export", help="write the champion's train.py, metadata.json and a diff against the seed")
    p.add_argument("run_dir", help=run_dir_help)
    p.add_argument("--id", default=None, help="export this variant instead (an id, its number or a unique prefix)")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/export, or RUN_DIR/export-ID with --id)")
    p.set_defaults(handler=_cmd_export)

    p = sub.add_parser("report", help="write report.html: plots, the champion's lineage with diffs, guard verdicts, operators")
    p.add_argument("run_dir", help=run_dir_help)
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report)")
    p.set_defaults(handler=_cmd_report)

    p = sub.add_parser("diff", help="a unified diff of two variants' train.py")
    p.add_argument("run_dir", help=run_dir_help)
    p.add_argument("a", help="a variant id, its number or a unique prefix")
    p.add_argument("b", help="the other variant")
    p.set_defaults(handler=_cmd_diff)

    p = sub.add_parser("runs", help="list run directories: state, evaluations, champion, age")
    p.add_argument("dir", nargs="?", default="runs", help="the folder holding run directories (default: %(default)s)")
    p.set_defaults(handler=_cmd_runs)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `evo` command. Output cut short (`evo status RUN | head`) ends it quietly, exit 141."""
    try:
        try:
            code = _main(argv)
        except SystemExit:  # --help and usage errors: their text is still in the buffer
            sys.stdout.flush()
            raise
        sys.stdout.flush()  # a reader gone shows up here, not in Python's last flush at exit
        return code
    except BrokenPipeError:
        if not _stdout_gone():
            raise  # some other pipe broke: a real error, keep its traceback
        _silence_stdout()
        return SIGPIPE_EXIT


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # `evo prepare ...` hands every argument after the word to prepare.py's own parser.
    if argv[:1] == ["prepare"]:
        return _cmd_prepare(argparse.Namespace(), argv[1:])
    args = parser.parse_args(argv)
    if args.command in ("run", "resume"):
        # A shell starting `evo run ... &` (or nohup) leaves SIGINT ignored, and Python then keeps
        # it so: Ctrl-C's clean stop would be lost, and `kill -INT PID` too, which is how the
        # run-directory lock tells people to stop an engine. Take it back.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    from evo.config import ConfigError
    from evo.executors import ExecutorUnavailable
    from evo.lock import RunLocked
    from evo.store import StoreError
    from trainer.runner import EvaluationUntrusted, EvaluatorFailed, SandboxUnavailable

    try:
        return args.handler(args, [])
    except (ConfigError, StoreError, RunLocked, prepare.PrepareError, SandboxUnavailable, EvaluationUntrusted,
            EvaluatorFailed, ExecutorUnavailable) as e:
        print(f"evo {args.command}: error: {e}", file=sys.stderr)
        return 2


# ---- standard output that a reader may close early (`evo status RUN | head`) ----

SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away


def _stdout_gone() -> bool:
    """stdout is a pipe or socket whose reader has closed it."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null: later writes, and Python's flush at exit, succeed without a word."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


class _Stdout:
    """Lines for stdout from a long command (a run): once the reader is gone, they go nowhere and
    `closed` says so, so the command can stop instead of failing somewhere in the middle."""

    def __init__(self):
        self.closed = False

    def print(self, line: str) -> None:
        self.guarded(print)(line)

    def guarded(self, write, on_close=lambda: None):
        def guarded_write(line: str) -> None:
            if self.closed:
                return
            try:
                write(line)
                sys.stdout.flush()
            except BrokenPipeError:
                self.closed = True
                _silence_stdout()
                on_close()

        return guarded_write


output = _Stdout()


if __name__ == "__main__":
    sys.exit(main())
