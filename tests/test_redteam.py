"""The red team: each test is one attack a variant under selection pressure would find and keep.

Every attack goes through the real runner, sandbox and evaluator. Each test asserts that the
attack bought nothing (a status that is not ok, or a score no better than the honest model's)
and, by hashing before and after, that nothing outside the variant's folder changed: the rest
of the run directory, another variant, the data, the installed code, the user's home.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import sys
import sysconfig
import threading
from pathlib import Path

import pytest

import prepare
import trainer
from tests.procs import marked_processes
from trainer import sealed
from trainer.evaluator import Evaluator
from trainer.runner import RunSettings, run_variant

pytestmark = pytest.mark.usefixtures("sandboxed")  # the red team needs the sandbox (conftest.py)

# The honest model: the unigram distribution of train, no training at all. Every attack starts
# from it, so any gain an attack shows over HONEST_BPB is the attack's.
HONEST = """
import os, numpy as np, torch, prepare
tok = prepare.get_tokenizer()
counts = np.bincount(np.fromfile(os.path.join(prepare.DATA_DIR, "train.bin"), dtype=np.uint16), minlength=tok.vocab_size)
class Unigram(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(np.log(counts + 1.0), dtype=torch.float32))
    def forward(self, idx):
        return self.w.expand(*idx.shape, -1)
model = Unigram()
"""
HAND_OVER = "print(f'val_bpb: {prepare.evaluate_bpb(model, tok, 8):.6f}')\n"


class Arena:
    """A run directory with another variant in it, a home with secrets, a listener on 127.0.0.1."""

    def __init__(self, root: Path, data: Path, evaluator: Evaluator):
        self.root, self.data, self.evaluator = root, data, evaluator
        self.run_dir = root / "runs" / "r"
        self.other = self.run_dir / "variants" / "v00001"
        self.mine = self.run_dir / "variants" / "v00002"
        self.home = root / "home"
        self.other.mkdir(parents=True)
        (self.other / "train.py").write_text(HONEST + HAND_OVER)
        (self.other / "result.json").write_text('{"status": "ok"}')
        (self.run_dir / "config.yaml").write_text("mutators:\n  llm:\n    base_url: http://127.0.0.1:8000/v1\n")
        (self.run_dir / "population.parquet").write_bytes(b"PAR1 checkpoint")
        self.home.mkdir()
        (self.home / ".netrc").write_text("machine api.example.com password home-secret-42\n")
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def paths(self) -> dict:
        """What an attack is told, as an adversary that has read evo's source could guess it."""
        return {"%RUN_DIR%": str(self.run_dir), "%OTHER%": str(self.other), "%HOME%": str(self.home),
                "%DATA%": str(self.data), "%PORT%": self.port, "%PROJECT%": str(Path(prepare.__file__).parent),
                "%TRAINER%": str(Path(trainer.__file__).parent)}

    def fill(self, text: str) -> str:
        for key, value in self.paths().items():
            text = text.replace(key, str(value))
        return text

    def snapshot(self) -> dict[str, str]:
        """Hashes of every file an attack must not touch (the variant's own folder excluded)."""
        files = {}
        roots = [self.run_dir, self.home, self.data, Path(trainer.__file__).parent]
        for root in roots:
            for path in sorted(Path(root).rglob("*")):
                if path.is_file() and not path.is_relative_to(self.mine) and "__pycache__" not in path.parts:
                    files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        files[prepare.__file__] = hashlib.sha256(Path(prepare.__file__).read_bytes()).hexdigest()
        for site in {Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()}:
            files[f"listing of {site}"] = ",".join(sorted(os.listdir(site)))  # a dropped .pth shows here
        return files

    def run(self, code: str, **overrides) -> "object":
        settings = RunSettings(**{**dict(time_budget=2.0, data_dir=str(self.data), seq_len=32, eval_tokens=1024,
                                         startup_grace=20.0, eval_grace=30.0, memory_limit_mb=3000), **overrides})
        code = self.fill(code)
        before = self.snapshot()
        result = run_variant(code, settings, self.mine, evaluator=self.evaluator)
        after = self.snapshot()
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        assert not changed, f"the attack changed files outside its folder: {changed}"
        assert self.connections == 0, "the attack reached a listener on 127.0.0.1"
        return result


@pytest.fixture(scope="module")
def data(tmp_path_factory, small_data):
    copy = tmp_path_factory.mktemp("redteam-data")
    shutil.copytree(small_data, copy, dirs_exist_ok=True)
    return copy


@pytest.fixture(scope="module")
def evaluator():
    shared = Evaluator("cpu", threads=1, sandboxed=True)
    yield shared
    shared.close()


@pytest.fixture(scope="module")
def honest_bpb(data, evaluator, tmp_path_factory):
    arena = Arena(tmp_path_factory.mktemp("honest"), data, evaluator)
    result = arena.run(HONEST + HAND_OVER)
    assert result.status == "ok", result.log_tail
    return result.val_bpb


@pytest.fixture
def arena(tmp_path, data, evaluator):
    return Arena(tmp_path, data, evaluator)


def gained_nothing(result, honest: float) -> bool:
    return result.status != "ok" or result.val_bpb >= honest - 1e-6


# ---- forging the score -------------------------------------------------------------------------

FORGERIES = {
    "prints a fake score": HONEST + "prepare.evaluate_bpb(model, tok, 8)\nprint('val_bpb: 0.010000')\n",
    "writes metrics and result files wherever it can compute a path": HONEST + """
import json, os
forged = {"status": "ok", "val_bpb": 0.01, "metrics": {"val_bpb": 0.01, "held" + "out_bpb": 0.01}}
for path in ["metrics.json", "../metrics.json", "../result.json", "../../v00001/result.json",
             "%RUN_DIR%/variants/v00002/metrics.json", "%RUN_DIR%/variants/v00002/result.json", "/tmp/metrics.json"]:
    try:
        json.dump(forged, open(path, "w"))
    except OSError:
        pass
""" + HAND_OVER,
    "patches torch's loss before importing prepare": """
import importlib, torch
F = importlib.import_module("torch.nn." + "functional")
setattr(F, "cross_" + "entropy", lambda *a, **k: torch.zeros(()))
exec("import prep" + "are")
""" + HONEST + HAND_OVER,
    "patches math and time after importing prepare": HONEST + """
import math, time
math.log = lambda *a: 1e9
time.perf_counter = time.monotonic = time.time = lambda: 0.0
""" + HAND_OVER,
    "replaces prepare's scoring helpers by computed names": HONEST + """
import builtins
for name in ["score_" + "rows", "score_" + "model", "logits" + "_of"]:
    builtins.setattr(prepare, name, lambda *a, **k: {"bpb": 0.01, "loss": 0.01, "tokens": 1024, "bytes": 4096, "probed_rows": 9})
vars(prepare)["eval" + "_rows"] = lambda *a: None
""" + HAND_OVER,
    "answers its own hand-over with a fake score": HONEST + """
import json
channel = prepare.handover_channel()
channel.tell({"event": "metrics", "metrics": {"val_bpb": 0.01}})
print(prepare.evaluate_bpb(model, tok, 8))
""",
    "replaces evaluate_bpb and never hands over": HONEST + """
import builtins
builtins.setattr(prepare, "evaluate" + "_bpb", lambda *a: 0.01)
print("val_bpb:", prepare.evaluate_bpb(model, tok, 8))
""",
    "swaps the model file after the hand-over starts": HONEST + """
import threading, time, torch
def swap():
    time.sleep(0.05)
    for _ in range(200):
        try:
            open("model.evomodel", "wb").write(b"EVOSEAL1" + b"\\xff" * 64)
        except OSError:
            pass
        time.sleep(0.005)
threading.Thread(target=swap, daemon=True).start()
""" + HAND_OVER,
}


@pytest.mark.parametrize("attack", sorted(FORGERIES))
def test_a_forged_score_buys_nothing(arena, honest_bpb, attack):
    result = arena.run(FORGERIES[attack])
    assert result.returncode is not None, f"the precheck refused it ({result.reason}); the attack never ran"
    assert gained_nothing(result, honest_bpb), (attack, result.status, result.val_bpb, result.log_tail)


def test_a_printed_score_is_ignored_and_the_real_one_recorded(arena, honest_bpb):
    result = arena.run(FORGERIES["prints a fake score"])
    assert result.status == "ok" and result.val_bpb == pytest.approx(honest_bpb, rel=1e-9)


# ---- models that see the future ----------------------------------------------------------------

TRAINED_PEEK = """
import torch, prepare
tok = prepare.get_tokenizer()
V = tok.vocab_size
class Peek(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.now = torch.nn.Embedding(V, V)
        self.next = torch.nn.Embedding(V, V)
        self.peeking = False
    def forward(self, idx):
        out = self.now(idx)
        if self.peeking:  # after training: read the token it is asked to predict
            T = idx.shape[1]
            ahead = torch.cat([idx[:, 1:], idx[:, -1:]], dim=1)
            out = out + PEEK
        return out
model = Peek()
opt = torch.optim.Adam(model.parameters(), lr=0.05)
loader = prepare.make_dataloader(tok, 8, 32, "train")
for step in range(30):  # real training first
    x, y = next(loader)
    loss = torch.nn.functional.cross_entropy(model(x).view(-1, V), y.reshape(-1))
    opt.zero_grad(); loss.backward(); opt.step()
model.peeking = True
""" + "print(prepare.evaluate_bpb(model, tok, 8))\n"

PEEKS = {
    "everywhere": "10.0 * torch.nn.functional.one_hot(ahead, V)",
    "at one position only": "torch.cat([torch.zeros_like(out[:, :13]), 10.0 * torch.nn.functional.one_hot(ahead, V)[:, 13:14], torch.zeros_like(out[:, 14:])], 1)",
    "behind a huge logit on a token never scored": ("10.0 * torch.nn.functional.one_hot(ahead, V) "
                                                    "- 1e30 * torch.nn.functional.one_hot(torch.full_like(idx, V - 1), V)"),
    "only in the second half": "torch.cat([torch.zeros_like(out[:, : T // 2]), 10.0 * torch.nn.functional.one_hot(ahead, V)[:, T // 2 :]], 1)",
    "only through the batch's other rows": "0.0 * out + out.mean(dim=0, keepdim=True)",
}


def test_one_batch_for_every_row_cannot_put_a_rows_continuation_beside_it(arena):
    """With batch_size >= the number of rows, row j+1 would start with row j's last target."""
    code = HONEST + """
class NextRow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = model
    def forward(self, idx):
        out = self.inner(idx)
        following = torch.roll(idx[:, 0], -1, dims=0)  # the first token of the next row in the batch
        last = torch.nn.functional.one_hot(following, out.shape[-1]).float() * 20.0
        return torch.cat([out[:, :-1], out[:, -1:] + last[:, None]], dim=1)
print(prepare.evaluate_bpb(NextRow(), tok, 64))
"""
    result = arena.run(code)  # 1024 eval tokens at seq_len 32: 32 rows, all in one batch of 64 if allowed
    assert result.status == "tampered" and "other rows" in result.reason, (result.status, result.reason)


@pytest.mark.slow
@pytest.mark.parametrize("where", sorted(PEEKS))
def test_a_model_that_reads_ahead_after_training_is_caught(arena, where):
    result = arena.run(TRAINED_PEEK.replace("PEEK", PEEKS[where]), time_budget=5.0)
    assert result.status == "tampered" and "non-causal" in result.reason, (result.status, result.reason, result.log_tail)


def test_a_model_that_counts_its_calls_is_refused(arena):
    """Looking ahead only after the probe's first calls needs state; the evaluator takes stateless graphs only."""
    code = HONEST + """
class Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = model
        self.register_buffer("calls", torch.zeros(()))
    def forward(self, idx):
        self.calls.add_(1)
        return self.inner(idx) + self.calls * 0
print(prepare.evaluate_bpb(Counting(), tok, 8))
"""
    result = arena.run(code)
    assert result.status == "export_failed" and "stateless" in result.reason, (result.status, result.reason)


# ---- crafted model files -----------------------------------------------------------------------

def _crafted(arena: Arena, header: dict | None, body: bytes = b"") -> str:
    text = arena.fill(json.dumps(header)).encode() if header is not None else b"[" * 200_000
    blob = sealed.MAGIC + len(text).to_bytes(8, "little") + text + body
    return HONEST + f"""
open("crafted.evomodel", "wb").write({blob!r})
reply = prepare.handover_channel().ask({{"event": "handover", "file": "crafted.evomodel"}})
print(reply)
"""


CRAFTED = {
    "reads a data file with aten.from_file": {"batch_size": 8, "seq_len": 32, "tensors": {}, "graph": {
        "nodes": [{"op": "from_file.default", "args": ["%DATA%/val.bin", False, 1024], "kwargs": {}}], "output": {"node": 0}}},
    "saves a tensor to a file": {"batch_size": 8, "seq_len": 32, "tensors": {}, "graph": {
        "nodes": [{"op": "save.default", "args": [{"input": 0}, "/tmp/x"], "kwargs": {}}], "output": {"input": 0}}},
    "mutates its input in place": {"batch_size": 8, "seq_len": 32, "tensors": {}, "graph": {
        "nodes": [{"op": "add_.Tensor", "args": [{"input": 0}, 1], "kwargs": {}}], "output": {"node": 0}}},
    "refers to a node that comes later": {"batch_size": 8, "seq_len": 32, "tensors": {}, "graph": {
        "nodes": [{"op": "neg.default", "args": [{"node": 0}], "kwargs": {}}], "output": {"node": 0}}},
    "names a Python function as its operator": {"batch_size": 8, "seq_len": 32, "tensors": {}, "graph": {
        "nodes": [{"op": "os.system", "args": ["touch /tmp/pwned"], "kwargs": {}}], "output": {"node": 0}}},
    "points a tensor past the end of the file": {"batch_size": 8, "seq_len": 32, "graph": {"nodes": [], "output": {"tensor": "w"}},
        "tensors": {"w": {"dtype": "float32", "shape": [1 << 20], "offset": 0, "nbytes": 4 << 20}}},
    "reads the input's storage past its view with as_strided": {"batch_size": 8, "seq_len": 32, "tensors": {}, "graph": {
        "nodes": [{"op": "as_strided.default", "args": [{"input": 0}, [8, 33], [33, 1], 0]}], "output": {"node": 0}}},
    "takes uninitialised memory through resize_as": {"batch_size": 8, "seq_len": 32, "tensors": {}, "graph": {
        "nodes": [{"op": "resize_as.default", "args": [{"input": 0}, {"input": 0}]}], "output": {"node": 0}}},
    "reads out of bounds with segment_reduce(unsafe=True)": {"batch_size": 8, "seq_len": 32, "tensors": {}, "graph": {
        "nodes": [{"op": "segment_reduce.default", "args": [{"input": 0}, "sum"], "kwargs": {"unsafe": True}}],
        "output": {"node": 0}}},
    "nests its header deeper than any parser recurses": None,
    "reads past a buffer with a low-level batch norm": {"batch_size": 8, "seq_len": 32, "tensors": {}, "graph": {
        "nodes": [{"op": "_native_batch_norm_legit_no_training.default",
                   "args": [{"input": 0}, None, None, {"input": 0}, {"input": 0}, 0.1, 1e-5]}], "output": {"node": 0}}},
    "writes past a buffer with a pooling backward": {"batch_size": 8, "seq_len": 32, "tensors": {}, "graph": {
        "nodes": [{"op": "max_pool2d_with_indices_backward.default",
                   "args": [{"input": 0}, {"input": 0}, [1, 1], [1, 1], [0, 0], [1, 1], False, {"input": 0}]}],
        "output": {"node": 0}}},
    "adds noise the evaluator's random state decides": {"batch_size": 8, "seq_len": 32, "tensors": {}, "graph": {
        "nodes": [{"op": "randn.default", "args": [[8, 32, 512]], "kwargs": {}}], "output": {"node": 0}}},
    "passes arguments of the wrong kind": {"batch_size": 8, "seq_len": 32, "tensors": {}, "graph": {
        "nodes": [{"op": "neg.default", "args": 5}], "output": {"node": 0}}},
}


@pytest.mark.parametrize("attack", sorted(CRAFTED))
def test_a_crafted_model_file_is_refused(arena, honest_bpb, attack):
    result = arena.run(_crafted(arena, CRAFTED[attack]))
    assert result.status == "export_failed" and "refused" in result.reason, (attack, result.status, result.reason)


def test_a_huge_name_in_a_crafted_file_cannot_bloat_the_record(arena):
    header = {"batch_size": 8, "seq_len": 32, "graph": {"nodes": [], "output": {"input": 0}},
              "tensors": {"w" * 5_000_000: {"dtype": "float99", "shape": [1], "offset": 0, "nbytes": 4}}}
    result = arena.run(_crafted(arena, header))
    assert result.status == "export_failed" and len(result.reason) <= 2000
    assert (arena.mine / "result.json").stat().st_size < 100_000


def test_a_huge_sparse_model_file_is_refused_before_the_evaluator_holds_it(arena):
    code = HONEST + """
with open("big.evomodel", "wb") as f:
    f.truncate(3 * 2**30)  # 3 GB that cost no disk
print(prepare.handover_channel().ask({"event": "handover", "file": "big.evomodel"}))
"""
    result = arena.run(code, memory_limit_mb=2000)
    assert result.status == "export_failed" and "over the limit" in result.reason, (result.status, result.reason)


def test_messages_that_break_a_json_parser_do_not_break_the_runner(arena, honest_bpb):
    code = HONEST + """
channel = prepare.handover_channel()
channel.sock.sendall(b"[" * 60000 + b"\\n" + b"\\xff\\xfe not json\\n" + b"x" * 200_000 + b"\\n")
""" + HAND_OVER
    result = arena.run(code)
    assert result.status == "ok" and result.val_bpb == pytest.approx(honest_bpb, rel=1e-9)


def test_the_variant_is_frozen_while_its_model_is_scored(arena):
    """Nothing it runs can rewrite the handed-over file or train on while the evaluator scores."""
    code = HONEST + """
import os, time
if os.fork() == 0:  # a detached grandchild (double fork, new session) keeps a heartbeat in a file
    os.setsid()
    if os.fork() == 0:
        with open("beats", "a") as f:
            while True:
                f.write(f"{time.monotonic()}\\n"); f.flush(); time.sleep(0.002)
    os._exit(0)
def beats():
    try:
        return [float(b) for b in open("beats").read().split()]
    except (FileNotFoundError, ValueError):  # not started yet, or a line half written
        return []
while len(beats()) < 3:  # the heartbeat is going before the hand-over, however busy the machine
    time.sleep(0.01)
start = time.monotonic()
prepare.evaluate_bpb(model, tok, 8)
end = time.monotonic()
while not any(b > end for b in beats()):  # and it has beaten again since the thaw
    time.sleep(0.01)
# The freeze may begin before the heartbeat's first beat after `start` and end after its last one
# before `end`, so the window runs from the last beat before start to the first beat after end.
seen = beats()
window = [max(b for b in seen if b <= start)] + [b for b in seen if start < b <= end] + [min(b for b in seen if b > end)]
print("LONGEST_PAUSE", max(b - a for a, b in zip(window, window[1:])))
"""
    result = arena.run(code)
    assert result.status == "ok", (result.status, result.reason)
    pause = float(result.log_tail.split("LONGEST_PAUSE ", 1)[1].split()[0])
    assert pause >= 0.9 * (result.metrics["load_seconds"] + result.metrics["eval_seconds"]), (pause, result.metrics)


def test_a_hand_over_of_a_link_or_a_fifo_is_refused_without_hanging(arena):
    for target in ("os.symlink('%DATA%/val.bin', 'model.evomodel')", "os.mkfifo('model.evomodel')"):
        code = HONEST + f"import os\n{target}\nprint(prepare.handover_channel().ask({{'event': 'handover', 'file': 'model.evomodel'}}))\n"
        result = arena.run(code)
        assert result.status == "export_failed", (target, result.status, result.reason)


# ---- data, files, network, secrets ------------------------------------------------------------

def test_val_and_heldout_tokens_cannot_be_read_by_any_path(arena, honest_bpb):
    code = HONEST + """
import glob, os
found = []
candidates = ["%DATA%/val.bin", "%DATA%/held" + "out.bin", os.path.join(prepare.DATA_DIR, "val.bin")]
candidates += glob.glob("/proc/*/root%DATA%/*.bin") + glob.glob("/proc/*/cwd/*.bin")
for top, dirs, files in os.walk("/"):
    dirs[:] = [d for d in dirs if os.path.join(top, d) not in ("/proc", "/sys", "/usr", "/dev")]
    candidates += [os.path.join(top, f) for f in files if f.endswith(".bin")]
for path in candidates:
    if "val" in os.path.basename(path) or "held" in os.path.basename(path):
        try:
            open(path, "rb").read(16)
            found.append(path)
        except OSError:
            pass
print("FOUND", found, sorted(os.listdir(prepare.DATA_DIR)))
""" + HAND_OVER
    result = arena.run(code)
    assert "FOUND [] ['meta.json', 'tokenizer.json', 'train.bin']" in result.log_tail, result.log_tail
    assert gained_nothing(result, honest_bpb)


def test_the_embedded_corpus_evaluation_text_is_not_in_the_sandbox(arena):
    """The default corpus is the standard library, which Python needs: its val and held-out files are
    stubbed, and no copy of them, exact or near (another Python's stdlib, a vendored one), is readable."""
    hidden = [Path(p) for p in json.loads((arena.data / prepare.EVAL_SOURCES).read_text())]
    assert hidden, "the embedded corpus should have evaluation documents"
    code = HONEST + """
import hashlib, importlib, os
names = %NAMES%
found = {}
for top, dirs, files in os.walk("/"):
    dirs[:] = [d for d in dirs if os.path.join(top, d) not in ("/proc", "/sys", "/dev")]
    for name in files:
        if name in names:
            try:
                found[os.path.join(top, name)] = hashlib.sha256(open(os.path.join(top, name), "rb").read()).hexdigest()
            except OSError:
                pass
print("READABLE", found)
try:
    importlib.import_module("%MODULE%")
    print("IMPORTED")
except ImportError as e:
    print("HIDDEN", e)
""" + HAND_OVER
    module = ".".join(hidden[0].relative_to(sysconfig.get_paths()["stdlib"]).with_suffix("").parts).removesuffix(".__init__")
    code = code.replace("%NAMES%", repr(sorted({p.name for p in hidden}))).replace("%MODULE%", module)
    result = arena.run(code)
    assert "HIDDEN" in result.log_tail and "evaluation text" in result.log_tail, result.log_tail[-500:]
    readable = eval(result.log_tail.split("READABLE ", 1)[1].splitlines()[0])
    stub = hashlib.sha256(prepare.HIDDEN_MODULE_STUB.encode()).hexdigest()
    assert all(readable[str(p)] == stub for p in hidden if str(p) in readable)  # what is there is the stub
    for path in set(readable) - {str(p) for p in hidden}:  # elsewhere the sandbox shows the host's file
        mine = _significant_lines(Path(path))
        for doc in (d for d in hidden if d.name == Path(path).name):
            theirs = _significant_lines(doc)
            assert len(mine & theirs) < 0.3 * max(1, len(theirs)), f"{path} holds the text of {doc}"


def _significant_lines(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text(errors="replace").splitlines() if len(line.strip()) >= 25}


def test_nothing_outside_its_folder_can_be_written(arena, honest_bpb):
    code = HONEST + """
import glob, os
import sys
targets = ["%RUN_DIR%/config.yaml", "%RUN_DIR%/population.parquet", "%OTHER%/train.py", "%OTHER%/result.json",
           "%DATA%/train.bin", "%DATA%/tokenizer.json", "%DATA%/meta.json", "%PROJECT%/prep" + "are.py",
           "%TRAINER%/runner.py", "%HOME%/.bashrc", "/root/.bashrc", "/etc/profile"]
targets += [p + "/evil.pth" for p in sys.path if p.endswith("site-packages")]
written = []
for path in targets:
    try:
        with open(path, "a") as f:
            f.write("import os; os.system('echo pwned')\\n")
        written.append(path)
    except OSError:
        pass
print("WRITTEN", written)
""" + HAND_OVER
    result = arena.run(code)  # Arena.run hashes everything outside the folder before and after
    written = eval(result.log_tail.split("WRITTEN ", 1)[1].splitlines()[0])
    # Under pytest the run directory is in /tmp, and the sandbox's /tmp is its own tmpfs: a write
    # there "succeeds" into a copy that vanishes with the sandbox (the hashes above prove it).
    assert all(path.startswith("/tmp/") for path in written), written
    assert gained_nothing(result, honest_bpb)


def test_the_network_is_unreachable_even_on_loopback(arena):
    code = HONEST + """
import socket
try:
    socket.create_connection(("127.0.0.1", %PORT%), timeout=2)
    print("CONNECTED")
except OSError as e:
    print("REFUSED", e)
""" + HAND_OVER
    result = arena.run(code)  # Arena.run also checks the listener saw no connection
    assert "REFUSED" in result.log_tail and "CONNECTED" not in result.log_tail


def test_the_engines_environment_and_the_users_secrets_are_out_of_sight(arena, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-redteam-secret")
    code = HONEST + """
import glob, os
seen = []
print("ETC", sorted(p for p in ["/etc/shadow", "/etc/gshadow", "/etc/ssh", "/etc/sudoers"] if os.path.exists(p)))
for path in glob.glob("/proc/*/environ") + ["%HOME%/.netrc", os.path.expanduser("~/.netrc")]:
    try:
        seen.append(open(path, "rb").read().decode(errors="replace"))
    except OSError:
        pass
print("SECRET" if any("redteam-secret" in s or "home-secret" in s for s in seen) else "NOTHING", len(seen))
""" + HAND_OVER
    result = arena.run(code)
    assert "NOTHING" in result.log_tail and "SECRET" not in result.log_tail
    assert "ETC []" in result.log_tail  # only the /etc files the linker and Python read are there


# ---- the budget --------------------------------------------------------------------------------

OVERTIME = {
    "ignores the time budget": "import time\nend = time.monotonic() + 40\nwhile time.monotonic() < end:\n    pass\n",
    "slows its own clock": ("import time\nreal = time.monotonic\nstart = real()\n"
                            "time.monotonic = time.time = time.perf_counter = lambda: start + (real() - start) / 100\n"
                            "while time.monotonic() - start < 0.4:\n    pass\n"),
    "counts warm-up steps as untimed": ("import time\nUNTIMED_STEPS = 10**6\nt0 = time.time()\n"
                                        "for step in range(UNTIMED_STEPS):  # 'warm-up' the variant does not count\n"
                                        "    time.sleep(0.01)\n    if time.time() - t0 > 40: break\n"),
}


@pytest.mark.slow
@pytest.mark.parametrize("attack", sorted(OVERTIME))
def test_extra_training_time_is_over_budget(arena, attack):
    result = arena.run(HONEST + OVERTIME[attack] + HAND_OVER, time_budget=1.0, startup_grace=2.0)
    assert result.status == "over_budget", (attack, result.status, result.reason)
    assert result.train_seconds is None and result.val_bpb is None


@pytest.mark.slow
def test_training_within_the_allowance_is_ok_and_timed_by_the_runner(arena):
    code = HONEST + "import time\ntime.sleep(2.0)\ntime.time = lambda: 0.0\n" + HAND_OVER
    result = arena.run(code, time_budget=1.0, startup_grace=10.0)
    assert result.status == "ok" and 2.0 <= result.train_seconds < 11.0


# ---- containment -------------------------------------------------------------------------------

def test_a_daemon_in_a_new_session_with_a_clean_environment_dies_with_the_run(arena, tmp_path):
    marker = f"evo-redteam-daemon-{tmp_path.name}"
    code = HONEST + f"""
import os, subprocess, sys
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "{marker}"], start_new_session=True,
                 env={{}}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
if os.fork() == 0:
    os.setsid()
    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(600)", "{marker}"])
""" + HAND_OVER
    result = arena.run(code)
    assert result.status == "ok"
    assert not marked_processes(marker)


@pytest.mark.slow
def test_a_stdout_flood_is_capped_and_fills_no_disk(arena):
    code = HONEST + "import sys\nline = 'x' * 1023 + '\\n'\nfor _ in range(300_000):\n    sys.stdout.write(line)\n" + HAND_OVER
    result = arena.run(code, time_budget=30.0)
    log = arena.mine / "log.txt"
    assert log.stat().st_size < 9 * 2**20  # 300 MB printed, 8 MB kept
    assert "log capped" in log.read_text(errors="replace")
    assert sum(p.stat().st_size for p in arena.mine.rglob("*") if p.is_file()) < 20 * 2**20
    assert result.status in ("ok", "over_budget")


@pytest.mark.slow
def test_memory_held_by_a_detached_child_counts_and_forks_count_once(arena):
    hog = HONEST + """
import os, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "b = bytearray(1500 * 2**20); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(60)"],
                 start_new_session=True, env={})
time.sleep(30)
"""
    result = arena.run(hog, time_budget=40.0, memory_limit_mb=1000)
    assert result.status == "oom" and result.peak_memory_mb > 1000, (result.status, result.reason)

    forks = HONEST + """
import os, time
block = bytearray(300 * 2**20); block[::4096] = b'y' * len(block[::4096])
for _ in range(40):
    if os.fork() == 0:
        time.sleep(5)
        os._exit(0)
time.sleep(3)
""" + HAND_OVER
    result = arena.run(forks, time_budget=10.0, memory_limit_mb=2500)
    assert result.status == "ok", (result.status, result.reason)  # 40 forks of 300 MB shared pages are not 12 GB
    assert result.peak_memory_mb < 2500


def test_filling_its_folder_counts_as_memory_and_fills_no_disk(arena):
    code = HONEST + """
import os, time
block = os.urandom(2**20)
with open("filler.bin", "wb") as f:
    for _ in range(900):
        f.write(block)
time.sleep(30)
"""
    result = arena.run(code, time_budget=40.0, memory_limit_mb=700)
    assert result.status == "oom", (result.status, result.reason)
    assert not (arena.mine / "work").exists()


@pytest.mark.slow
def test_a_thousand_processes_are_stopped(arena):
    code = HONEST + """
import os, time
for _ in range(1100):
    if os.fork() == 0:
        time.sleep(60)
        os._exit(0)
time.sleep(60)
"""
    result = arena.run(code, time_budget=70.0, memory_limit_mb=None)
    assert result.status == "oom" and "processes" in result.reason, (result.status, result.reason)


def test_a_nested_namespace_cannot_hide_a_process_from_the_limits(arena):
    """A user + PID namespace of its own would take a child out of the sandbox's accounting."""
    code = HONEST + """
import ctypes, os, time
if os.fork() == 0:
    refused = ctypes.CDLL(None, use_errno=True).unshare(0x10000000 | 0x20000000) != 0  # CLONE_NEWUSER | CLONE_NEWPID
    print("UNSHARE", "refused" if refused else "allowed", flush=True)
    if os.fork() == 0:
        block = bytearray(1500 * 2**20)
        block[::4096] = b"x" * len(block[::4096])
        time.sleep(60)
    time.sleep(60)
time.sleep(30)
""" + HAND_OVER
    result = arena.run(code, time_budget=40.0, memory_limit_mb=1000)
    assert "UNSHARE refused" in result.log_tail, result.log_tail[-500:]
    assert result.status == "oom", (result.status, result.reason)


def test_a_variant_that_deletes_its_folder_or_plants_a_fifo_is_data_not_a_crash(arena):
    code = """
import os, shutil
for name in os.listdir("."):
    shutil.rmtree(name, ignore_errors=True) if os.path.isdir(name) else os.remove(name)
os.mkfifo("model.evomodel")
for name in ["../log.txt", "../result.json"]:
    try:
        os.remove(name); os.mkfifo(name)
    except OSError:
        pass
"""
    result = arena.run(code)
    assert result.status == "no_metrics"
    assert (arena.mine / "log.txt").is_file() and (arena.mine / "result.json").is_file()


def test_the_sealed_reader_never_unpickles(tmp_path):
    """A file written by torch.export.save (which unpickles on load) is not a sealed model at all."""
    import torch

    program = torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),))
    path = tmp_path / "m.pt2"
    torch.export.save(program, path)
    with pytest.raises(sealed.SealedFormatError, match="magic"):
        sealed.read_model(path.read_bytes(), "cpu")
    honest = io.BytesIO()
    sealed.write_model(torch.nn.Embedding(16, 16), 2, 4, "cpu", honest)
    model = sealed.read_model(honest.getvalue(), "cpu")
    assert model(torch.zeros(2, 4, dtype=torch.long)).shape == (2, 4, 16)
