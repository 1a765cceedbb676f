"""prepare.py: the data contract and the trusted evaluation."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import prepare

REPO = Path(__file__).resolve().parents[1]


class ConstantLogits(torch.nn.Module):
    """Predicts the same distribution everywhere: its bpb is easy to compute by hand."""

    def __init__(self, vocab_size: int, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.logits = torch.nn.Parameter(torch.randn(vocab_size, generator=generator))

    def forward(self, idx):
        return self.logits.expand(*idx.shape, -1)


class PeeksAhead(torch.nn.Module):
    """Its prediction at position t is built from token t+1: a cheat the causality probe must catch."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, vocab_size)

    def forward(self, idx):
        shifted = torch.cat([idx[:, 1:], idx[:, -1:]], dim=1)
        return self.embed(shifted)


def _hand_bpb(data_dir, logits: np.ndarray, seq_len: int, eval_tokens: int) -> float:
    """The definition, spelled out with numpy and tiktoken, independent of evaluate_bpb."""
    tok = prepare.get_tokenizer(str(data_dir))
    stream = np.fromfile(Path(data_dir) / "val.bin", dtype=np.uint16).astype(np.int64)
    n_rows = min(eval_tokens, stream.size - 1) // seq_len
    log_probs = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    nats, nbytes = 0.0, 0
    for r in range(n_rows):
        for target in stream[r * seq_len + 1 : r * seq_len + seq_len + 1]:
            if target == tok.bos_id:
                continue  # special tokens are not scored
            nats -= log_probs[target]
            nbytes += len(tok.encoding.decode_single_token_bytes(int(target)))
    return nats / math.log(2) / nbytes


def test_bpb_equals_hand_computation(small_data, use_data):
    use_data(small_data, seq_len=32, eval_tokens=2048)
    tok = prepare.get_tokenizer()
    model = ConstantLogits(tok.vocab_size)
    expected = _hand_bpb(small_data, model.logits.detach().double().numpy(), 32, 2048)
    scored = prepare.score_model(model, batch_size=8)
    assert scored["bpb"] == pytest.approx(expected, rel=1e-6)
    assert scored["tokens"] > 1900
    # A batch size that does not divide the rows pads the last batch; padding is never scored.
    assert prepare.score_model(model, batch_size=7)["bpb"] == pytest.approx(expected, rel=1e-6)
    # Run by hand (no evo around it), evaluate_bpb scores by the same rules.
    assert prepare.evaluate_bpb(model, tok, batch_size=8) == pytest.approx(expected, rel=1e-6)


def test_uniform_model_scores_log2_vocab_per_token(small_data, use_data):
    use_data(small_data, seq_len=32, eval_tokens=1024)
    tok = prepare.get_tokenizer()
    model = ConstantLogits(tok.vocab_size)
    with torch.no_grad():
        model.logits.zero_()
    m = prepare.score_model(model, batch_size=4)
    assert m["bpb"] == pytest.approx(m["tokens"] * math.log2(tok.vocab_size) / m["bytes"], rel=1e-6)


def test_token_bytes_are_raw_bytes_not_decoded_text(small_data):
    tok = prepare.get_tokenizer(str(small_data))
    text = "naïve café 日本語 ✓ Ünïcödé"
    ids = tok.encode(text)
    assert int(tok.token_bytes[ids].sum()) == len(text.encode("utf-8"))
    # Some token holds part of a multi-byte character; decode().encode() would miscount it.
    miscounted = [i for i in ids if len(tok.decode([i]).encode()) != int(tok.token_bytes[i])]
    assert miscounted, "expected a token that is a fragment of a UTF-8 character"
    assert int(tok.token_bytes[tok.bos_id]) == 0


def test_heldout_is_a_different_split_and_a_standalone_run_scores_val_only(small_data, use_data, capsys):
    use_data(small_data, seq_len=32, eval_tokens=1024)
    tok = prepare.get_tokenizer()
    model = ConstantLogits(tok.vocab_size)
    val = prepare.score_model(model, 4, "val")["bpb"]
    held = prepare.score_model(model, 4, "heldout")["bpb"]
    assert math.isfinite(held) and held != val
    assert prepare.evaluate_bpb(model, tok, batch_size=4) == pytest.approx(val)
    out = capsys.readouterr()
    assert f"{held:.4f}" not in out.out + out.err


class PeeksInSecondHalf(torch.nn.Module):
    """Causal for the first half of every window, reads the next token in the second half."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, vocab_size)

    def forward(self, idx):
        T = idx.shape[1]
        ahead = torch.cat([idx[:, 1:], idx[:, -1:]], dim=1)
        mixed = torch.cat([idx[:, : T // 2], ahead[:, T // 2 :]], dim=1)
        return self.embed(mixed)


class ReadsOtherRows(torch.nn.Module):
    """Causal within a row, but each position also sees another row of the batch: rows leak into each other."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, vocab_size)

    def forward(self, idx):
        neighbour = torch.nn.functional.one_hot(idx.roll(1, dims=0), self.embed.num_embeddings).float()
        return self.embed(idx) + 1e-2 * neighbour  # the same position of the previous row raises its token


@pytest.mark.parametrize("cheat", [PeeksAhead, PeeksInSecondHalf, ReadsOtherRows])
def test_models_that_see_the_future_or_other_rows_are_caught(small_data, use_data, cheat):
    import random

    use_data(small_data, seq_len=32, eval_tokens=1024)
    tok = prepare.get_tokenizer()
    with pytest.raises(prepare.CausalityViolation, match="non-causal"):
        prepare.score_model(cheat(tok.vocab_size), batch_size=4, rng=random.Random(0))


def test_a_causal_model_passes_the_probe_with_any_plan(small_data, use_data):
    import random

    use_data(small_data, seq_len=32, eval_tokens=1024)
    tok = prepare.get_tokenizer()
    model = torch.nn.Embedding(tok.vocab_size, tok.vocab_size)
    plain = prepare.score_model(model, batch_size=4)["bpb"]
    for seed in range(5):
        probed = prepare.score_model(model, batch_size=4, rng=random.Random(seed))
        assert probed["bpb"] == pytest.approx(plain) and probed["probed_rows"] >= 2


def test_splits_are_disjoint_and_hold_every_document(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = [f"document {i}: " + " ".join(f"word{(i * j) % 97}" for j in range(60)) for i in range(400)]
    for i, text in enumerate(texts):
        (corpus / f"{i:04d}.txt").write_text(text)
    (corpus / "copy.txt").write_text(texts[7])  # a duplicate lands in the same split as its twin
    data = tmp_path / "data"
    meta = prepare.build(prepare.PrepareSettings(source=f"files:{corpus}/*.txt", vocab_size=300), data)
    tok = prepare.get_tokenizer(str(data))
    docs_by_split = {}
    for split in prepare.SPLIT_NAMES:
        ids = np.fromfile(data / f"{split}.bin", dtype=np.uint16).tolist()
        docs, current = [], []
        for t in ids + [tok.bos_id]:
            if t == tok.bos_id:
                if current:
                    docs.append(tok.decode(current))
                current = []
            else:
                current.append(t)
        docs_by_split[split] = set(docs)
        assert meta["splits"][split]["documents"] == len(docs)
        assert docs.count(texts[7]) in (0, 2)  # both copies or neither
    train, val, held = (docs_by_split[s] for s in prepare.SPLIT_NAMES)
    assert not (train & val) and not (train & held) and not (val & held)
    assert train | val | held == set(texts)
    assert len(val) > 0 and len(held) > 0


def test_heldout_is_about_the_size_of_val(default_data):
    splits = prepare.read_meta(str(default_data))["splits"]
    ratio = splits["heldout"]["bytes"] / splits["val"]["bytes"]
    assert 0.7 < ratio < 1.4
    assert splits["train"]["bytes"] > 10 * splits["val"]["bytes"]


def test_fingerprint_is_stable_and_changes_with_the_data(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(300):
        (corpus / f"{i}.txt").write_text(f"text number {i} " * 20)
    settings = prepare.PrepareSettings(source=f"files:{corpus}/*.txt", vocab_size=300)
    first = prepare.build(settings, tmp_path / "a")
    again = prepare.build(settings, tmp_path / "b")
    assert first["fingerprint"] == again["fingerprint"]
    assert prepare.build(settings, tmp_path / "a")["cached"] is True
    (corpus / "5.txt").write_text("a different document entirely " * 10)
    changed = prepare.build(settings, tmp_path / "a", force=True)
    assert changed["fingerprint"] != first["fingerprint"]


@pytest.mark.parametrize("damage", ["tokenizer.json", "val.bin"])
def test_a_damaged_data_directory_is_an_error_that_says_how_to_rebuild(small_data, tmp_path, damage):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    assert prepare.verify(data)["fingerprint"] == prepare.read_meta(str(small_data))["fingerprint"]
    with open(data / damage, "r+b") as f:
        f.seek(40)
        f.write(b"\x00\x01")
    with pytest.raises(prepare.PrepareError, match="changed after it was prepared") as caught:
        prepare.verify(data)
    assert f"evo prepare --force --data-dir {data}" in str(caught.value)
    settings = prepare.PrepareSettings(**prepare.read_meta(str(data))["settings"])
    with pytest.raises(prepare.PrepareError, match="--force"):  # evo prepare never reuses a damaged cache
        prepare.build(settings, data)
    (data / damage).unlink()
    with pytest.raises(prepare.PrepareError, match="cannot be read"):
        prepare.verify(data)


def test_jsonl_and_parquet_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"record {i} says hello to record {i * 3}" for i in range(300)]
    with open(tmp_path / "a.jsonl", "w") as f:
        for t in texts[:150]:
            f.write(json.dumps({"body": t}) + "\n")
    pq.write_table(pa.table({"body": texts[150:]}), tmp_path / "b.parquet")
    meta = prepare.build(
        prepare.PrepareSettings(source=f"files:{tmp_path}/*.*", vocab_size=280, text_column="body"), tmp_path / "d"
    )
    assert sum(s["documents"] for s in meta["splits"].values()) == 300


def test_dataloader_is_deterministic_per_seed_and_serves_train_only(small_data, use_data, monkeypatch):
    use_data(small_data)
    tok = prepare.get_tokenizer()
    monkeypatch.setattr(prepare, "SEED", 1)
    a = next(prepare.make_dataloader(tok, 4, 16, "train"))
    b = next(prepare.make_dataloader(tok, 4, 16, "train"))
    monkeypatch.setattr(prepare, "SEED", 2)
    c = next(prepare.make_dataloader(tok, 4, 16, "train"))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert torch.equal(a[0][:, 1:], a[1][:, :-1])  # y is x shifted by one
    for split in ("val", "heldout"):
        with pytest.raises(ValueError, match="train split only"):
            next(prepare.make_dataloader(tok, 4, 16, split))


def _prepare_cli(*args, env=None, timeout=60):
    return subprocess.run(
        [sys.executable, str(REPO / "prepare.py"), *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--vocab-size", "lots"], "is not a number"),
        (["--vocab-size", "100"], "out of range"),
        (["--source", "ftp://x"], "unknown --source"),
        (["--source", "files:/nonexistent/*.txt"], "matched no files"),
        (["--source", "hf:"], "needs a dataset name"),
    ],
)
def test_bad_flags_give_clear_errors(args, message, tmp_path):
    proc = _prepare_cli(*args, "--data-dir", str(tmp_path / "d"))
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_empty_source_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("   \n")
    proc = _prepare_cli("--source", f"files:{tmp_path}/*.txt", "--data-dir", str(tmp_path / "d"))
    assert proc.returncode == 2 and "no non-empty documents" in proc.stderr


def test_too_small_source_names_the_empty_split(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"tiny {i}")
    proc = _prepare_cli("--source", f"files:{tmp_path}/*.txt", "--data-dir", str(tmp_path / "d"))
    assert proc.returncode == 2 and "too small" in proc.stderr


def test_missing_data_dir_says_to_run_prepare(tmp_path):
    with pytest.raises(prepare.PrepareError, match="python prepare.py"):
        prepare.get_tokenizer(str(tmp_path / "nothing-here"))


def test_hf_source_without_internet_fails_fast(tmp_path):
    with socket.socket() as s:  # a loopback port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _prepare_cli("--source", "hf:someone/corpus", "--data-dir", str(tmp_path / "d"),
                        env={"HF_ENDPOINT": f"http://127.0.0.1:{port}"}, timeout=30)
    assert proc.returncode == 2
    assert "cannot reach the Hugging Face hub" in proc.stderr and "--source embedded" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _prepare_cli("--source", "hf:someone/corpus", "--data-dir", str(tmp_path / "d"), env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "HF_HUB_OFFLINE" in proc.stderr


class PeeksAtOnePosition(torch.nn.Module):
    """Causal everywhere but one position, which reads the next token: only a probe cut right after it sees it."""

    def __init__(self, vocab_size: int, position: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, vocab_size)
        self.position = position

    def forward(self, idx):
        out = self.embed(idx)
        peek = torch.nn.functional.one_hot(idx[:, self.position + 1], out.shape[-1]).float() * 20.0
        return torch.cat([out[:, : self.position], out[:, self.position : self.position + 1] + peek[:, None],
                          out[:, self.position + 1 :]], dim=1)


class HidesBehindHugeLogits(PeeksAhead):
    """Reads ahead, and puts -1e30 on BOS (never a target) so that a scale-relative tolerance would be huge."""

    def forward(self, idx):
        out = super().forward(idx).clone()
        out[..., -1] = -1e30
        return out


@pytest.mark.parametrize("position", [0, 13, 30])
def test_every_position_is_probed_so_a_single_peek_is_caught(small_data, use_data, position):
    import random

    use_data(small_data, seq_len=32, eval_tokens=1024)
    tok = prepare.get_tokenizer()
    for seed in range(3):  # whatever the plan, every cut position is tried once
        with pytest.raises(prepare.CausalityViolation):
            prepare.score_model(PeeksAtOnePosition(tok.vocab_size, position), batch_size=4, rng=random.Random(seed))


def test_huge_logits_do_not_widen_the_probes_tolerance(small_data, use_data):
    import random

    use_data(small_data, seq_len=32, eval_tokens=1024)
    tok = prepare.get_tokenizer()
    with pytest.raises(prepare.CausalityViolation):
        prepare.score_model(HidesBehindHugeLogits(tok.vocab_size), batch_size=4, rng=random.Random(0))
