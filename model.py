"""
model.py: the language model the three methods train.

    1. the network       a small decoder-only GPT in the nanoGPT mould (0.1 M parameters)
    2. log-probs         sequence_logps: log pi(y|x) summed over RESPONSE tokens only; pair_logps
    3. sampling          batched, with a temperature, stops at EOS, its own RNG, a key/value cache
    4. the SFT start     Adam, and cross-entropy on the demonstrations: pi_ref for DPO, pi_1 for SPPO
    5. a table policy    any distribution over a short list of responses, as a language model (--exact)

Nothing here knows about DPO, SimPO or SPPO. The appendix (the run contract) is not needed to follow them."""

import copy
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


# --- 1. The network -----------------------------------------------------------------------------------------

@dataclass
class GPTConfig:
    vocab_size: int = 90     # len(data.VOCAB); a test checks that they agree
    block_size: int = 32     # longest sequence: BOS + 3 prompt words + SEP + 16 words + EOS = 22
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64         # no dropout: the methods compare log-probs of one model at two moments


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)   # query, key, value in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # [B, nh, T, hs]
        is_causal = True
        if cache is not None:
            # key/value cache for sampling: the prompt fills it, then each new token attends to all of it
            if "k" in cache:
                assert T == 1, "after the prompt, the cache takes one token at a time"
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
                is_causal = False
            cache["k"], cache["v"] = k, v
        y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd))

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)   # pre-LayerNorm residual blocks
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight   # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, caches=None):
        """idx [B, T] token ids -> logits [B, T, vocab]. caches: one dict per block, for sampling."""
        B, T = idx.shape
        start = caches[0]["k"].shape[2] if caches is not None and "k" in caches[0] else 0
        assert start + T <= self.config.block_size, f"sequence of {start + T} > block_size"
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.lm_head(self.ln_f(x))


# --- 2. Sequence log-probabilities: log pi(y|x) = sum_{i=1..|y|} log pi(y_i | x, y_<i) ----------------------

def sequence_logps(model, input_ids, response_mask):
    """Sum of log pi(y_i | x, y_<i) over the response tokens of each row, and |y|.

    input_ids     [B, T]  BOS, prompt, SEP, response, EOS, then PAD to the batch's width
    response_mask [B, T]  1 on response tokens, the closing EOS included (as in the official DPO and SimPO
                          code: ending the answer is part of it), 0 on prompt and padding
    returns       logps [B] (float32), lengths [B] (|y|). Position t's logits predict token t+1."""
    logits = model(input_ids[:, :-1])                                 # [B, T-1, V]: predicts tokens 1..T-1
    targets = input_ids[:, 1:]                                        # [B, T-1]
    mask = response_mask[:, 1:].to(torch.float32)                     # [B, T-1]
    token_logps = torch.log_softmax(logits.float(), dim=-1)           # float32 even under autocast
    token_logps = token_logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)   # [B, T-1]
    return (token_logps * mask).sum(-1), mask.sum(-1)


def pair_logps(model, chosen_ids, chosen_mask, rejected_ids, rejected_mask):
    """log pi(y_w|x) and log pi(y_l|x) in ONE forward pass over the stacked batch [2B, T] (as the
    official DPO code's concatenated_forward does), plus |y_w| and |y_l|. Each tensor [B]."""
    B, T = chosen_ids.shape[0], max(chosen_ids.shape[1], rejected_ids.shape[1])
    pad = lambda t: F.pad(t, (0, T - t.shape[1]))                     # to T columns with PAD (token 0)
    ids = torch.cat([pad(chosen_ids), pad(rejected_ids)])             # [2B, T]
    mask = torch.cat([pad(chosen_mask), pad(rejected_mask)])
    logps, lengths = sequence_logps(model, ids, mask)
    return logps[:B], logps[B:], lengths[:B], lengths[B:]


@torch.no_grad()
def sequence_logps_all(model, ids, mask, batch_size=1024):
    """sequence_logps over many rows, in batches trimmed of padding, no gradients: logps [M], lengths [M]."""
    parts = [sequence_logps(model, *trim(ids[s:s + batch_size], mask[s:s + batch_size]))
             for s in range(0, ids.shape[0], batch_size)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def trim(ids, mask):
    """Drop the columns that are padding in every row of a batch (right padding, so from the end)."""
    width = int((ids != 0).sum(0).nonzero().max().item()) + 1
    return ids[:, :width], mask[:, :width]


# --- 3. Sampling --------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(model, prompts, max_new_tokens, eos_id, banned_ids=(), temperature=1.0, generator=None, batch_size=1024,
           use_cache=True):
    """One response per prompt row: prompts [N, P] (all of one length: no left padding) -> responses [N,
    max_new_tokens], the tokens up to EOS (closed by force at the end), then PAD; banned_ids never drawn. The
    draws come from `generator` alone: the training run's global RNG is untouched. Put the model in eval mode."""
    out = []
    for start in range(0, prompts.shape[0], batch_size):
        idx = prompts[start:start + batch_size]
        caches = [dict() for _ in model.blocks] if use_cache else None
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        tokens = []
        for step in range(max_new_tokens):
            logits = model(idx if (step == 0 or not use_cache) else tokens[-1][:, None], caches)[:, -1, :]
            logits = logits.float() / temperature
            logits[:, list(banned_ids)] = float("-inf")
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
            if step == max_new_tokens - 1:
                nxt = torch.full_like(nxt, eos_id)          # close any response still open
            nxt = torch.where(done, torch.zeros_like(nxt), nxt)   # PAD after EOS
            tokens.append(nxt)
            done |= nxt == eos_id
            if not use_cache:
                idx = torch.cat([idx, nxt[:, None]], dim=1)
            if bool(done.all()):
                break
        resp = torch.stack(tokens, dim=1)
        out.append(F.pad(resp, (0, max_new_tokens - resp.shape[1])))
    return torch.cat(out)


# --- 4. The SFT warm start, shared by all three methods (DPO: pi_ref; SimPO: the start; SPPO: pi_1) ---------

class Adam:
    """Adam (Kingma and Ba 2015): torch.optim.Adam's arithmetic exactly (a test compares them), without its
    first-use import of torch's compiler (about 2 s of a 5-second run). Per weight:
        m <- beta1 m + (1 - beta1) g,  v <- beta2 v + (1 - beta2) g^2,  theta <- theta - lr m^ / (sqrt(v^) + eps)
    with m^ = m / (1 - beta1^t) and v^ = v / (1 - beta2^t), t the step."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lr, self.betas, self.eps, self.t = list(params), lr, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        self.t += 1
        beta1, beta2 = self.betas
        for p, m, v in zip(self.params, self.m, self.v):
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (v.sqrt() / (1 - beta2 ** self.t) ** 0.5).add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / (1 - beta1 ** self.t))


SFT_BATCH_SIZE = 64
SFT_LR = 3e-3


def sft_ce(model, ids, mask):
    """Mean cross-entropy per response token (nats) over a set of demonstrations."""
    logps, lengths = sequence_logps_all(model, ids, mask)
    return -logps.cpu().double().sum().item() / lengths.sum().item()   # float64 on the CPU: MPS has none


def sft_model(task, device, sft_dir, seed, steps, cfg=None, quiet=False):
    """The SFT model (cross-entropy on the demonstrations' responses), trained once, cached: (model, info)."""
    with sft_cache(task, device, sft_dir, seed, steps, cfg or GPTConfig()) as cache:
        if cache.model is not None:
            return cache.model, cache.info
        torch.manual_seed(seed)
        model = GPT(cfg or GPTConfig()).to(device)
        ids, mask = task.sft_ids.to(device), task.sft_mask.to(device)
        held_ids, held_mask = task.sft_heldout_ids.to(device), task.sft_heldout_mask.to(device)
        info = {"ce_before": sft_ce(model, held_ids, held_mask), "steps": steps}
        optimizer = Adam(model.parameters(), lr=SFT_LR)
        batch_order = torch.Generator().manual_seed(seed)    # a CPU generator: the same batches on every device
        t0 = time.time()
        model.train()
        for step in tqdm(range(steps), desc="SFT", disable=True if quiet else None, leave=False):
            # the learning rate: a linear warm-up over 20 steps, then a cosine decay to 0
            optimizer.lr = SFT_LR * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
            idx = torch.randint(0, ids.shape[0], (SFT_BATCH_SIZE,), generator=batch_order).to(device)
            logps, lengths = sequence_logps(model, *trim(ids[idx], mask[idx]))
            loss = -logps.sum() / lengths.sum()              # cross-entropy per response token
            check_loss(loss, step, steps, phase="SFT training")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        info.update(ce_after=sft_ce(model, held_ids, held_mask), seconds=time.time() - t0)
        cache.save(model, info)
    return model, dict(info, cached=False, path=cache.path)


def frozen_copy(model):
    """A copy that never trains: eval mode, requires_grad False (DPO's pi_ref, SPPO's pi_t)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


# --- 5. A table policy: any distribution over a finite list of responses, as a language model (--exact) -----
# Each script's claim ("DPO's loss is minimised at pi*", "SPPO's regression is the multiplicative-weights step")
# is about the best POLICY, not the best network: it is checked on any distribution over a list of responses, one
# logit each, pi(y) = exp(theta_y) / sum_y' exp(theta_y'). By the chain rule pi(y_i | x, y_<i) = mass(responses
# starting y_<i y_i) / mass(responses starting y_<i): the table answers forward(idx) with next-token logits, so
# sequence_logps, pair_logps and sample work on it unchanged, their sums telescoping to theta_y - logsumexp(theta).

class TablePolicy(nn.Module):
    """pi(y|x) = softmax(theta)[y] over a list of different responses [C, L] (token ids, EOS, padding) that start
    after prompt_len tokens, whatever the prompt (as the judge). theta starts at 0; sample with use_cache=False."""

    def __init__(self, responses, prompt_len, vocab_size):
        super().__init__()
        self.responses = torch.as_tensor(responses, dtype=torch.long).cpu()
        assert len({tuple(r) for r in self.responses.tolist()}) == len(self.responses), "the responses must differ"
        self.prompt_len, self.vocab_size = prompt_len, vocab_size
        self.logits = nn.Parameter(torch.zeros(len(self.responses), dtype=torch.float64))

    def log_probs(self):
        """log pi(y|x) of each listed response, [C], float64: theta_y - logsumexp(theta); the exact modes train it."""
        return torch.log_softmax(self.logits, dim=0)

    def probs(self):
        """pi(y|x) of each listed response, [C], float64, detached (for KLs, win rates, exploitability)."""
        return torch.softmax(self.logits.detach(), dim=0)

    def forward(self, idx, caches=None):
        """idx [B, T] -> logits [B, T, vocab]: after the prompt, log of the mass of each continuation of the
        response tokens read so far (log 1e-300 for none); 0 at the prompt's positions, which are never scored."""
        idx, row = torch.unique(idx, dim=0, return_inverse=True)   # equal rows get equal logits: each computed once
        B, T = idx.shape
        n = min(T - self.prompt_len + 1, self.responses.shape[1])   # position prompt_len - 1 + j read j tokens
        read = idx[:, self.prompt_len:self.prompt_len + n - 1, None] == self.responses[:, :n - 1].T   # [B, n-1, C]
        starts = torch.cat([torch.ones(B, 1, len(self.responses)), read.double().cumprod(dim=1)], dim=1)  # [B, n, C]
        next_token = F.one_hot(self.responses[:, :n], self.vocab_size).double()                     # [C, n, vocab]
        mass = torch.einsum("bjc,cjv->bjv", starts * torch.softmax(self.logits, dim=0), next_token)  # [B, n, vocab]
        out = torch.zeros(B, T, self.vocab_size, dtype=torch.float64)
        out[:, self.prompt_len - 1:self.prompt_len - 1 + n] = mass.clamp_min(1e-300).log()
        return out[row]


def minimise(theta, loss_fn, max_iter=100):
    """Minimise a smooth loss of a few dozen float64 numbers `theta` (a table's logits) by Newton's method: solve
    H d = g with the exact Hessian, halve d until the loss falls, stop when no step lowers it. Gradient methods
    crawl where a loss weighs its terms by probabilities from 1 down to 1e-17; Newton does not. Returns the loss."""
    loss = loss_fn()
    for _ in range(max_iter):
        grad, = torch.autograd.grad(loss, theta, create_graph=True)
        unit_vectors = torch.eye(len(theta), dtype=theta.dtype)             # row i of H is grad's gradient along e_i:
        hessian = torch.autograd.grad(grad, theta, unit_vectors, is_grads_batched=True)[0]   # all rows in one pass
        # least squares: moving every logit by the same amount changes no probability, so H is singular there
        step = torch.linalg.lstsq(hessian.detach(), grad.detach()[:, None]).solution[:, 0]
        start, new_loss = theta.detach().clone(), None
        for halvings in range(40):
            with torch.no_grad():
                theta.copy_(start - step / 2 ** halvings)
            if (new_loss := loss_fn()) < loss:
                break
        else:   # no step lowers the loss: this is its minimum, to float64's digits
            with torch.no_grad():
                theta.copy_(start)
            break
        loss = new_loss
    return loss.item()


# ====================================================================================================
# Appendix: the run contract (not needed to follow the methods)
# ====================================================================================================
# Flags, device, faults (one line on stderr; exit 1 a fault of the run, 2 bad input, 130 Ctrl-C), the run's
# folder (replaced whole or not at all), checkpoints, the SFT cache a classroom shares, and peak memory.

import argparse
import contextlib
import ctypes
import gc
import hashlib
import io
import json
import os
import shutil
import signal
import sys
import warnings


def number(kind, test, what):   # an argparse type: a finite `kind` that passes `test`, or one line saying `what`
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and test(value)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


def bounded_int(low, high):
    return number(int, lambda v: low <= v <= high, f"a whole number from {low} to {high}")


positive_float = number(float, lambda v: v > 0, "a number > 0")
nonneg_float = number(float, lambda v: v >= 0, "a number >= 0")
positive_int = number(int, lambda v: v > 0, "a whole number > 0")


def add_run_args(parser, method, steps, batch_size, lr, steps_help="optimiser steps (0 evaluates the SFT model)"):
    """The flags every script shares. Sizes are bounded (a toy of 4000 pairs needs no more); seeds are 32-bit."""
    g = parser.add_argument_group("run")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto: cuda, then mps, then cpu (default: %(default)s)")
    g.add_argument("--seed", type=bounded_int(0, 2**32 - 1), default=0,
                   help="same seed, same device: same numbers (default: %(default)s)")
    g.add_argument("--out", default=f"out/{method}", help="the run's own folder, replaced whole (default: %(default)s)")
    g.add_argument("--sft-dir", default="out/sft", help="the SFT models, shared by all runs (default: %(default)s)")
    g.add_argument("--sft-steps", type=positive_int, default=300, help="SFT steps (default: %(default)s)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=bounded_int(0, 10**6), default=steps,
                   help=steps_help + (" (default: %(default)s)" if steps is not None else ""))
    g.add_argument("--batch-size", type=bounded_int(1, 4096), default=batch_size,
                   help="examples per step (default: %(default)s)")
    g.add_argument("--lr", type=positive_float, default=lr, help="Adam's learning rate (default: %(default)s)")
    g.add_argument("--eval-samples", type=bounded_int(1, 65536), default=512,
                   help="held-out samples per policy in the evaluation (default: %(default)s)")
    g = parser.add_argument_group("model size (the SFT model and every policy)")
    g.add_argument("--n-layer", type=bounded_int(1, 48), default=GPTConfig.n_layer, help="depth (default: %(default)s)")
    g.add_argument("--n-head", type=bounded_int(1, 64), default=GPTConfig.n_head, help="heads (default: %(default)s)")
    g.add_argument("--n-embd", type=bounded_int(8, 2048), default=GPTConfig.n_embd,
                   help="width, a multiple of --n-head (default: %(default)s)")


def model_config(args):
    if args.n_embd % args.n_head:
        fail(f"--n-embd ({args.n_embd}) must be a multiple of --n-head ({args.n_head})")
    return GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)


def fail(message, code=2):   # one clear line on stderr and a non-zero exit: how bad input ends, never a traceback
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda, but this torch sees no CUDA device; use --device cpu, or install a CUDA build of torch")
    elif name == "mps" and not torch.backends.mps.is_available():
        fail("--device mps, but MPS is not available here; use --device cpu")
    if name == "cuda":
        # Same seed, same GPU, same numbers (PyTorch's "Reproducibility" notes): a fixed cuBLAS workspace, and
        # attention on the "math" kernel (the fast ones add gradients in no fixed order; at 22 tokens it is free)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)
    print(f"device: {name}" + (f" ({torch.cuda.get_device_name()})" if name == "cuda" else ""), file=sys.stderr)
    return torch.device(name)


# --- Faults: one line and an exit code, never a traceback ---------------------------------------------

progress = argparse.Namespace(out=None, phase="setup", step=None, total=None, lr=None)   # where the run is


def check_loss(loss, step, total=None, phase="training"):
    """Every step: note where the run is (for Ctrl-C's line); stop at a non-finite loss before the weights do."""
    progress.phase, progress.step, progress.total = phase, step, total
    if not math.isfinite(value := float(loss.detach())):
        raise FloatingPointError(f"the loss is {value} at step {step}{f' of {total}' if total else ''} "
                                 f"({phase}): the run diverged")


def check_weights(model):
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise FloatingPointError("a weight is not finite after the last training step: the run diverged")


def run(main):
    """A script's main(), where every fault ends in one line on stderr and an exit code. Scripts print to stdout
    only after saving, so a reader that leaves early (python simpo.py | head -3) costs output, never the run."""
    gc.freeze()   # torch's import-time objects are never garbage: collections and the exit skip them (~1 s)
    untouched = lambda: f"previous results in {progress.out or 'the output folder'} untouched"
    where = lambda: (f"at step {progress.step}{f' of {progress.total}' if progress.total else ''} ({progress.phase})"
                     if progress.step is not None and "training" in progress.phase else f"during {progress.phase}")
    try:
        main()
        sys.stdout.flush()   # here, not at the exit, where a reader that has left would cost a traceback
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # Python flushes stdout once more at exit
    except KeyboardInterrupt:
        print(f"interrupted after the save; the run was saved in {progress.out}" if progress.phase == "saved"
              else f"interrupted {where()}; {untouched()}", file=sys.stderr)
        sys.exit(130)
    except FloatingPointError as e:   # check_loss, check_weights: the run diverged
        hint = ("try a smaller model (--n-layer, --n-embd) or another --seed" if progress.phase == "SFT training"
                else f"lower the learning rate (--lr is {progress.lr:g}; try {progress.lr / 10:g})")
        fail(f"{e}; {hint}; nothing was saved, {untouched()}", 1)
    except (MemoryError, RuntimeError) as e:   # torch.OutOfMemoryError is a RuntimeError; the CPU's a plain one
        if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and "can't allocate memory" not in str(e):
            raise
        fail(f"out of memory {where()}; lower --batch-size, --eval-samples or the model size; {untouched()}", 1)


# --- Files: --out is the run's own folder, replaced whole or not at all -------------------------------

def prepare_out_dir(out):
    """Before any work: refuse an --out that holds more than a run (it is replaced whole), put the previous
    run back if a save was killed between its two renames, and prove the place writable."""
    progress.out = out
    staging, previous = (f"{os.path.normpath(out)}.{what}" for what in ("incoming", "previous"))
    if os.path.isdir(previous) and not os.path.exists(out):
        os.rename(previous, out)
        print(f"note: a save into {out} was cut short; the previous run is back in place", file=sys.stderr)
    if os.path.exists(out) and not (os.path.isdir(out) and set(os.listdir(out)) <= {"metrics.json", "log.jsonl",
                                                                                      "model.pt", ".DS_Store"}):
        fail(f"--out {out!r} holds more than a run's metrics.json, log.jsonl and model.pt, and a run replaces its "
             f"folder whole: choose another --out")
    try:
        shutil.rmtree(previous, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        os.rmdir(staging)
    except OSError as e:
        fail(f"cannot write to output folder {out!r}: {e.strerror}")


def save_run(out, model, args, metrics, log_rows):
    """metrics.json (flat), log.jsonl (one line per logged step) and model.pt (plain types only), as one set."""
    plain_args = {k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v) for k, v in vars(args).items()}
    save_files(out, {"metrics.json": (json.dumps(metrics, indent=2) + "\n").encode(),
                     "log.jsonl": "".join(json.dumps(r) + "\n" for r in log_rows).encode(),
                     "model.pt": {"model": model.state_dict(), "config": asdict(model.config), "args": plain_args}})


def save_files(out, files):
    """Replace the folder `out` by one that holds `files` (name -> bytes, or an object to torch.save): written
    into OUT.incoming beside it (a full disk or Ctrl-C there leaves `out` as it was), then swapped in."""
    progress.phase, name = "saving", ""
    staging, previous = (f"{os.path.normpath(out)}.{what}" for what in ("incoming", "previous"))
    try:
        os.makedirs(staging)
        for name, content in files.items():
            write(os.path.join(staging, name), content)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        fail(f"{e.strerror} writing {os.path.join(out, name)}; nothing was saved, previous results in {out} "
             f"untouched", 1)
    hold = signal.signal(signal.SIGINT, signal.SIG_IGN)   # no Ctrl-C between the two renames
    try:
        if os.path.exists(out):
            os.rename(out, previous)
        os.rename(staging, out)
        progress.phase = "saved"
    finally:
        signal.signal(signal.SIGINT, hold)
    shutil.rmtree(previous, ignore_errors=True)


def write(path, content):
    """Bytes (or an object, torch.save'd in memory: a full disk is then a plain OSError) written for good."""
    if not isinstance(content, bytes):
        buffer = io.BytesIO()
        torch.save(content, buffer)
        content = buffer.getvalue()
    with open(path, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())


def load(path, device="cpu"):
    """(torch.load(path, weights_only=True), None), or (None, why not, in our words)."""
    try:
        with warnings.catch_warnings():   # torch warns about some foreign files before it fails on them
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=device, weights_only=True), None
    except Exception as e:
        with open(path, "rb") as f:
            head = f.read(4)
        if head != b"PK\x03\x04":   # torch.save writes a zip archive
            return None, "empty" if not head else "not a PyTorch file (unreadable or corrupt)"
        if "weights_only" in str(e):
            return None, "not a file of this project (it holds Python objects, not only tensors and plain values)"
        return None, "truncated (an interrupted copy or a full disk?)"


def load_checkpoint(path, device="cpu"):
    """The model and arguments of a model.pt that a script saved; anything else is one clear line, exit 2."""
    ckpt, problem = load(path, device) if os.path.isfile(path) else (None, "no such file (train one first)")
    try:
        model = GPT(GPTConfig(**ckpt["config"])).to(device)
        model.load_state_dict(ckpt["model"])
    except Exception:
        fail(f"cannot load checkpoint {path!r}: {problem or 'not a model.pt of this project'}")
    return model.eval(), ckpt["args"]


# --- The SFT cache: a classroom on one --sft-dir trains each SFT model once ---------------------------

@contextlib.contextmanager
def sft_cache(task, device, sft_dir, seed, steps, cfg):
    """with sft_cache(...) as cache: cache.model is the cached SFT model or None; cache.save(model, info) stores one
    just trained, under a key of what determines the weights (demonstrations, model size, seed, steps, device).
    A bad file costs a note and a rebuild; one that cannot be written, a note. Runs started together train once."""
    demos = hashlib.sha256(b"".join(t.cpu().numpy().tobytes() for t in (task.sft_ids, task.sft_mask,
                                                                          task.sft_heldout_ids, task.sft_heldout_mask)))
    key = {"version": 1, "demos": demos.hexdigest(), "model": asdict(cfg), "seed": seed, "steps": steps,
           "batch_size": SFT_BATCH_SIZE, "lr": SFT_LR,
           "device": f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type}
    path = os.path.join(sft_dir, f"sft-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.pt")
    if os.path.isdir(path):
        fail(f"the SFT cache path {path} is a folder, not a file: remove it or choose another --sft-dir")

    def save(model, info):
        try:
            write(path + ".tmp", {"key": key, "model": model.state_dict(), "info": info})
            os.replace(path + ".tmp", path)   # readers see the old file or the new one, whole
        except OSError as e:
            print(f"note: could not write the SFT cache {path} ({e.strerror}); going on with the model just trained "
                  f"(the next run will train it again)", file=sys.stderr)
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
    with lock(path + ".lock"):
        cache = argparse.Namespace(path=path, model=None, info=None, save=save)
        ckpt, problem = load(path, device) if os.path.exists(path) else (None, "missing")
        if problem is None and not (isinstance(ckpt, dict) and ckpt.get("key") == key and "model" in ckpt):
            problem = "not an SFT cache of these settings (of this project)"
        if problem:
            print(f"note: no SFT cache at {path}; training the SFT model ({steps} steps, once)" if problem == "missing"
                  else f"note: SFT cache {path} is {problem}; rebuilding it", file=sys.stderr)
        else:
            cache.model = GPT(cfg).to(device).eval()
            cache.model.load_state_dict(ckpt["model"])
            cache.info = dict(ckpt["info"], cached=True, path=path)
        yield cache


@contextlib.contextmanager
def lock(path):
    """An exclusive flock on `path` for the block. The lock file stays (were it deleted, a third run could lock a
    new file while a second waits on the old); with none to take (Windows, a read-only folder), no lock."""
    try:
        import fcntl
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"note: another run is training this SFT model (lock {path}); waiting for it", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)   # releases the lock


# --- Peak memory ---------------------------------------------------------------------------------------

class PeakMemory:
    """What training adds to the memory in use, at its peak, in MB: sampled after each training forward pass of
    `policy`, less what was in use at the start: CUDA's allocated bytes, the CPU's live heap (glibc), else (macOS)
    the peak resident set. A dummy backward pass first pays the ~3 MB a process keeps after its first one."""

    def __init__(self, policy):
        self.device = next(policy.parameters()).device
        ids = torch.ones(2 * SFT_BATCH_SIZE, policy.config.block_size, dtype=torch.long, device=self.device)
        sequence_logps(policy, ids, torch.ones_like(ids))[0].sum().backward()
        policy.zero_grad(set_to_none=True)
        self.base = self.peak = self.in_use()
        # a plain function, not a bound method: frozen copies of the policy carry the hook but never train
        policy.register_forward_hook(lambda m, *_: self.sample() if m.training and torch.is_grad_enabled() else None)

    def in_use(self):
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallinfo2.restype = type("mallinfo2", (ctypes.Structure,), {"_fields_": [("n", ctypes.c_size_t * 10)]})
            counts = libc.mallinfo2().n
            return counts[7] + counts[4]   # uordblks + hblkhd: the bytes in use in the heap and in mmapped blocks
        except (OSError, AttributeError):   # not glibc
            import resource
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return maxrss if sys.platform == "darwin" else maxrss * 1024   # macOS: bytes; Linux: kilobytes

    def sample(self):
        self.peak = max(self.peak, self.in_use())

    def mb(self):
        return (self.peak - self.base) / 2**20
