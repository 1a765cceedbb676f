"""Data, tokenizer, splits, dataloader, the hand-over and the scoring rules. Fixed during a run.

Two faces, one file (as in autoresearch):

* `python prepare.py [--source ...]` is the one-time set-up: it reads a corpus, splits its
  documents by a stable hash into train / val / heldout, trains a BPE tokenizer on train only,
  tokenizes, and writes the splits plus `meta.json` (with a fingerprint) to the data directory.
* `import prepare` is the runtime API for variants: settings from the `EVO_` environment,
  `get_tokenizer()`, `make_dataloader(...)` (train only) and `evaluate_bpb(...)`, which hands
  the trained model over to evo's evaluator and returns the score it measured. autoresearch's
  names work too (`from prepare import MAX_SEQ_LEN, TIME_BUDGET, Tokenizer, make_dataloader,
  evaluate_bpb`, `Tokenizer.from_directory()`): a tokenizer loaded that way gets autoresearch's
  dataloader, best-fit packed documents yielded as (x, y, epoch).

The scoring rules (`score_rows`: bits per byte and the causality probe) live here so that a
standalone run of a seed scores the same way; under evo they run only in the evaluator, a
separate process that never runs a variant's code (trainer/evaluator.py).
"""

from __future__ import annotations

import argparse
import base64
import bisect
import glob
import hashlib
import json
import math
import os
import random
import socket
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------
# Settings from the environment (the variant contract). Read at import, like autoresearch's
# constants, so a variant reads `prepare.TIME_BUDGET` and friends.
# ---------------------------------------------------------------------------------------------

DEFAULT_DATA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "evo", "data")
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_SEQ_LEN = 256
DEFAULT_EVAL_TOKENS = 32 * 1024
SPLIT_NAMES = ("train", "val", "heldout")
# Per mille of documents (by stable hash) that go to val or heldout; the rest is train.
EVAL_PER_MILLE = 100
BOS_TOKEN = "<|bos|>"
TOKEN_DTYPE = np.uint16  # vocabularies up to 65,535 tokens
META_VERSION = 3  # bump when the split or tokenization rules change: old caches rebuild
EVAL_SOURCES = "eval_sources.json"  # embedded source only: the files whose text is val or heldout


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(float(raw))
    except ValueError:
        raise PrepareError(f"{name}={raw!r} is not a number; set it to an integer") from None


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise PrepareError(f"{name}={raw!r} is not a number") from None


class PrepareError(Exception):
    """A problem with the data or its settings, with a message that says what to do."""


DATA_DIR = os.environ.get("EVO_DATA_DIR") or DEFAULT_DATA_DIR
TIME_BUDGET = _env_float("EVO_TIME_BUDGET", 60.0)
SEED = _env_int("EVO_SEED", 0)
DEVICE = os.environ.get("EVO_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
MAX_SEQ_LEN = _env_int("EVO_SEQ_LEN", DEFAULT_SEQ_LEN)
EVAL_TOKENS = _env_int("EVO_EVAL_TOKENS", DEFAULT_EVAL_TOKENS)
# How evaluate_bpb reaches the runner (set by evo's launcher; absent in a standalone run), and
# the unsealed mode's settings (evaluation: in_process scores inside the variant's process).
HANDOVER_FD = _env_int("EVO_HANDOVER_FD", -1)
IN_PROCESS = os.environ.get("EVO_EVALUATION") == "in_process"
IN_PROCESS_HELDOUT = os.environ.get("EVO_HELDOUT") == "1"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# The contract: the seed is applied to the global RNGs at import.
seed_everything(SEED)

# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


class Tokenizer:
    """A byte-level BPE (tiktoken encoding built from merges trained by rustbpe) plus BOS."""

    def __init__(self, pattern: str, mergeable_ranks: dict[bytes, int]):
        import tiktoken

        self.pattern = pattern
        self.mergeable_ranks = mergeable_ranks
        self.bos_id = len(mergeable_ranks)
        self.encoding = tiktoken.Encoding(
            name="evo",
            pat_str=pattern,
            mergeable_ranks=mergeable_ranks,
            special_tokens={BOS_TOKEN: self.bos_id},
        )
        self.vocab_size = self.bos_id + 1
        self._token_bytes: torch.Tensor | None = None
        # Which rows make_dataloader serves this tokenizer's caller (see make_dataloader):
        # "windows" for evo's own API, "packed" for autoresearch's (Tokenizer.from_directory).
        self.dataloader = "windows"

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        import rustbpe

        if vocab_size < 257 or vocab_size > np.iinfo(TOKEN_DTYPE).max:
            raise PrepareError(
                f"--vocab-size {vocab_size} is out of range; use 257..{np.iinfo(TOKEN_DTYPE).max}"
            )
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), vocab_size - 1)  # one slot stays for BOS
        ranks = {bytes(k): int(v) for k, v in trainer.get_mergeable_ranks()}
        return cls(trainer.get_pattern(), ranks)

    @classmethod
    def from_directory(cls, tokenizer_dir: str | None = None) -> "Tokenizer":
        """autoresearch's way in: the run's tokenizer, whose make_dataloader rows are packed.

        `tokenizer_dir` is the prepared data directory (default: EVO_DATA_DIR). The tokenizer it
        returns makes `make_dataloader` serve autoresearch's batches, (x, y, epoch) from
        best-fit packed documents, instead of evo's (x, y) windows.
        """
        data_dir = tokenizer_dir or DATA_DIR
        _require_prepared(data_dir)
        tokenizer = cls.from_json((Path(data_dir) / "tokenizer.json").read_text())
        tokenizer.dataloader = "packed"
        return tokenizer

    def get_vocab_size(self) -> int:
        return self.vocab_size

    def get_bos_token_id(self) -> int:
        return self.bos_id

    def encode(self, text: str | list[str], prepend: int | str | None = None) -> list[int] | list[list[int]]:
        """Token ids of a text (or a list of ids per text), optionally each after a `prepend` token."""
        first = []
        if prepend is not None:
            first = [prepend if isinstance(prepend, int) else self.encoding.encode_single_token(prepend)]
        if isinstance(text, str):
            return first + self.encoding.encode_ordinary(text)
        if isinstance(text, list):
            return [first + ids for ids in self.encoding.encode_ordinary_batch(text)]
        raise TypeError(f"encode takes a str or a list of str, not {type(text).__name__}")

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        """Each document as [BOS] + its tokens."""
        return [[self.bos_id] + ids for ids in self.encoding.encode_ordinary_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    @property
    def token_bytes(self) -> torch.Tensor:
        """Raw UTF-8 byte length of every token id; 0 for special tokens (never scored)."""
        if self._token_bytes is None:
            lengths = torch.zeros(self.vocab_size, dtype=torch.int64)
            for token, rank in self.mergeable_ranks.items():
                lengths[rank] = len(token)
            self._token_bytes = lengths
        return self._token_bytes

    def to_json(self) -> str:
        ranks = [[base64.b64encode(k).decode("ascii"), v] for k, v in self.mergeable_ranks.items()]
        ranks.sort(key=lambda kv: kv[1])
        return json.dumps({"pattern": self.pattern, "bos": BOS_TOKEN, "ranks": ranks})

    @classmethod
    def from_json(cls, text: str) -> "Tokenizer":
        data = json.loads(text)
        return cls(data["pattern"], {base64.b64decode(k): v for k, v in data["ranks"]})


_TOKENIZER_CACHE: dict[str, Tokenizer] = {}


def _require_prepared(data_dir: str) -> dict:
    meta_path = Path(data_dir) / "meta.json"
    if not meta_path.is_file():
        raise PrepareError(
            f"no prepared data in {data_dir} (meta.json missing). "
            f"Run `python prepare.py --data-dir {data_dir}` (or `evo prepare`) first."
        )
    return json.loads(meta_path.read_text())


def get_tokenizer(data_dir: str | None = None) -> Tokenizer:
    data_dir = data_dir or DATA_DIR
    if data_dir not in _TOKENIZER_CACHE:
        _require_prepared(data_dir)
        text = (Path(data_dir) / "tokenizer.json").read_text()
        _TOKENIZER_CACHE[data_dir] = Tokenizer.from_json(text)
    return _TOKENIZER_CACHE[data_dir]


# ---------------------------------------------------------------------------------------------
# Corpus sources
# ---------------------------------------------------------------------------------------------

# Stdlib folders that are tests, vendored packages or installed third-party code.
_EMBEDDED_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def _embedded_paths() -> list[Path]:
    """The .py files of the running CPython's standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EMBEDDED_SKIP_DIRS)
        paths.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(paths)


def _embedded_documents() -> Iterator[str]:
    for path in _embedded_paths():
        yield path.read_text(encoding="utf-8", errors="replace")


# The embedded corpus is text every Python process can read, a sandboxed variant's included, so
# its evaluation documents come only from modules the sandbox can hide without harm: ones that
# torch, numpy, evo's hand-over and the stdlib modules a training script plausibly imports never
# load, and that have no near-copy anywhere the sandbox shows (site-packages, a bundled Python). build() lists them in eval_sources.json; the
# sandbox puts an ImportError stub over each (and over its cached bytecode).
_VARIANT_STDLIB = """
    abc argparse array ast base64 bisect collections concurrent.futures contextlib copy csv ctypes dataclasses
    datetime decimal dis enum fnmatch fractions functools gc glob gzip hashlib heapq inspect io itertools json
    logging math multiprocessing numbers operator os pathlib pickle platform pprint queue random re resource
    shutil signal socket statistics string struct subprocess sys tempfile textwrap threading time timeit
    traceback types typing unittest uuid warnings weakref zlib cProfile pstats
    torch._inductor.compile_fx torch._dynamo triton
"""
_RUNTIME_PROBE = """
import importlib, io, json, sys
import torch, numpy, tiktoken, prepare
from trainer import sealed
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception:
        pass
model = torch.nn.Sequential(torch.nn.Embedding(8, 8), torch.nn.Linear(8, 8))
optimizer = torch.optim.AdamW(model.parameters())
model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
optimizer.step()
sealed.write_model(model, 1, 4, "cpu", io.BytesIO())  # the hand-over loads modules lazily
print(json.dumps(sorted(str(getattr(m, "__file__", None) or "") for m in list(sys.modules.values()))))
"""
HIDDEN_MODULE_STUB = (
    'raise ImportError("this standard-library module is evaluation text of evo\'s embedded corpus, so the sandbox '
    'hides it from variants; if evo or torch needs it, rebuild the data: evo prepare --force")\n'
)


def _hideable(paths: list[Path]) -> list[bool]:
    """For each stdlib file: may it be evaluation text, i.e. can the sandbox hide it?"""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent)}
    probe = subprocess.run([sys.executable, "-c", _RUNTIME_PROBE, *_VARIANT_STDLIB.split()], capture_output=True,
                           text=True, env=env, timeout=600)
    if probe.returncode != 0:
        raise PrepareError(f"could not list the modules a variant needs: {probe.stderr.strip()[-500:]}")
    needed = {os.path.realpath(f) for f in json.loads(probe.stdout.strip().splitlines()[-1]) if f}
    copies = _visible_python_files(paths)
    shared = _shared_lines(paths)
    return [os.path.realpath(p) not in needed and not _has_near_copy(p, copies.get(p.name, []))
            and not _mostly_shared(p, shared) for p in paths]


def _significant_lines(path: Path | str) -> set[str]:
    with open(path, errors="replace") as f:
        return {line.strip() for line in f if len(line.strip()) >= 25}


def _shared_lines(paths: list[Path]) -> set[str]:
    """Lines that appear in more than one corpus document."""
    seen, shared = set(), set()
    for path in paths:
        lines = _significant_lines(path)
        shared |= lines & seen
        seen |= lines
    return shared


def _mostly_shared(path: Path, shared: set[str]) -> bool:
    """A near-copy of other documents (the codec tables in encodings/, say) would test memory, not modelling."""
    lines = _significant_lines(path)
    return bool(lines) and len(lines & shared) >= 0.3 * len(lines)


def _visible_python_files(corpus: list[Path]) -> dict[str, list[str]]:
    """basename -> .py files a sandboxed variant can read that are not corpus documents: vendored or
    bundled copies of the standard library live among them (other Pythons' stdlibs are hidden)."""
    from trainer import sandbox

    skip = {os.path.realpath(p) for p in corpus}
    hidden = tuple(os.path.realpath(d) + "/" for d in sandbox._other_stdlibs())
    found: dict[str, list[str]] = {}
    for root in sandbox.visible_roots():
        for dirpath, dirnames, filenames in os.walk(root):
            if (os.path.realpath(dirpath) + "/").startswith(hidden):
                dirnames[:] = []
                continue
            for f in filenames:
                path = os.path.join(dirpath, f)
                if f.endswith(".py") and os.path.realpath(path) not in skip:
                    found.setdefault(f, []).append(path)
    return found


def _has_near_copy(path: Path, candidates: list[str]) -> bool:
    lines = _significant_lines(path)
    for other in candidates if lines else []:
        try:
            theirs = {line.strip() for line in open(other, errors="replace")}
        except OSError:
            continue
        if len(lines & theirs) >= 0.3 * len(lines):
            return True
    return False


def _file_documents(pattern: str, text_column: str) -> Iterator[str]:
    paths = sorted(glob.glob(pattern, recursive=True))
    if not paths:
        raise PrepareError(f"--source files:{pattern} matched no files; check the glob")
    for path in paths:
        suffix = Path(path).suffix.lower()
        if suffix == ".txt":
            yield Path(path).read_text(encoding="utf-8", errors="replace")
        elif suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise PrepareError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
                    if text_column not in record:
                        raise PrepareError(
                            f"{path}:{line_no}: no {text_column!r} field; "
                            f"pass --text-column with one of {sorted(record)}"
                        )
                    yield str(record[text_column])
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if text_column not in table.column_names:
                raise PrepareError(
                    f"{path}: no {text_column!r} column; "
                    f"pass --text-column with one of {table.column_names}"
                )
            yield from (str(t) for t in table.column(text_column).to_pylist() if t is not None)
        else:
            raise PrepareError(f"{path}: unsupported file type {suffix!r}; use .txt, .jsonl or .parquet")


def _check_hub_reachable() -> None:
    """Fail in seconds, not minutes of retries, when the Hugging Face hub cannot be reached."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise PrepareError(
            "HF_HUB_OFFLINE=1 is set, so hf: sources cannot be streamed. Unset it on a machine "
            "with internet access, or use --source embedded / --source files:GLOB."
        )
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=5).close()
    except OSError as e:
        raise PrepareError(
            f"cannot reach the Hugging Face hub at {endpoint} ({e.__class__.__name__}: {e}). "
            "hf: sources need internet access; offline, use --source embedded (the default) "
            "or --source files:GLOB with local .txt/.jsonl/.parquet files."
        ) from None


def _hf_documents(spec: str, text_column: str, split: str) -> Iterator[str]:
    name, _, config = spec.partition(":")
    if not name:
        raise PrepareError("--source hf: needs a dataset name, e.g. hf:karpathy/climbmix-400b-shuffle")
    _check_hub_reachable()
    import datasets

    try:
        stream = datasets.load_dataset(name, config or None, split=split, streaming=True)
    except Exception as e:  # the datasets library raises many types; say which dataset failed
        raise PrepareError(f"could not open hf:{spec} (split {split!r}): {e}") from None
    for record in stream:
        if text_column not in record:
            raise PrepareError(
                f"hf:{spec} has no {text_column!r} column; pass --text-column with one of {sorted(record)}"
            )
        yield str(record[text_column])


def iter_documents(source: str, text_column: str = "text", hf_split: str = "train") -> Iterator[str]:
    if source == "embedded":
        return _embedded_documents()
    kind, sep, rest = source.partition(":")
    if sep and kind == "files":
        return _file_documents(rest, text_column)
    if sep and kind == "hf":
        return _hf_documents(rest, text_column, hf_split)
    raise PrepareError(
        f"unknown --source {source!r}; use 'embedded', 'hf:NAME[:CONFIG]' or 'files:GLOB'"
    )


def _hash_bucket(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "replace")).digest()[:8], "big")


def assign_splits(texts: list[str], eligible: list[bool] | None = None) -> list[str]:
    """Stable split of each document, by a hash of its content.

    One document in ten (by hash) is an evaluation document; those are dealt, in hash order,
    to whichever of val and heldout holds fewer bytes so far, so the two come out about the
    same size even on a corpus of a few hundred files. With `eligible`, only those documents
    may be evaluation documents (at a rate that still makes them one in ten of all).
    """
    buckets = [_hash_bucket(t) for t in texts]
    splits = ["train"] * len(texts)
    rate = EVAL_PER_MILLE
    if eligible is not None:
        blocked = {t for t, ok in zip(texts, eligible) if not ok}  # copies of one text share its split
        eligible = [ok and t not in blocked for t, ok in zip(texts, eligible)]
        rate = min(1000, EVAL_PER_MILLE * len(texts) / max(1, sum(eligible)))
    held = [i for i, b in enumerate(buckets) if b % 1000 < rate and (eligible is None or eligible[i])]
    sizes = {"val": 0, "heldout": 0}
    for i in sorted(held, key=lambda i: (buckets[i], texts[i])):
        split = "val" if sizes["val"] <= sizes["heldout"] else "heldout"
        splits[i] = split
        sizes[split] += len(texts[i])
    return splits


# ---------------------------------------------------------------------------------------------
# Building the data directory
# ---------------------------------------------------------------------------------------------


@dataclass
class PrepareSettings:
    source: str = "embedded"
    vocab_size: int = DEFAULT_VOCAB_SIZE
    text_column: str = "text"
    hf_split: str = "train"
    max_bytes: int = 0  # 0: no cap
    python_version: str = field(default_factory=lambda: sys.version.split()[0])


def _split_path(data_dir: Path, split: str) -> Path:
    return data_dir / f"{split}.bin"


def fingerprint(data_dir: str | Path) -> str:
    """Hash of the tokenizer and the token arrays: equal fingerprints mean equal data."""
    data_dir = Path(data_dir)
    h = hashlib.sha256()
    sources = [data_dir / EVAL_SOURCES] if (data_dir / EVAL_SOURCES).exists() else []  # what the sandbox hides
    for path in [data_dir / "tokenizer.json"] + [_split_path(data_dir, s) for s in SPLIT_NAMES] + sources:
        h.update(path.name.encode())
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError as e:
            raise PrepareError(f"{path} cannot be read ({e.strerror}); rebuild the data with "
                               f"`evo prepare --force --data-dir {data_dir}`") from None
    return h.hexdigest()[:16]


def verify(data_dir: str | Path) -> dict:
    """meta.json, after checking that the files still are the ones it describes."""
    meta = _require_prepared(str(data_dir))
    actual = fingerprint(data_dir)
    if actual != meta.get("fingerprint"):
        raise PrepareError(
            f"the data in {data_dir} changed after it was prepared: its files hash to {actual}, meta.json "
            f"records {meta.get('fingerprint')} (a file was edited, truncated or replaced). Rebuild it with "
            f"`evo prepare --force --data-dir {data_dir}` and the same --source/--vocab-size as before."
        )
    return meta


def build(settings: PrepareSettings, data_dir: str | Path, force: bool = False) -> dict:
    """Build (or reuse) the data directory; returns its meta.json content."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if meta_path.is_file() and not force:
        meta = json.loads(meta_path.read_text())
        files_present = all(_split_path(data_dir, s).is_file() for s in SPLIT_NAMES)
        if meta.get("version") == META_VERSION and meta.get("settings") == asdict(settings) and files_present:
            meta = verify(data_dir)  # a damaged cache is an error, never silently reused
            meta["cached"] = True
            return meta

    started = time.perf_counter()
    embedded = settings.source == "embedded"
    paths = _embedded_paths() if embedded else None
    texts: list[str] = []
    origins: list[Path] = []
    total = 0
    for i, text in enumerate(iter_documents(settings.source, settings.text_column, settings.hf_split)):
        if not text.strip():
            continue
        texts.append(text)
        if embedded:
            origins.append(paths[i])
        total += len(text.encode("utf-8", "replace"))
        if settings.max_bytes and total >= settings.max_bytes:
            break
    docs: dict[str, list[str]] = {s: [] for s in SPLIT_NAMES}
    hidden: list[str] = []
    for i, (text, split) in enumerate(zip(texts, assign_splits(texts, _hideable(origins) if embedded else None))):
        docs[split].append(text)
        if split != "train" and embedded:
            hidden.append(os.path.realpath(origins[i]))
    counts = {s: len(d) for s, d in docs.items()}
    if sum(counts.values()) == 0:
        raise PrepareError(f"source {settings.source!r} yielded no non-empty documents")
    empty = [s for s, n in counts.items() if n == 0]
    if empty:
        raise PrepareError(
            f"source {settings.source!r} is too small: {sum(counts.values())} documents left the "
            f"{'/'.join(empty)} split(s) empty (documents per split: {counts}). "
            "Add more documents (about 1 in 20 goes to each of val and heldout)."
        )

    tokenizer = Tokenizer.train(docs["train"], settings.vocab_size)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "tokenizer.json").write_text(tokenizer.to_json())
    (data_dir / EVAL_SOURCES).unlink(missing_ok=True)
    if hidden:  # for the sandbox: the files that hold evaluation text, and what to put over them
        (data_dir / EVAL_SOURCES).write_text(json.dumps(hidden, indent=0))
        (data_dir / "hidden_module.py").write_text(HIDDEN_MODULE_STUB)
    splits = {}
    for split in SPLIT_NAMES:
        ids = np.fromiter(
            (t for doc in tokenizer.encode_documents(docs[split]) for t in doc), dtype=TOKEN_DTYPE
        )
        ids.tofile(_split_path(data_dir, split))
        splits[split] = {
            "documents": counts[split],
            "bytes": sum(len(d.encode("utf-8", "replace")) for d in docs[split]),
            "tokens": int(ids.size),
        }
    meta = {
        "version": META_VERSION,
        "settings": asdict(settings),
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "splits": splits,
        "fingerprint": fingerprint(data_dir),
        "seconds": round(time.perf_counter() - started, 2),
    }
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, meta_path)  # meta.json last: its presence means the directory is complete
    meta["cached"] = False
    return meta


def summary(meta: dict, data_dir: str | Path) -> str:
    lines = [
        f"data directory: {data_dir}" + ("  (reused cache)" if meta.get("cached") else ""),
        f"source: {meta['settings']['source']}   vocabulary: {meta['vocab_size']}   "
        f"fingerprint: {meta['fingerprint']}   build seconds: {meta['seconds']}",
        f"{'split':<8} {'documents':>10} {'bytes':>12} {'tokens':>12}",
    ]
    for split in SPLIT_NAMES:
        s = meta["splits"][split]
        lines.append(f"{split:<8} {s['documents']:>10,} {s['bytes']:>12,} {s['tokens']:>12,}")
    return "\n".join(lines)


def read_meta(data_dir: str | None = None) -> dict:
    return _require_prepared(data_dir or DATA_DIR)


# ---------------------------------------------------------------------------------------------
# Runtime API for variants
# ---------------------------------------------------------------------------------------------


def _tokens(split: str, data_dir: str | None = None) -> np.ndarray:
    data_dir = data_dir or DATA_DIR
    _require_prepared(data_dir)
    return np.memmap(_split_path(Path(data_dir), split), dtype=TOKEN_DTYPE, mode="r")


def make_dataloader(tokenizer: Tokenizer, B: int, T: int, split: str = "train", packed: bool | None = None,
                    buffer_size: int = 1000) -> Iterator[tuple]:
    """Endless training batches on DEVICE, in one of two forms, chosen by `packed`:

    * evo's (packed False): (x, y), B random windows of T tokens from the train token stream,
      y shifted by one;
    * autoresearch's (packed True): (x, y, epoch) from `packed_rows`, every row whole documents
      that each start with BOS, best-fit packed.

    `packed=None` (the default) follows the tokenizer: one from `Tokenizer.from_directory()`
    (autoresearch's way in) gets packed rows, one from `get_tokenizer()` (evo's seeds) windows.
    The order depends only on EVO_SEED, so two runs with the same seed see the same data and a
    new seed sees a new order. Only train is served: val and held-out are read by the evaluator.
    """
    if split != "train":
        raise ValueError(f"make_dataloader serves the train split only, not {split!r}: evo's evaluator scores "
                         "val and held-out, and a variant never reads them")
    if packed is None:
        packed = getattr(tokenizer, "dataloader", "windows") == "packed"
    tokens = _tokens(split)
    if packed:
        rows = packed_rows(tokens, tokenizer.bos_id, B, T + 1, SEED, buffer_size)
        return (_to_device(batch[:, :-1], batch[:, 1:]) + (epoch,) for batch, epoch in rows)
    return _windows(tokens, B, T, split)


def _to_device(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    pin = DEVICE == "cuda"
    pair = []
    for part in (x, y):
        tensor = torch.from_numpy(np.ascontiguousarray(part, dtype=np.int64))
        if pin:
            tensor = tensor.pin_memory()
        pair.append(tensor.to(DEVICE, non_blocking=pin))
    return pair[0], pair[1]


def _windows(tokens: np.ndarray, B: int, T: int, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if tokens.size < T + 2:
        raise PrepareError(f"the {split} split has {tokens.size} tokens, fewer than T+1={T + 1}")
    generator = torch.Generator().manual_seed(SEED * 1000)
    pin = DEVICE == "cuda"
    while True:
        starts = torch.randint(0, tokens.size - T - 1, (B,), generator=generator).tolist()
        rows = np.stack([tokens[s : s + T + 1] for s in starts]).astype(np.int64)
        batch = torch.from_numpy(rows)
        if pin:
            batch = batch.pin_memory()
        batch = batch.to(DEVICE, non_blocking=pin)
        yield batch[:, :-1], batch[:, 1:]


def split_documents(tokens: np.ndarray, bos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and length of every document in a split's token stream (each begins with BOS)."""
    step = 1 << 26  # in slices, so a large memory-mapped split is never copied whole
    starts = np.concatenate([np.flatnonzero(tokens[i : i + step] == bos_id) + i for i in range(0, tokens.size, step)]
                            or [np.empty(0, dtype=np.int64)])
    if starts.size == 0 or starts[0] != 0:
        raise PrepareError("the split's tokens do not start with BOS; rebuild with `python prepare.py --force`")
    lengths = np.diff(np.append(starts, tokens.size))
    return starts, lengths


def _row_sized_pieces(starts: np.ndarray, lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each document as consecutive pieces of at most `width` tokens: (piece starts, piece lengths)."""
    counts = -(-lengths // width)  # pieces per document
    first = np.repeat(np.cumsum(counts) - counts, counts)  # index of its document's first piece
    piece_starts = np.repeat(starts, counts) + width * (np.arange(int(counts.sum())) - first)
    piece_ends = np.minimum(piece_starts + width, np.repeat(starts + lengths, counts))
    return piece_starts, piece_ends - piece_starts


def packed_rows(tokens: np.ndarray, bos_id: int, B: int, width: int, seed: int,
                buffer_size: int = 1000) -> Iterator[tuple[np.ndarray, int]]:
    """Endless (rows, epoch): B rows of `width` tokens, filled with documents, without padding.

    A document longer than a row is first split into consecutive row-sized pieces (the last one
    shorter): at a short context (evo's CPU runs read 256 tokens; the embedded corpus's documents
    run to thousands) dropping all but each document's first row would throw away most of the
    split. Pieces are drawn in an order shuffled per pass (by `seed` and the pass number) into a
    buffer of `buffer_size`. A row is filled from its start: each time, the longest buffered
    piece that fits in the room left (the earliest drawn among equals); when none fits, the
    shortest one, cut to the room left (the rest of it is dropped). Every document that fits in a
    row arrives whole, starting with BOS. `epoch` counts passes over the split: 1 + the number of
    whole splits' worth of pieces served before this batch's last one.
    """
    starts, lengths = _row_sized_pieces(*split_documents(tokens, bos_id), width)
    buffer_size = max(1, min(buffer_size, starts.size))  # a small split is not buffered several times over
    passes, order, drawn, served = 0, np.empty(0, dtype=np.int64), 0, 0
    buffer: list[tuple[int, int, int]] = []  # (length, draw number, document), sorted
    rows = np.empty((B, width), dtype=np.int64)
    while True:
        for r in range(B):
            pos = 0
            while pos < width:
                while len(buffer) < buffer_size:
                    if drawn % starts.size == 0:
                        passes += 1
                        order = np.random.default_rng([seed % 2**32, passes]).permutation(starts.size)
                    doc = int(order[drawn % starts.size])
                    bisect.insort(buffer, (int(lengths[doc]), drawn, doc))
                    drawn += 1
                room = width - pos
                fits = bisect.bisect_right(buffer, (room, math.inf)) - 1
                if fits >= 0:  # the longest that fits, the earliest drawn of that length
                    i = bisect.bisect_left(buffer, (buffer[fits][0],))
                else:  # none fits: the shortest, cut
                    i = 0
                length, _, doc = buffer.pop(i)
                served += 1
                take = min(length, room)
                rows[r, pos : pos + take] = tokens[starts[doc] : starts[doc] + take]
                pos += take
        yield rows.copy(), 1 + (served - 1) // starts.size


# ---------------------------------------------------------------------------------------------
# Scoring rules: bits per byte and the causality probe (run by the evaluator)
# ---------------------------------------------------------------------------------------------

PROBE_MIXING_EVERY = 4  # one batch in this many (at least one) is also probed for reading other rows
PROBE_TOLERANCE = 1e-4  # on log-probabilities: a causal model's earlier ones do not move at all


class CausalityViolation(RuntimeError):
    """The model's earlier outputs changed when later inputs changed: it sees the future."""


def logits_of(forward, x: torch.Tensor, vocab_size: int) -> torch.Tensor:
    out = forward(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[:2] != x.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model(x) must return logits of shape (B, T, vocab); got {shape} for x {tuple(x.shape)}")
    if out.shape[-1] < vocab_size:
        raise ValueError(f"model returned {out.shape[-1]} logits per position; the vocabulary has {vocab_size}")
    return out[..., :vocab_size].float()


def eval_rows(tokens: np.ndarray, n_tokens: int, T: int) -> torch.Tensor:
    """Consecutive, non-overlapping windows of T+1 tokens from the start of a split."""
    n_rows = min(max(1, min(n_tokens, tokens.size - 1) // T), (tokens.size - 1) // T)
    if n_rows < 1:
        raise PrepareError(f"a split of {tokens.size} tokens is too small for one window of {T}")
    idx = np.arange(T + 1)[None, :] + T * np.arange(n_rows)[:, None]
    return torch.from_numpy(tokens[idx].astype(np.int64))


def score_rows(forward, rows: torch.Tensor, batch_size: int, token_bytes: torch.Tensor, vocab_size: int,
               device, donors: np.ndarray | None = None, rng: random.Random | None = None) -> dict:
    """Bits per byte of `rows` under `forward`, which always gets exactly batch_size rows.

    A batch holds windows that are never neighbours in the text (row b, b + n_batches, ...; at
    least two batches), so no row's continuation sits beside it, and the model gets its input in
    fresh memory that holds nothing else. With `donors` (other text) and `rng` the model is probed
    (`_probe`): once per cut position, rows keep their prefix and get another text's future; and
    in some batches, kept rows stay whole while the other rows are replaced.
    """
    n_rows, T = rows.shape[0], rows.shape[1] - 1
    n_batches = max(min(2, n_rows), -(-n_rows // batch_size))  # two at least: neighbours never share one
    probing = rng is not None and donors is not None and T >= 2
    cuts = rng.sample(range(1, T), T - 1) if probing else []  # every cut position, in an order nobody knows
    cut_chunks = [cuts[i : i + batch_size] for i in range(0, len(cuts), batch_size)]
    mixing = set(rng.sample(range(n_batches), max(1, n_batches // PROBE_MIXING_EVERY))) if probing else set()
    token_bytes = token_bytes.to(device)
    total_nats, total_bytes, total_tokens, probed_rows = 0.0, 0, 0, 0
    for b in range(n_batches):
        members = list(range(b, n_rows, n_batches))
        real = len(members)
        members += [members[i % real] for i in range(batch_size - real)]  # padding, never scored
        batch = rows[members].to(device)
        x, y = batch[:, :-1].clone(memory_format=torch.contiguous_format), batch[:, 1:]
        logits = logits_of(forward, x, vocab_size)
        for chunk in cut_chunks[b::n_batches]:
            probed_rows += _probe(forward, x, logits, vocab_size, donors, rng, dict(enumerate(chunk)), replace_others=False)
        if b in mixing:  # kept rows stay whole and must not move at any position, the last one included
            parity = rng.randrange(2)
            kept = {j: T for j in range(batch_size) if batch_size == 1 or j % 2 == parity}
            probed_rows += _probe(forward, x, logits, vocab_size, donors, rng, kept, replace_others=True)
        logits, y = logits[:real], y[:real]
        nats = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size), y.reshape(-1), reduction="none")
        nbytes = token_bytes[y.reshape(-1)]
        scored = nbytes > 0  # special tokens (BOS) carry no bytes and are not scored
        total_nats += nats[scored].double().sum().item()
        total_bytes += int(nbytes.sum().item())
        total_tokens += int(scored.sum().item())
    return {"bpb": total_nats / (math.log(2) * total_bytes), "loss": total_nats / max(total_tokens, 1),
            "tokens": total_tokens, "bytes": total_bytes, "probed_rows": probed_rows}


def _probe(forward, x: torch.Tensor, logits: torch.Tensor, vocab_size: int, donors: np.ndarray, rng: random.Random,
           cuts: dict[int, int], replace_others: bool) -> int:
    """Rows in `cuts` keep their prefix up to the cut and get another text's future (a cut of T
    keeps the row whole); with replace_others, every other row of the batch is replaced whole. A
    kept row's log-probabilities before its cut must not move: a model that reads ahead, or reads
    other rows, is caught. Returns the number of rows checked."""
    B, T = x.shape
    changed = x.clone()
    for j in range(B):
        start = rng.randrange(0, donors.size - T)
        donor = torch.from_numpy(donors[start : start + T].astype(np.int64)).to(x.device)
        if j in cuts:
            cut = cuts[j]
            if cut < T and donor[cut] == x[j, cut]:  # a common token (a newline) drawn again would hide a
                donor[cut] = (donor[cut] + 1) % vocab_size  # model that reads exactly one position ahead
            changed[j, cut:] = donor[cut:]
        elif replace_others:
            changed[j] = donor
    after = logits_of(forward, changed, vocab_size)
    for j, cut in cuts.items():
        before_j = torch.log_softmax(logits[j, :cut], dim=-1).clamp(min=-100.0)  # a scale-free comparison
        after_j = torch.log_softmax(after[j, :cut], dim=-1).clamp(min=-100.0)
        diff = (before_j - after_j).abs().max().item()
        if not math.isfinite(diff) or diff > PROBE_TOLERANCE:
            raise CausalityViolation(
                f"non-causal model: log-probabilities at positions < {cut} moved by {diff:.3g} when only later "
                "positions (or other rows of the batch) changed"
            )
    return len(cuts)


def score_model(forward, batch_size: int, split: str = "val", data_dir: str | None = None, seq_len: int | None = None,
                eval_tokens: int | None = None, device=None, rng: random.Random | None = None) -> dict:
    """Score a callable model on a split as the evaluator does (probed when rng is given)."""
    data_dir = data_dir or DATA_DIR
    T = seq_len or MAX_SEQ_LEN
    tokenizer = get_tokenizer(data_dir)
    rows = eval_rows(_tokens(split, data_dir), eval_tokens or EVAL_TOKENS, T)
    donors = _tokens("train", data_dir) if rng is not None else None
    with torch.no_grad():
        return score_rows(forward, rows, batch_size, tokenizer.token_bytes, tokenizer.vocab_size,
                          device or DEVICE, donors, rng)


# ---------------------------------------------------------------------------------------------
# The hand-over
# ---------------------------------------------------------------------------------------------


class EvaluationFailed(RuntimeError):
    """The model could not be handed over or scored; the message says why."""


class _Channel:
    """JSON lines over the socket the runner gave this process (EVO_HANDOVER_FD)."""

    def __init__(self, fd: int):
        self.sock = socket.socket(fileno=fd)
        self.replies = self.sock.makefile("r", encoding="utf-8")

    def tell(self, message: dict) -> None:
        self.sock.sendall((json.dumps(message) + "\n").encode())

    def ask(self, message: dict) -> dict:
        self.tell(message)
        line = self.replies.readline()
        if not line:
            raise EvaluationFailed("the runner closed the hand-over channel without an answer")
        return json.loads(line)


_CHANNEL: list[_Channel] = []


def handover_channel() -> _Channel | None:
    if HANDOVER_FD < 0:
        return None
    if not _CHANNEL:
        _CHANNEL.append(_Channel(HANDOVER_FD))
    return _CHANNEL[0]


def _model_device(model: torch.nn.Module) -> str:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device.type
    return DEVICE


def evaluate_bpb(model: torch.nn.Module, tokenizer: Tokenizer, batch_size: int) -> float:
    """Hand the trained model over for scoring and return its validation bits per byte.

    Under evo the model leaves this process as a graph (torch.export, written sealed by
    trainer/sealed.py) and evo's evaluator, a separate process, computes the score from data this
    process cannot read; this function only returns what the evaluator measured. Run by hand
    (no evo around), the model is scored here by the same rules. `tokenizer` is accepted for
    autoresearch's signature; the evaluator uses its own copy.
    """
    channel = handover_channel()
    was_training = model.training
    model.eval()
    try:
        if channel is None or IN_PROCESS:
            if channel is not None:
                channel.tell({"event": "handover"})  # evo's clock stops here; scoring is not training
            splits = ["val"] + (["heldout"] if channel is not None and IN_PROCESS_HELDOUT else [])
            metrics = {}
            for split in splits:
                scored = score_model(model, batch_size, split, device=_model_device(model), rng=random.Random())
                prefix = "val" if split == "val" else "heldout"
                metrics.update({f"{prefix}_bpb": scored["bpb"], f"{prefix}_loss": scored["loss"]})
                if split == "val":
                    metrics.update(eval_tokens=scored["tokens"], eval_bytes=scored["bytes"], probed_rows=scored["probed_rows"])
            if channel is None:
                return metrics["val_bpb"]
            reply = channel.ask({"event": "metrics", "metrics": metrics})
        else:
            reply = channel.ask(_export_for_handover(model, batch_size, channel))
    finally:
        model.train(was_training)
    if "error" in reply:
        raise EvaluationFailed(reply["error"])
    return float(reply["val_bpb"])


def _export_for_handover(model: torch.nn.Module, batch_size: int, channel: _Channel) -> dict:
    from trainer import sealed

    device = _model_device(model)
    name = "model" + sealed.SUFFIX
    started = time.perf_counter()
    try:
        with open(name + ".tmp", "wb") as f:
            sealed.write_model(model, batch_size, MAX_SEQ_LEN, device, f)
        os.replace(name + ".tmp", name)
    except sealed.ExportError as e:
        channel.tell({"event": "export_failed", "reason": str(e)})
        raise EvaluationFailed(f"the model could not be exported for scoring: {e}") from None
    if device == "cuda":
        torch.cuda.empty_cache()  # the evaluator needs room on the same GPU
    return {"event": "handover", "file": name, "export_seconds": round(time.perf_counter() - started, 3)}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def build_arg_parser(prog: str = "prepare.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Build evo's data directory: corpus, train/val/heldout splits, BPE tokenizer, tokens.",
    )
    p.add_argument("--source", default="embedded",
                   help="'embedded' (the running Python's standard library, offline; default), "
                        "'hf:NAME[:CONFIG]' (Hugging Face, streaming) or 'files:GLOB' (.txt/.jsonl/.parquet)")
    p.add_argument("--data-dir", default=DATA_DIR, help=f"output directory (default: $EVO_DATA_DIR or {DEFAULT_DATA_DIR})")
    p.add_argument("--vocab-size", type=_positive_int, default=DEFAULT_VOCAB_SIZE, help="tokens, BOS included (default: %(default)s)")
    p.add_argument("--text-column", default="text", help="text field for .jsonl/.parquet/hf sources (default: %(default)s)")
    p.add_argument("--hf-split", default="train", help="split of an hf: dataset to stream (default: %(default)s)")
    p.add_argument("--max-bytes", type=_positive_int, default=0, help="stop reading after this many bytes (0: all)")
    p.add_argument("--force", action="store_true", help="rebuild even if a matching cache exists")
    return p


def main(argv: list[str] | None = None, prog: str = "prepare.py") -> int:
    args = build_arg_parser(prog).parse_args(argv)
    settings = PrepareSettings(
        source=args.source, vocab_size=args.vocab_size, text_column=args.text_column,
        hf_split=args.hf_split, max_bytes=args.max_bytes,
    )
    try:
        meta = build(settings, args.data_dir, force=args.force)
    except PrepareError as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    print(summary(meta, args.data_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
