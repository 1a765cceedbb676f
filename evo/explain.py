"""Plain words about what a run's numbers mean: the untrained score, and what training reported.

A model that learned nothing scores what a uniform guess over the vocabulary scores: a loss of
ln(V) per token, so ln(V) / ln(2) * tokens / bytes bits per byte of the split it is scored on.
A seed that is not clearly below that was not trained (too few steps on a loaded machine, a
budget too short): everything bred from it is noise, so evo says so loudly.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

# "Clearly better" than a uniform guess: at least this fraction of its bits per byte saved.
LEARNED_FRACTION = 0.02


def untrained_bpb(metrics: dict, vocab_size: int | None) -> float | None:
    """The bits per byte a uniform guess would score on the very tokens these metrics were scored on."""
    tokens, nbytes = metrics.get("eval_tokens"), metrics.get("eval_bytes")
    if not vocab_size or not tokens or not nbytes:
        return None
    return math.log(vocab_size) / math.log(2) * tokens / nbytes


def vocab_size_of(run_info: dict) -> int | None:
    """The run's vocabulary: recorded at start, else from its data directory's meta.json (older runs)."""
    if run_info.get("vocab_size"):
        return int(run_info["vocab_size"])
    try:
        return int(json.loads((Path(run_info["data_dir"]) / "meta.json").read_text())["vocab_size"])
    except (KeyError, OSError, ValueError, TypeError):
        return None


def did_not_learn(val_bpb: float | None, untrained: float | None) -> bool:
    return val_bpb is not None and untrained is not None and val_bpb > untrained * (1 - LEARNED_FRACTION)


_STEPS_LINE = re.compile(r"^num_steps:\s*(\d+)\s*$", re.MULTILINE)
_TOKENS_LINE = re.compile(r"^total_tokens_M:\s*([0-9.]+)\s*$", re.MULTILINE)


def printed_steps(log_text: str) -> int | None:
    """The `num_steps:` of the summary block the variant printed (autoresearch's), if any.
    The variant's own claim: informative, never used to decide anything."""
    found = _STEPS_LINE.findall(log_text or "")
    return int(found[-1]) if found else None


def reported_training(log_path: Path) -> str:
    """What the variant printed about its own training (autoresearch's summary block): steps and
    tokens. Its own claim, not measured by evo; "" when it printed none."""
    try:
        text = log_path.read_text(errors="replace")[-20000:]
    except OSError:
        return ""
    steps, tokens = printed_steps(text), _TOKENS_LINE.findall(text)
    parts = ([f"{steps} training steps"] if steps is not None else []) + ([f"{tokens[-1]}M training tokens"] if tokens else [])
    return ", ".join(parts) + " (as the variant reports)" if parts else ""


def evaluation_size(metrics: dict) -> str:
    """How much text one evaluation scored, e.g. "scored on 16,384 val tokens (61,234 bytes)"."""
    tokens, nbytes = metrics.get("eval_tokens"), metrics.get("eval_bytes")
    if not tokens:
        return ""
    return f"scored on {tokens:,} val tokens" + (f" ({nbytes:,} bytes)" if nbytes else "")


def untrained_warning(who: str, val_bpb: float | None, metrics: dict, vocab_size: int | None,
                      log_path: Path | None = None) -> str | None:
    """A loud paragraph when `who` (the seed, the champion) is not clearly better than a uniform guess."""
    untrained = untrained_bpb(metrics, vocab_size)
    if not did_not_learn(val_bpb, untrained):
        return None
    trained = reported_training(log_path) if log_path is not None else ""
    return (f"WARNING: {who} DID NOT LEARN: val_bpb {val_bpb:.4f} is no better than a uniform guess over the "
            f"{vocab_size:,}-token vocabulary (untrained score {untrained:.4f} = ln({vocab_size})/ln(2) x tokens/bytes"
            f" of the val tokens scored)." + (f" It reports {trained}." if trained else "")
            + " Differences between such variants are noise. Give training more time: raise budget.seconds "
            "(--set budget.seconds=60), run on a less loaded machine, or check the seed with `evo eval FILE`.")
