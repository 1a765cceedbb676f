"""autoresearch's variant-side API: a train.py written for autoresearch runs under evo unchanged
(apart from its attention kernel): the same import line, Tokenizer.from_directory(), and a
dataloader of best-fit packed documents yielding (x, y, epoch)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import prepare
from trainer.runner import RunSettings, run_variant


def packed(small_data, use_data, B=4, T=64, **kwargs):
    use_data(small_data)
    tok = prepare.Tokenizer.from_directory()
    return tok, prepare.make_dataloader(tok, B, T, "train", **kwargs)


def train_documents(small_data, bos):
    tokens = np.fromfile(small_data / "train.bin", dtype=prepare.TOKEN_DTYPE).astype(np.int64)
    starts = np.flatnonzero(tokens == bos)
    return [tokens[a:b] for a, b in zip(starts, list(starts[1:]) + [tokens.size])]


def test_the_autoresearch_import_line_and_tokenizer_calls_work(small_data, use_data):
    use_data(small_data)
    from prepare import MAX_SEQ_LEN, TIME_BUDGET, Tokenizer, make_dataloader, evaluate_bpb  # noqa: F401

    tok = Tokenizer.from_directory()
    assert tok.get_vocab_size() == prepare.get_tokenizer().vocab_size == 512
    assert tok.get_bos_token_id() == tok.bos_id == tok.get_vocab_size() - 1
    assert tok.encode("x = 1", prepend=tok.get_bos_token_id())[0] == tok.bos_id
    assert tok.encode(["a", "b"], prepend=prepare.BOS_TOKEN)[1][0] == tok.bos_id
    assert Tokenizer.from_directory(str(small_data)).get_vocab_size() == 512
    assert isinstance(MAX_SEQ_LEN, int) and TIME_BUDGET > 0


def test_packed_rows_are_full_and_made_of_documents_whole_or_in_row_sized_pieces(small_data, use_data):
    tok, loader = packed(small_data, use_data, B=4, T=64)
    documents = {tuple(d) for d in train_documents(small_data, tok.bos_id)}
    for _ in range(20):
        x, y, epoch = next(loader)
        assert x.shape == y.shape == (4, 64) and x.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
        rows = torch.cat([x, y[:, -1:]], dim=1).numpy()  # the T+1 tokens of each row
        assert (rows >= 0).all() and (rows < tok.vocab_size).all()  # full: no padding value
        for row in rows:
            starts = list(np.flatnonzero(row == tok.bos_id)) + [row.size]
            pieces = [tuple(row[a:b]) for a, b in zip(starts, starts[1:])]
            if starts[0] > 0:  # a row may open with a later piece of a document longer than a row
                head = tuple(row[: starts[0]])
                assert any(_contains(d, head) for d in documents)
            if not pieces:  # the row is one middle piece of a long document
                continue
            for piece in pieces[:-1]:  # whole documents of the train split
                assert piece in documents
            # the last may be cut to fill the row, or be a longer document's first piece: a prefix
            assert any(d[: len(pieces[-1])] == pieces[-1] for d in documents if len(d) >= len(pieces[-1]))


def _contains(document: tuple, piece: tuple) -> bool:
    n = len(piece)
    return any(document[i : i + n] == piece for i in range(len(document) - n + 1))


def test_packing_is_best_fit_and_cuts_a_document_only_when_none_fits():
    bos = 9

    def stream(*sizes):  # documents of these lengths (BOS included), token i in document i
        return np.concatenate([[bos] + [i] * (n - 1) for i, n in enumerate(sizes)]).astype(np.uint16)

    def lengths(row):
        starts = list(np.flatnonzero(row == bos)) + [row.size]
        return [b - a for a, b in zip(starts, starts[1:])]

    # The longest that fits the 8 free tokens (7), then the longest that fits the 1 left.
    rows, epoch = next(prepare.packed_rows(stream(5, 3, 2, 7, 4, 1), bos, B=1, width=8, seed=0))
    assert lengths(rows[0]) == [7, 1] and epoch == 1
    # After the 6, nothing fits the 2 left: the shortest document is cut to fill the row.
    rows, _ = next(prepare.packed_rows(stream(5, 6, 5), bos, B=1, width=8, seed=3))
    assert lengths(rows[0]) == [6, 2] and rows[0].tolist()[:6] == [bos, 1, 1, 1, 1, 1]
    # A document longer than a row is served as consecutive row-sized pieces, not cut to its first
    # row: at a short context that would drop most of the split.
    rows, epoch = next(prepare.packed_rows(stream(20), bos, B=2, width=8, seed=0))
    assert sorted(rows.tolist()) == sorted([[bos] + [0] * 7, [0] * 8]) and epoch == 1  # its two full pieces


def test_epoch_counts_passes_over_the_train_split(small_data, use_data):
    tok, loader = packed(small_data, use_data, B=8, T=256, buffer_size=4)
    train_tokens = sum(len(d) for d in train_documents(small_data, tok.bos_id))
    epochs = [next(loader)[2] for _ in range(3 * train_tokens // (8 * 257) + 4)]
    assert epochs[0] == 1 and epochs == sorted(epochs)  # counted from 1, never backwards
    assert epochs[-1] >= 3  # three splits' worth of rows need at least three passes


def test_packing_is_deterministic_for_a_seed_and_differs_across_seeds(small_data, use_data, monkeypatch):
    monkeypatch.setattr(prepare, "SEED", 1)
    _, a = packed(small_data, use_data)
    _, b = packed(small_data, use_data)
    monkeypatch.setattr(prepare, "SEED", 2)
    _, c = packed(small_data, use_data)
    first_a, first_b, first_c = next(a), next(b), next(c)
    assert torch.equal(first_a[0], first_b[0]) and torch.equal(first_a[1], first_b[1])
    assert not torch.equal(first_a[0], first_c[0])


def test_only_train_is_served_in_either_form(small_data, use_data):
    use_data(small_data)
    for tok in (prepare.Tokenizer.from_directory(), prepare.get_tokenizer()):
        for split in ("val", "heldout"):
            with pytest.raises(ValueError, match="train split only"):
                next(prepare.make_dataloader(tok, 4, 16, split))


def test_evos_own_tokenizer_keeps_its_windows_and_either_form_can_be_asked_for(small_data, use_data):
    use_data(small_data)
    tok = prepare.get_tokenizer()
    assert len(next(prepare.make_dataloader(tok, 2, 16, "train"))) == 2  # what evo's seeds unpack
    x, y, epoch = next(prepare.make_dataloader(tok, 2, 16, "train", packed=True))
    assert x.shape == (2, 16) and epoch == 1  # the packed form: (x, y, epoch)
    assert len(next(prepare.make_dataloader(prepare.Tokenizer.from_directory(), 2, 16, packed=False))) == 2


# An autoresearch-style train.py at toy size: the same import line, setup, loop and summary as
# autoresearch's, a small causal GPT with torch's own attention in place of flash-attention 3.
AUTORESEARCH_STYLE = '''
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from prepare import MAX_SEQ_LEN, TIME_BUDGET, Tokenizer, make_dataloader, evaluate_bpb

N_LAYER = 2
N_EMBD = 64
N_HEAD = 4
DEVICE_BATCH_SIZE = 8
LEARNING_RATE = 3e-3
MAX_STEPS = 8


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(N_EMBD, 3 * N_EMBD, bias=False)
        self.proj = nn.Linear(N_EMBD, N_EMBD, bias=False)
        self.fc = nn.Linear(N_EMBD, 4 * N_EMBD, bias=False)
        self.out = nn.Linear(4 * N_EMBD, N_EMBD, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(F.rms_norm(x, (C,))).view(B, T, 3, N_HEAD, C // N_HEAD).transpose(1, 3).unbind(2)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # the kernel swapped in
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.relu(self.fc(F.rms_norm(x, (C,)))).square())


class GPT(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, N_EMBD)
        self.blocks = nn.ModuleList(Block() for _ in range(N_LAYER))
        self.lm_head = nn.Linear(N_EMBD, vocab_size, bias=False)

    def forward(self, idx, targets=None, reduction="mean"):
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(F.rms_norm(x, (x.size(-1),))).float()
        if targets is not None:
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), reduction=reduction)
        return logits


t_start = time.time()
tokenizer = Tokenizer.from_directory()
vocab_size = tokenizer.get_vocab_size()
print(f"Vocab size: {vocab_size:,}")
model = GPT(vocab_size)
optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "train")
x, y, epoch = next(train_loader)  # prefetch first batch
print(f"Time budget: {TIME_BUDGET}s")

total_training_time = 0.0
step = 0
while True:
    t0 = time.time()
    loss = model(x, y)
    loss.backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    x, y, epoch = next(train_loader)
    train_loss_f = loss.item()
    if math.isnan(train_loss_f) or train_loss_f > 100:
        print("FAIL")
        exit(1)
    total_training_time += time.time() - t0
    step += 1
    print(f"step {step:05d} | loss: {train_loss_f:.6f} | epoch: {epoch}", flush=True)
    if step >= MAX_STEPS or total_training_time >= TIME_BUDGET:
        break

model.eval()
val_bpb = evaluate_bpb(model, tokenizer, DEVICE_BATCH_SIZE)
print("---")
print(f"val_bpb:          {val_bpb:.6f}")
print(f"training_seconds: {total_training_time:.1f}")
print(f"num_steps:        {step}")
'''


def test_an_autoresearch_style_script_runs_through_the_runner_sealed(small_data, tmp_path, sandboxed):
    settings = RunSettings(time_budget=5.0, data_dir=str(small_data), seq_len=32, eval_tokens=1024,
                           startup_grace=60.0, eval_grace=60.0, sandbox="bubblewrap", threads=1)
    result = run_variant(AUTORESEARCH_STYLE, settings, run_dir=tmp_path / "v")
    assert result.status == "ok", (result.status, result.reason, result.log_tail)
    assert result.sealed and result.metrics["sealed"] is True and result.sandbox == "bubblewrap"
    assert math.isfinite(result.val_bpb) and result.val_bpb > 0
    assert "step 00008 " in result.log_tail and "epoch: 1" in result.log_tail  # it trained on packed rows
    assert f"val_bpb:          {result.val_bpb:.6f}" in result.log_tail  # and got the evaluator's number back


def test_a_short_context_still_reads_the_whole_split_in_one_pass(small_data, use_data):
    # The embedded corpus's documents run to thousands of tokens: cut to their first row of 33,
    # a pass would read a few percent of the split and a model would soon memorise it.
    tok, loader = packed(small_data, use_data, B=8, T=32)
    train_tokens = sum(len(d) for d in train_documents(small_data, tok.bos_id))
    served = 0
    while True:
        x, y, epoch = next(loader)
        if epoch > 1:
            break
        served += x.numel() + y.shape[0]
    assert served >= 0.9 * train_tokens  # only the ends of cut pieces are dropped
