"""Data, tokenizer, splits, dataloader and the trusted evaluation. Fixed during a run.

Two faces, one file (as in autoresearch):

* `python prepare.py [--source ...]` is the one-time set-up: it reads a corpus, splits its
  documents by a stable hash into train / val / heldout, trains a BPE tokenizer on train only,
  tokenizes, and writes the splits plus `meta.json` (with a fingerprint) to the data directory.
* `import prepare` is the runtime API for variants: settings from the `EVO_` environment,
  `get_tokenizer()`, `make_dataloader(...)` and `evaluate_bpb(...)`, the only number evo trusts.

Variants must not modify this file; the runner hashes it before and after every run.
"""

from __future__ import annotations

import argparse
import base64
import glob
import hashlib
import json
import math
import os
import random
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
META_VERSION = 2  # bump when the split or tokenization rules change: old caches rebuild


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
METRICS_PATH = os.environ.get("EVO_METRICS_PATH") or ""
HELDOUT = os.environ.get("EVO_HELDOUT", "0") == "1"


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

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

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


def _embedded_documents() -> Iterator[str]:
    """The .py files of the running CPython's standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EMBEDDED_SKIP_DIRS)
        paths.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    for path in sorted(paths):
        yield path.read_text(encoding="utf-8", errors="replace")


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


def assign_splits(texts: list[str]) -> list[str]:
    """Stable split of each document, by a hash of its content.

    One document in ten (by hash) is an evaluation document; those are dealt, in hash order,
    to whichever of val and heldout holds fewer bytes so far, so the two come out about the
    same size even on a corpus of a few hundred files.
    """
    buckets = [_hash_bucket(t) for t in texts]
    splits = ["train"] * len(texts)
    held = [i for i, b in enumerate(buckets) if b % 1000 < EVAL_PER_MILLE]
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
    for path in [data_dir / "tokenizer.json"] + [_split_path(data_dir, s) for s in SPLIT_NAMES]:
        h.update(path.name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def build(settings: PrepareSettings, data_dir: str | Path, force: bool = False) -> dict:
    """Build (or reuse) the data directory; returns its meta.json content."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if meta_path.is_file() and not force:
        meta = json.loads(meta_path.read_text())
        files_present = all(_split_path(data_dir, s).is_file() for s in SPLIT_NAMES)
        if meta.get("version") == META_VERSION and meta.get("settings") == asdict(settings) and files_present:
            meta["cached"] = True
            return meta

    started = time.perf_counter()
    texts: list[str] = []
    total = 0
    for text in iter_documents(settings.source, settings.text_column, settings.hf_split):
        if not text.strip():
            continue
        texts.append(text)
        total += len(text.encode("utf-8", "replace"))
        if settings.max_bytes and total >= settings.max_bytes:
            break
    docs: dict[str, list[str]] = {s: [] for s in SPLIT_NAMES}
    for text, split in zip(texts, assign_splits(texts)):
        docs[split].append(text)
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

_VARIANT_SPLITS = ("train", "val")  # heldout is evaluated by evaluate_bpb only, never served


def _tokens(split: str, data_dir: str | None = None) -> np.ndarray:
    data_dir = data_dir or DATA_DIR
    _require_prepared(data_dir)
    return np.memmap(_split_path(Path(data_dir), split), dtype=TOKEN_DTYPE, mode="r")


def make_dataloader(tokenizer: Tokenizer, B: int, T: int, split: str = "train") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches (x, y) of B random windows of T tokens, y shifted by one, on DEVICE.

    The order depends only on EVO_SEED and the split, so two runs with the same seed see the
    same data and a new seed sees a new order.
    """
    if split not in _VARIANT_SPLITS:
        raise ValueError(f"make_dataloader serves {_VARIANT_SPLITS}, not {split!r}")
    tokens = _tokens(split)
    if tokens.size < T + 2:
        raise PrepareError(f"the {split} split has {tokens.size} tokens, fewer than T+1={T + 1}")
    salt = SPLIT_NAMES.index(split)
    generator = torch.Generator().manual_seed(SEED * 1000 + salt)
    pin = DEVICE == "cuda"
    while True:
        starts = torch.randint(0, tokens.size - T - 1, (B,), generator=generator).tolist()
        rows = np.stack([tokens[s : s + T + 1] for s in starts]).astype(np.int64)
        batch = torch.from_numpy(rows)
        if pin:
            batch = batch.pin_memory()
        batch = batch.to(DEVICE, non_blocking=pin)
        yield batch[:, :-1], batch[:, 1:]


class CausalityViolation(RuntimeError):
    """The model's earlier outputs changed when later inputs changed: it sees the future."""


def _logits_of(model: torch.nn.Module, x: torch.Tensor, vocab_size: int) -> torch.Tensor:
    out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[:2] != x.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model(x) must return logits of shape (B, T, vocab); got {shape} for x {tuple(x.shape)}")
    if out.shape[-1] < vocab_size:
        raise ValueError(f"model returned {out.shape[-1]} logits per position; the vocabulary has {vocab_size}")
    return out[..., :vocab_size].float()


def _eval_rows(split: str, n_tokens: int, T: int) -> torch.Tensor:
    """Consecutive, non-overlapping windows of T+1 tokens from the start of a split."""
    tokens = _tokens(split)
    n_rows = max(1, min(n_tokens, tokens.size - 1) // T)
    n_rows = min(n_rows, (tokens.size - 1) // T)
    if n_rows < 1:
        raise PrepareError(f"the {split} split has {tokens.size} tokens, too few for one window of {T}")
    idx = np.arange(T + 1)[None, :] + T * np.arange(n_rows)[:, None]
    return torch.from_numpy(tokens[idx].astype(np.int64))


def _probe_causality(model, x: torch.Tensor, vocab_size: int) -> str | None:
    """Change the second half of the inputs; the first half's logits must not move."""
    T = x.shape[1]
    cut = T // 2
    changed = x.clone()
    generator = torch.Generator().manual_seed(1234)
    changed[:, cut:] = torch.randint(0, vocab_size - 1, changed[:, cut:].shape, generator=generator).to(x.device)
    before = _logits_of(model, x, vocab_size)[:, :cut]
    after = _logits_of(model, changed, vocab_size)[:, :cut]
    diff = (before - after).abs().max().item()
    scale = before.abs().max().item()
    if not math.isfinite(diff) or diff > 1e-3 * max(1.0, scale):
        return f"logits at positions < {cut} changed by {diff:.3g} when only positions >= {cut} changed"
    return None


def _bpb_of_rows(model, rows: torch.Tensor, batch_size: int, token_bytes: torch.Tensor, vocab_size: int, device: str):
    total_nats, total_bytes, total_tokens = 0.0, 0, 0
    for i in range(0, rows.shape[0], batch_size):
        batch = rows[i : i + batch_size].to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        logits = _logits_of(model, x, vocab_size)
        nats = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size), y.reshape(-1), reduction="none")
        nbytes = token_bytes[y.reshape(-1)]
        scored = nbytes > 0  # special tokens (BOS) carry no bytes and are not scored
        total_nats += nats[scored].double().sum().item()
        total_bytes += int(nbytes.sum().item())
        total_tokens += int(scored.sum().item())
    return total_nats / (math.log(2) * total_bytes), total_nats / max(total_tokens, 1), total_tokens, total_bytes


def _write_metrics(metrics: dict) -> None:
    if not METRICS_PATH:
        return
    tmp = METRICS_PATH + ".tmp"
    with open(tmp, "w") as f:
        json.dump(metrics, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, METRICS_PATH)


# What evaluate_bpb relies on, as it was at import. A variant that swaps one of these (for
# example through vars(prepare) or by patching torch's cross-entropy) is caught and marked.
_TRUSTED_NAMES = ("_logits_of", "_eval_rows", "_probe_causality", "_bpb_of_rows", "_write_metrics",
                  "_tokens", "read_meta", "_require_prepared")
_TRUSTED = {name: (globals()[name], globals()[name].__code__) for name in _TRUSTED_NAMES}
_TRUSTED_TORCH = (torch.nn.functional.cross_entropy, torch.Tensor.sum, torch.autocast)


def _integrity_problem() -> str | None:
    for name, (function, code) in _TRUSTED.items():
        if globals().get(name) is not function or function.__code__ is not code:
            return f"prepare.{name} was replaced or modified"
    if (torch.nn.functional.cross_entropy, torch.Tensor.sum, torch.autocast) != _TRUSTED_TORCH:
        return "torch functions used by evaluate_bpb were replaced"
    return None


def evaluate_bpb(model: torch.nn.Module, tokenizer: Tokenizer, batch_size: int) -> float:
    """Validation bits per byte, computed here from the model's logits. The trusted number.

    Writes the metrics JSON to EVO_METRICS_PATH; with EVO_HELDOUT=1 it also scores the held-out
    split into that file, and never prints it. Returns val_bpb.
    """
    started = time.perf_counter()
    T = MAX_SEQ_LEN
    device = next(model.parameters()).device.type if any(True for _ in model.parameters()) else DEVICE
    token_bytes = tokenizer.token_bytes.to(device)
    vocab = tokenizer.vocab_size
    was_training = model.training
    model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    meta = read_meta()
    metrics: dict = {"seq_len": T, "eval_tokens_requested": EVAL_TOKENS, "data_fingerprint": meta["fingerprint"]}
    problem = _integrity_problem()
    if problem:
        _write_metrics({**metrics, "tampered": problem})
        raise RuntimeError(f"evaluation refused: {problem}")
    try:
        with torch.no_grad(), autocast:
            val_rows = _eval_rows("val", EVAL_TOKENS, T)
            violation = _probe_causality(model, val_rows[: min(batch_size, 4)].to(device)[:, :-1], vocab)
            if violation:
                _write_metrics({**metrics, "tampered": "non-causal model: " + violation})
                raise CausalityViolation(violation)
            val_bpb, val_loss, n_tokens, n_bytes = _bpb_of_rows(model, val_rows, batch_size, token_bytes, vocab, device)
            metrics.update(val_bpb=val_bpb, val_loss=val_loss, eval_tokens=n_tokens, eval_bytes=n_bytes)
            if HELDOUT:
                rows = _eval_rows("heldout", EVAL_TOKENS, T)
                heldout_bpb, heldout_loss, _, _ = _bpb_of_rows(model, rows, batch_size, token_bytes, vocab, device)
                metrics.update(heldout_bpb=heldout_bpb, heldout_loss=heldout_loss)
    finally:
        model.train(was_training)
    metrics["eval_seconds"] = round(time.perf_counter() - started, 3)
    _write_metrics(metrics)
    return val_bpb


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


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prepare.py",
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


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
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
