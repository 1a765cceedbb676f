"""evo's GPU seed: autoresearch's train.py design, for the 5-minute setting on one GPU.

The design of karpathy/autoresearch (the baseline its published numbers start from), written
for evo: a GPT with RMSNorm, rotary embeddings, QK-norm, ReLU^2 MLP, value embeddings on
alternating layers (gated per head), learnable per-layer residual and x0 scalars, sliding-window
attention (a pattern of short and full windows), a soft-capped head; AdamW for embeddings, head
and scalars (learning rates scaled by width), Muon for the matrices (polar-express
orthogonalization batched over matrices of one shape, NorMuon variance normalization, cautious
weight decay that fades out, a momentum warm-up); best-fit packed documents; a time-based
schedule. One difference: attention is PyTorch's scaled_dot_product_attention, the short windows
made by a boolean mask, where autoresearch calls a FlashAttention-3 kernel.

On CUDA: bf16 autocast and embeddings, torch.compile of the model (loss included, so no separate
fp32 logits tensor) and of the Muon step. Elsewhere (CPU at toy size) the same code runs eager in
fp32. The first UNTIMED_STEPS (compile warm-up) are outside the schedule, but evo's runner times
everything up to the hand-over, so they must fit in budget.startup_grace.

Run standalone after `python prepare.py --vocab-size 8192`:  EVO_SEQ_LEN=2048 python trainer/train_gpu.py
Settings arrive by environment (EVO_TIME_BUDGET, EVO_SEED, EVO_DEVICE, ...) through prepare.
"""

import gc
import math
import resource
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from prepare import DEVICE, MAX_SEQ_LEN, TIME_BUDGET, Tokenizer, evaluate_bpb, make_dataloader

# ---- hyperparameters (module-level constants: what evolution edits first) ----
# Model shape: width = DEPTH * ASPECT_RATIO, rounded up to whole heads of HEAD_DIM.
DEPTH = 8  # evo: lever. Layers: with the width, sets how many steps fit in the budget
ASPECT_RATIO = 64  # evo: lever. Width per layer
HEAD_DIM = 128  # evo: choice(64, 128)
MLP_RATIO = 4  # evo: lever. MLP width per model width
WINDOW_PATTERN = "SSSL"  # evo: choice(SSSL, SSL, SL, L). Per layer, repeated: S short window, L full; the last layer is always L
SHORT_WINDOW_FRAC = 0.5  # a short window, as a fraction of the context
VALUE_GATE_CHANNELS = 32  # evo: choice(16, 32, 64). Input channels the per-head value-embedding gate reads
LOGIT_SOFTCAP = 15.0
# Optimisation
TOTAL_BATCH_TOKENS = 2**19  # evo: lever. Tokens per optimizer step (gradient accumulation makes up the rest)
DEVICE_BATCH_SIZE = 128  # evo: lever. Sequences per micro-batch
EMBEDDING_LR = 0.6  # AdamW: token and value embeddings
UNEMBEDDING_LR = 0.004  # AdamW: output head
SCALAR_LR = 0.5  # AdamW: the x0 scalars (the residual scalars get a hundredth)
LR_WIDTH_REFERENCE = 768  # evo: fixed. AdamW rates are tuned at this width and scale by sqrt(reference / width)
ADAM_BETAS = (0.8, 0.95)
MATRIX_LR = 0.04  # Muon: the matrices inside the blocks
WEIGHT_DECAY = 0.2  # evo: range(0.0, 0.5). Cautious, on the Muon matrices only; fades linearly to 0 over the run
MUON_MOMENTUM = 0.95  # reached after MUON_WARMUP_STEPS, from MUON_MOMENTUM_START
MUON_MOMENTUM_START = 0.85
MUON_WARMUP_STEPS = 300
MUON_BETA2 = 0.95  # NorMuon: decay of the per-row second moment of the orthogonalized update
MUON_NS_STEPS = 5  # evo: choice(3, 4, 5). Polar-express iterations
WARMUP_FRAC = 0.0  # fractions of the time budget
WARMDOWN_FRAC = 0.5
FINAL_LR_FRAC = 0.0
# How the run executes, not what it learns
UNTIMED_STEPS = 10  # evo: fixed. Compile/warm-up steps the schedule does not count; evo's clock does (budget.startup_grace)
COMPILE = True  # evo: fixed
EVAL_BATCH_SIZE = 32  # evo: fixed
LOG_EVERY = 25  # evo: fixed

USE_CUDA = DEVICE == "cuda"
if USE_CUDA:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


# ---- model ----
def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len, head_dim, base=10000.0):
    """cos and sin of each position's angles, shaped to broadcast over (B, T, heads, head_dim / 2)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]


def apply_rotary(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # bf16 under autocast, so q and k stay in one dtype
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def window_sizes(depth, seq_len):
    """Tokens back each layer may attend to: WINDOW_PATTERN repeated, the last layer always full."""
    short = max(1, int(seq_len * SHORT_WINDOW_FRAC))
    sizes = [short if WINDOW_PATTERN[i % len(WINDOW_PATTERN)] == "S" else seq_len for i in range(depth)]
    sizes[-1] = seq_len
    return sizes


def sliding_window_mask(T, window, device):
    """True where query i may see key j: j is at or before i and at most `window` tokens back."""
    pos = torch.arange(0, T, 1, device=device)  # the start-end-step form is the one in core ATen
    back = pos[:, None] - pos[None, :]
    return torch.logical_and(back >= 0, back <= window)


def has_value_embedding(layer, depth):
    """Alternating layers, the last one always included."""
    return layer % 2 == (depth - 1) % 2


class Attention(nn.Module):
    def __init__(self, dim, head_dim, value_gate):
        super().__init__()
        self.n_head, self.head_dim = dim // head_dim, head_dim
        self.q = nn.Linear(dim, dim, bias=False)  # separate matrices, so Muon orthogonalizes each on its own
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        # A narrow model (DEPTH 1 at a small ASPECT_RATIO) has fewer channels than the gate may ask for.
        self.gate_channels = min(VALUE_GATE_CHANNELS, dim)
        self.value_gate = nn.Linear(self.gate_channels, self.n_head, bias=False) if value_gate else None

    def forward(self, x, value_embedding, cos, sin, mask):
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim)
        k = self.k(x).view(B, T, self.n_head, self.head_dim)
        v = self.v(x).view(B, T, self.n_head, self.head_dim)
        if value_embedding is not None:  # mix in the token's own value vector, gated per head by the input
            gate = 2 * torch.sigmoid(self.value_gate(x[..., :self.gate_channels]))
            v = v + gate.unsqueeze(-1) * value_embedding.view(B, T, self.n_head, self.head_dim)
        q, k = apply_rotary(q, cos[:, :T], sin[:, :T]), apply_rotary(k, cos[:, :T], sin[:, :T])
        q, k = norm(q), norm(k)  # QK-norm keeps attention logits tame at high learning rates
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.up = nn.Linear(dim, MLP_RATIO * dim, bias=False)
        self.down = nn.Linear(MLP_RATIO * dim, dim, bias=False)

    def forward(self, x):
        return self.down(F.relu(self.up(x)).square())


class Block(nn.Module):
    def __init__(self, dim, head_dim, value_gate):
        super().__init__()
        self.attn = Attention(dim, head_dim, value_gate)
        self.mlp = MLP(dim)

    def forward(self, x, value_embedding, cos, sin, mask):
        x = x + self.attn(norm(x), value_embedding, cos, sin, mask)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, vocab_size, dim, depth, head_dim, seq_len):
        super().__init__()
        self.dim, self.seq_len = dim, seq_len
        self.windows = window_sizes(depth, seq_len)
        self.embed = nn.Embedding(vocab_size, dim)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(vocab_size, dim)
                                           for i in range(depth) if has_value_embedding(i, depth)})
        self.blocks = nn.ModuleList(Block(dim, head_dim, str(i) in self.value_embeds) for i in range(depth))
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.resid_scales = nn.Parameter(torch.ones(depth))  # x <- resid * x + x0 * (the first layer's input)
        self.x0_scales = nn.Parameter(torch.zeros(depth))
        cos, sin = rotary_tables(seq_len, head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self):
        bound = (3 / self.dim) ** 0.5  # uniform with the std of 1/sqrt(dim)
        nn.init.normal_(self.embed.weight, std=1.0)
        nn.init.normal_(self.head.weight, std=0.001)
        for block in self.blocks:
            for linear in (block.attn.q, block.attn.k, block.attn.v, block.mlp.up):
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.zeros_(block.attn.proj.weight)  # each block starts as the identity
            nn.init.zeros_(block.mlp.down.weight)
            if block.attn.value_gate is not None:
                nn.init.zeros_(block.attn.value_gate.weight)  # gate 2 * sigmoid(0) = 1: neutral
        for table in self.value_embeds.values():
            nn.init.uniform_(table.weight, -bound, bound)
        self.resid_scales.fill_(1.0)
        self.x0_scales.fill_(0.1)

    def forward(self, idx, targets=None):
        T = idx.size(1)
        masks = {w: sliding_window_mask(T, w, idx.device) for w in set(self.windows) if w < T}
        x = x0 = norm(self.embed(idx))
        for i, block in enumerate(self.blocks):
            x = self.resid_scales[i] * x + self.x0_scales[i] * x0
            value_embedding = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, value_embedding, self.cos, self.sin, masks.get(self.windows[i]))
        logits = self.head(norm(x)).float()
        logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def make_model(vocab_size, seq_len):
    dim = -(-DEPTH * ASPECT_RATIO // HEAD_DIM) * HEAD_DIM
    model = GPT(vocab_size, dim, DEPTH, HEAD_DIM, seq_len).to(DEVICE)
    model.init_weights()
    if USE_CUDA:  # embeddings are looked up, not multiplied: bf16 halves their memory and traffic
        model.embed.to(torch.bfloat16)
        model.value_embeds.to(torch.bfloat16)
    return model


# ---- optimizer: AdamW for embeddings, head and scalars; Muon for the matrices ----
# Polar express: per-iteration quintic coefficients that drive singular values to ~1 in few steps.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def orthogonalize(g, steps):
    """The nearest semi-orthogonal matrix to each matrix in the stack g (N, rows, cols), approximately."""
    x = g.bfloat16() if g.is_cuda else g.float()
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the small Gram matrix
        x = x.mT
    for a, b, c in POLAR_EXPRESS[:steps]:
        s = x @ x.mT
        x = a * x + (b * s + c * (s @ s)) @ x
    return x.mT if tall else x


def muon_update(grads, params, momentum_buf, second_moment, momentum, lr, weight_decay, beta2, ns_steps: int):
    """One Muon step on a stack of same-shaped matrices, in place on params and the buffers."""
    momentum_buf.lerp_(grads, 1 - momentum)
    update = orthogonalize(grads.lerp(momentum_buf, momentum), ns_steps).float()  # Nesterov
    # NorMuon: even out the update's rows (or columns) by their running second moment, keeping its norm.
    row_power = update.square().mean(dim=-1 if update.size(-2) >= update.size(-1) else -2, keepdim=True)
    second_moment.lerp_(row_power, 1 - beta2)
    evened = update * second_moment.clamp_min(1e-10).rsqrt()
    evened = evened * (update.norm(dim=(-2, -1), keepdim=True) / evened.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))
    # Cautious weight decay: only where the update already pulls the weight toward zero.
    decay = params * ((evened * params) >= 0) * weight_decay
    params.sub_(lr * (evened + decay))


class Muon(torch.optim.Optimizer):
    """Momentum whose update is orthogonalized: matrices of one shape are stacked and stepped together."""

    def __init__(self, params, lr, momentum, weight_decay, beta2, ns_steps, compile_step):
        params = list(params)
        groups = [dict(params=[p for p in params if p.shape == shape]) for shape in sorted({p.shape for p in params})]
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, beta2=beta2, ns_steps=ns_steps))
        self.update = torch.compile(muon_update, dynamic=False, fullgraph=True) if compile_step else muon_update
        # 0-d tensors: a compiled step sees new values without recompiling
        self.scalars = {name: torch.tensor(0.0) for name in ("momentum", "lr", "weight_decay", "beta2")}

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = group["params"]
            rows, cols = params[0].shape
            state = self.state[params[0]]
            if not state:
                state["momentum"] = torch.zeros(len(params), rows, cols, device=params[0].device)
                moment_shape = (len(params), rows, 1) if rows >= cols else (len(params), 1, cols)
                state["second_moment"] = torch.zeros(moment_shape, device=params[0].device)
            for name, value in (("momentum", group["momentum"]), ("beta2", group["beta2"]),
                                ("weight_decay", group["weight_decay"]),
                                ("lr", group["lr"] * max(1.0, rows / cols) ** 0.5)):
                self.scalars[name].fill_(value)
            stacked = torch.stack(params)
            self.update(torch.stack([p.grad for p in params]), stacked, state["momentum"], state["second_moment"],
                        self.scalars["momentum"], self.scalars["lr"], self.scalars["weight_decay"],
                        self.scalars["beta2"], group["ns_steps"])
            torch._foreach_copy_(params, list(stacked.unbind(0)))


def make_optimizers(model):
    width_scale = (LR_WIDTH_REFERENCE / model.dim) ** 0.5
    adam = torch.optim.AdamW([
        dict(params=[model.head.weight], lr=UNEMBEDDING_LR * width_scale),
        dict(params=[model.embed.weight, *model.value_embeds.parameters()], lr=EMBEDDING_LR * width_scale),
        dict(params=[model.resid_scales], lr=SCALAR_LR * 0.01),
        dict(params=[model.x0_scales], lr=SCALAR_LR, betas=(0.96, 0.95)),
    ], betas=ADAM_BETAS, eps=1e-10, weight_decay=0.0, fused=USE_CUDA)
    muon = Muon(model.blocks.parameters(), lr=MATRIX_LR, momentum=MUON_MOMENTUM_START, weight_decay=WEIGHT_DECAY,
                beta2=MUON_BETA2, ns_steps=MUON_NS_STEPS, compile_step=COMPILE and USE_CUDA)
    for opt in (adam, muon):
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return adam, muon


def lr_multiplier(progress):
    if progress < WARMUP_FRAC:
        return progress / WARMUP_FRAC
    if progress < 1.0 - WARMDOWN_FRAC:
        return 1.0
    warmdown = max(1.0 - progress, 0.0) / WARMDOWN_FRAC
    return FINAL_LR_FRAC + (1.0 - FINAL_LR_FRAC) * warmdown


def muon_momentum(step):
    ramp = min(step / max(MUON_WARMUP_STEPS, 1), 1.0)
    return MUON_MOMENTUM_START + (MUON_MOMENTUM - MUON_MOMENTUM_START) * ramp


# ---- training ----
def main():
    t_start = time.time()
    tokenizer = Tokenizer.from_directory()
    vocab_size = tokenizer.get_vocab_size()
    model = make_model(vocab_size, MAX_SEQ_LEN)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, depth {DEPTH}, dim {model.dim}, windows {model.windows}, "
          f"seq {MAX_SEQ_LEN}, device {DEVICE}")
    adam, muon = make_optimizers(model)

    grad_accum = max(1, TOTAL_BATCH_TOKENS // (DEVICE_BATCH_SIZE * MAX_SEQ_LEN))
    train_model = torch.compile(model, dynamic=False) if COMPILE and USE_CUDA else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if USE_CUDA else torch.autocast("cpu", enabled=False)
    loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "train")  # best-fit packed documents
    x, y, epoch = next(loader)
    diverged_at = 2.0 * math.log(vocab_size)  # far above an untrained model's loss
    training_time, step, tokens, timed_tokens, smooth_loss = 0.0, 0, 0, 0, None
    while True:
        t0 = time.time()
        for _ in range(grad_accum):
            with autocast:
                loss = train_model(x, y)
            (loss / grad_accum).backward()
            x, y, epoch = next(loader)
        progress = min(training_time / TIME_BUDGET, 1.0)
        multiplier = lr_multiplier(progress)
        for group in adam.param_groups + muon.param_groups:
            group["lr"] = group["base_lr"] * multiplier
        for group in muon.param_groups:
            group["momentum"] = muon_momentum(step)
            group["weight_decay"] = WEIGHT_DECAY * (1.0 - progress)
        adam.step()
        muon.step()
        model.zero_grad(set_to_none=True)

        loss_value = loss.item()  # also waits for the GPU, so the step time below is real
        if not math.isfinite(loss_value) or loss_value > diverged_at:
            print(f"FAIL: loss {loss_value} at step {step} (NaN or exploding)")
            sys.exit(1)
        if step == 0:  # Python's cyclic collector stalls steps; what is allocated by now lives all run
            gc.collect()
            gc.freeze()
            gc.disable()
        step += 1
        step_tokens = grad_accum * x.numel()
        tokens += step_tokens
        if step > UNTIMED_STEPS:
            training_time += time.time() - t0
            timed_tokens += step_tokens
        smooth_loss = loss_value if smooth_loss is None else 0.9 * smooth_loss + 0.1 * loss_value
        if step % LOG_EVERY == 0:
            rate = timed_tokens / max(training_time, 1e-9)
            print(f"step {step:5d} | loss {smooth_loss:.4f} | lr x{multiplier:.2f} | {rate:,.0f} tok/s | epoch {epoch} | "
                  f"{training_time:6.1f}s of {TIME_BUDGET:.0f}s", flush=True)
        if step > UNTIMED_STEPS and training_time >= TIME_BUDGET:
            break

    val_bpb = evaluate_bpb(model, tokenizer, EVAL_BATCH_SIZE)
    print("---")
    print(f"val_bpb:          {val_bpb:.6f}")
    print(f"training_seconds: {training_time:.1f}")
    print(f"total_seconds:    {time.time() - t_start:.1f}")
    if USE_CUDA:
        print(f"peak_vram_mb:     {torch.cuda.max_memory_allocated() / 2**20:.1f}")
    else:
        print(f"peak_memory_mb:   {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}")
    print(f"tokens_per_sec:   {timed_tokens / max(training_time, 1e-9):.0f}")
    print(f"total_tokens_M:   {tokens / 1e6:.3f}")
    print(f"num_steps:        {step}")
    print(f"num_params_M:     {n_params / 1e6:.3f}")
    print(f"depth:            {DEPTH}")


if __name__ == "__main__":
    main()
