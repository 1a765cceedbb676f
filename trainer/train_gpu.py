"""evo's GPU seed: a small modern GPT for the 5-minute setting of autoresearch.

RMSNorm, rotary embeddings, QK-norm, ReLU^2 MLP, Muon for the matrices and AdamW for the rest,
bf16 autocast, torch.compile and scaled-dot-product attention on CUDA, a time-based
learning-rate schedule. The first steps (compile warm-up) are outside the schedule, but evo's runner
times everything up to the hand-over, so they must fit in budget.startup_grace.

Run standalone after `python prepare.py --vocab-size 8192`:  EVO_SEQ_LEN=2048 python trainer/train_gpu.py
Settings arrive by environment (EVO_TIME_BUDGET, EVO_SEED, EVO_DEVICE, ...) through prepare.
"""

import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import prepare

# ---- hyperparameters (module-level constants: what evolution edits first) ----
DEPTH = 8
N_HEAD = 4
HEAD_DIM = 128  # evo: choice(64, 128)
MODEL_DIM = N_HEAD * HEAD_DIM
MLP_RATIO = 4
DEVICE_BATCH_SIZE = 32  # sequences per micro-batch
TOTAL_BATCH_TOKENS = 2**18  # tokens per optimizer step (gradient accumulation makes up the rest)
LOGIT_SOFTCAP = 15.0
MATRIX_LR = 0.02  # Muon, for the matrices inside the blocks
EMBED_LR = 0.3  # AdamW, token embedding
UNEMBED_LR = 0.004  # AdamW, output head
ADAM_BETAS = (0.8, 0.95)
WEIGHT_DECAY = 0.0  # evo: range(0.0, 0.2)
MUON_MOMENTUM = 0.95
WARMUP_FRAC = 0.0  # fractions of the time budget
COOLDOWN_FRAC = 0.5
FINAL_LR_FRAC = 0.0
GRAD_CLIP = 1.0
UNTIMED_STEPS = 10  # evo: fixed. Compile/warm-up steps the schedule does not count; evo's clock does (budget.startup_grace)
COMPILE = True  # evo: fixed (how the run executes, not what it learns)
EVAL_BATCH_SIZE = 32  # evo: fixed
LOG_EVERY = 25  # evo: fixed

SEQ_LEN = prepare.MAX_SEQ_LEN
DEVICE = prepare.DEVICE
USE_CUDA = DEVICE == "cuda"
if USE_CUDA:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


# ---- model ----
def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len, head_dim, base=10000.0):
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos()[None, None], angles.sin()[None, None]


def apply_rotary(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, dim, n_head):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = norm(q), norm(k)  # QK-norm keeps attention logits tame at high learning rates
        q, k = apply_rotary(q, cos[:, :, :T], sin[:, :, :T]), apply_rotary(k, cos[:, :, :T], sin[:, :, :T])
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, dim, ratio):
        super().__init__()
        self.up = nn.Linear(dim, ratio * dim, bias=False)
        self.down = nn.Linear(ratio * dim, dim, bias=False)
        nn.init.zeros_(self.down.weight)

    def forward(self, x):
        return self.down(F.relu(self.up(x)).square())


class Block(nn.Module):
    def __init__(self, dim, n_head, mlp_ratio):
        super().__init__()
        self.attn = Attention(dim, n_head)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x, cos, sin):
        x = x + self.attn(norm(x), cos, sin)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, vocab_size, dim, depth, n_head, mlp_ratio, seq_len):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(Block(dim, n_head, mlp_ratio) for _ in range(depth))
        self.head = nn.Linear(dim, vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=1.0)
        nn.init.zeros_(self.head.weight)
        cos, sin = rotary_tables(seq_len, dim // n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, idx):
        x = norm(self.embed(idx))
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        logits = self.head(norm(x)).float()
        return LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)


# ---- Muon: momentum SGD whose update is orthogonalized by a Newton-Schulz iteration ----
def orthogonalize(g, steps=5):
    a, b, c = 3.4445, -4.7750, 2.0315  # quintic coefficients that push singular values to ~1
    x = g.bfloat16() if g.is_cuda else g.float()  # bf16 is accurate enough for this iteration
    x = x / (x.norm() + 1e-7)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr, momentum):
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                update = orthogonalize(p.grad.add(buf, alpha=group["momentum"])).to(p.dtype)  # Nesterov
                scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                p.add_(update, alpha=-group["lr"] * scale)


def lr_multiplier(progress):
    if progress < WARMUP_FRAC:
        return progress / WARMUP_FRAC
    if progress < 1.0 - COOLDOWN_FRAC:
        return 1.0
    cooldown = (1.0 - progress) / COOLDOWN_FRAC
    return FINAL_LR_FRAC + (1.0 - FINAL_LR_FRAC) * max(cooldown, 0.0)


# ---- training ----
def main():
    t_start = time.time()
    tokenizer = prepare.get_tokenizer()
    vocab_size = tokenizer.vocab_size
    model = GPT(vocab_size, MODEL_DIM, DEPTH, N_HEAD, MLP_RATIO, SEQ_LEN).to(DEVICE)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, depth {DEPTH}, dim {MODEL_DIM}, seq {SEQ_LEN}, device {DEVICE}")

    matrices = [p for p in model.blocks.parameters() if p.dim() == 2]
    adam = torch.optim.AdamW(
        [dict(params=[model.embed.weight], lr=EMBED_LR), dict(params=[model.head.weight], lr=UNEMBED_LR)],
        betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY,
    )
    muon = Muon(matrices, lr=MATRIX_LR, momentum=MUON_MOMENTUM)
    optimizers = [adam, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]

    grad_accum = max(1, TOTAL_BATCH_TOKENS // (DEVICE_BATCH_SIZE * SEQ_LEN))
    train_model = torch.compile(model, dynamic=False) if COMPILE and USE_CUDA else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if USE_CUDA else torch.autocast("cpu", enabled=False)
    loader = prepare.make_dataloader(tokenizer, DEVICE_BATCH_SIZE, SEQ_LEN, "train")
    diverged_at = 2.0 * math.log(vocab_size)  # far above an untrained model's loss
    training_time, step, tokens, timed_tokens, smooth_loss = 0.0, 0, 0, 0, None
    while True:
        t0 = time.time()
        for _ in range(grad_accum):
            x, y = next(loader)
            with autocast:
                logits = train_model(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
            (loss / grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        multiplier = lr_multiplier(training_time / prepare.TIME_BUDGET)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * multiplier
            opt.step()
        model.zero_grad(set_to_none=True)

        loss_value = loss.item()  # also waits for the GPU, so the step time below is real
        if not math.isfinite(loss_value) or loss_value > diverged_at:
            print(f"FAIL: loss {loss_value} at step {step} (NaN or exploding)")
            sys.exit(1)
        step += 1
        step_tokens = grad_accum * x.numel()
        tokens += step_tokens
        if step > UNTIMED_STEPS:
            training_time += time.time() - t0
            timed_tokens += step_tokens
        smooth_loss = loss_value if smooth_loss is None else 0.9 * smooth_loss + 0.1 * loss_value
        if step % LOG_EVERY == 0:
            rate = timed_tokens / max(training_time, 1e-9)
            print(f"step {step:5d} | loss {smooth_loss:.4f} | lr x{multiplier:.2f} | {rate:,.0f} tok/s | {training_time:6.1f}s of {prepare.TIME_BUDGET:.0f}s", flush=True)
        if training_time >= prepare.TIME_BUDGET:
            break

    val_bpb = prepare.evaluate_bpb(model, tokenizer, EVAL_BATCH_SIZE)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if USE_CUDA else 0.0
    print("---")
    print(f"val_bpb:          {val_bpb:.6f}")
    print(f"training_seconds: {training_time:.1f}")
    print(f"total_seconds:    {time.time() - t_start:.1f}")
    print(f"peak_vram_mb:     {peak_mb:.1f}")
    print(f"tokens_per_sec:   {timed_tokens / max(training_time, 1e-9):.0f}")
    print(f"total_tokens_M:   {tokens / 1e6:.1f}")
    print(f"num_steps:        {step}")
    print(f"num_params_M:     {n_params / 1e6:.1f}")
    print(f"depth:            {DEPTH}")


if __name__ == "__main__":
    main()
