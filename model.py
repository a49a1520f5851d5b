"""
model.py: everything the three methods share that is not the objective.

    1. the network     a small decoder-only GPT in the nanoGPT mould (~0.1 M parameters)
    2. log-probs       sequence_logps: log pi(y|x) summed over RESPONSE tokens only
    3. sampling        batched, temperature / top-k, stops at EOS, its own RNG, a key/value cache
    4. the SFT start   cross-entropy on the demonstrations, cached on disk; pi_ref for DPO, pi_1 for SPPO
    5. the run contract  flags, device, output folder, atomic files, checkpoint, timing and memory

Nothing here knows about DPO, SimPO or SPPO; dpo.py, simpo.py and sppo.py hold those.
"""

import argparse
import copy
import ctypes
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


# ----------------------------------------------------------------------------------------------------
# 1. The network
# ----------------------------------------------------------------------------------------------------

@dataclass
class GPTConfig:
    vocab_size: int = 90     # len(data.VOCAB); a test checks that they agree
    block_size: int = 32     # longest sequence: BOS + 2 prompt words + SEP + 16 words + EOS = 21
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    dropout: float = 0.0     # off: the methods compare log-probs of the same model at two moments


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)   # query, key, value in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # [B, nh, T, hs]
        is_causal = True
        if cache is not None:
            # Key/value cache for sampling: the prompt fills it in one causal pass, after which each new
            # token attends to everything cached (no mask needed: nothing later exists yet).
            if "k" in cache:
                assert T == 1, "after the prompt, the cache takes one token at a time"
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
                is_causal = False
            cache["k"], cache["v"] = k, v
        y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd), nn.Dropout(cfg.dropout))

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
        self.drop = nn.Dropout(cfg.dropout)
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
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.lm_head(self.ln_f(x))


def num_params(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------
# 2. Sequence log-probabilities: log pi(y|x) = sum_{i=1..|y|} log pi(y_i | x, y_<i)
# ----------------------------------------------------------------------------------------------------

def sequence_logps(model, input_ids, response_mask):
    """Sum of log pi(y_i | x, y_<i) over the response tokens of each row, and |y|.

    input_ids     [B, T]  BOS, prompt, SEP, response, EOS, then PAD to the batch's width
    response_mask [B, T]  1 on response tokens (the closing EOS included, as in the official DPO and
                          SimPO code: ending the answer is part of the answer), 0 on prompt and padding
    returns       logps [B] (float32), lengths [B] (number of response tokens, |y|)

    Position t's logits predict token t+1, so logits and targets are shifted against each other by one,
    and so is the mask: the prompt and the padding are multiplied by 0 and never contribute.
    """
    logits = model(input_ids[:, :-1])                                 # [B, T-1, V]: predicts tokens 1..T-1
    targets = input_ids[:, 1:]                                        # [B, T-1]
    mask = response_mask[:, 1:].to(torch.float32)                     # [B, T-1]
    token_logps = torch.log_softmax(logits.float(), dim=-1)           # float32 even under autocast
    token_logps = token_logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)   # [B, T-1]
    return (token_logps * mask).sum(-1), mask.sum(-1)


def pair_logps(model, chosen_ids, chosen_mask, rejected_ids, rejected_mask):
    """log pi(y_w|x) and log pi(y_l|x) in ONE forward pass over the stacked batch [2B, T] (as the
    official DPO code's concatenated_forward does), plus |y_w| and |y_l|. Each tensor [B]."""
    B = chosen_ids.shape[0]
    T = max(chosen_ids.shape[1], rejected_ids.shape[1])
    ids = torch.cat([F.pad(chosen_ids, (0, T - chosen_ids.shape[1])),
                     F.pad(rejected_ids, (0, T - rejected_ids.shape[1]))])   # PAD is token 0
    mask = torch.cat([F.pad(chosen_mask, (0, T - chosen_mask.shape[1])),
                      F.pad(rejected_mask, (0, T - rejected_mask.shape[1]))])
    logps, lengths = sequence_logps(model, ids, mask)
    return logps[:B], logps[B:], lengths[:B], lengths[B:]


# ----------------------------------------------------------------------------------------------------
# 3. Sampling
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(model, prompts, max_new_tokens, eos_id, banned_ids=(), temperature=1.0, top_k=None,
           generator=None, batch_size=1024, use_cache=True):
    """Sample one response per prompt row.

    prompts [N, P] (all prompts of the toy task have the same length, so no left padding is needed)
    returns responses [N, max_new_tokens]: the tokens up to and including EOS, then 0 (PAD).
    Every response ends in EOS: one still open after max_new_tokens - 1 tokens is closed by force.
    banned_ids (PAD, BOS, SEP) are never drawn, so a sample always parses as a response.
    The draws come from `generator` alone, so sampling is reproducible and leaves the global RNG (and
    so the training run) untouched.
    """
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, prompts.shape[0], batch_size):
        idx = prompts[start:start + batch_size]
        B = idx.shape[0]
        caches = [dict() for _ in model.blocks] if use_cache else None
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        tokens = []
        for step in range(max_new_tokens):
            logits = model(idx if (step == 0 or not use_cache) else tokens[-1][:, None], caches)[:, -1, :]
            logits = logits.float() / temperature
            logits[:, list(banned_ids)] = float("-inf")
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits[logits < kth] = float("-inf")
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
    model.train(was_training)
    return torch.cat(out)


def make_generator(device, seed):
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


# ----------------------------------------------------------------------------------------------------
# 4. The SFT warm start, shared by all three methods (DPO: pi_ref; SimPO: the start; SPPO: pi_1)
# ----------------------------------------------------------------------------------------------------

SFT_BATCH_SIZE = 64
SFT_LR = 3e-3


@torch.no_grad()
def sequence_logps_all(model, ids, mask, batch_size=1024):
    """sequence_logps over many rows, in batches trimmed of padding, no gradients: logps [M], lengths [M]."""
    parts = [sequence_logps(model, *trim(ids[s:s + batch_size], mask[s:s + batch_size]))
             for s in range(0, ids.shape[0], batch_size)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def sft_ce(model, ids, mask):
    """Mean cross-entropy per response token (nats) over a set of demonstrations."""
    logps, lengths = sequence_logps_all(model, ids, mask)
    return -logps.double().sum().item() / lengths.sum().item()


def sft_model(task, device, sft_dir, seed, steps, cfg=None, quiet=False):
    """The SFT model for this task: loaded from `sft_dir` when a cache with the same key is there, else
    trained (cross-entropy on the response tokens of task.sft_ids) and cached. Returns (model, info)."""
    cfg = cfg or GPTConfig()
    # Everything that determines the weights goes into the key (the device too: CPU and CUDA kernels
    # round differently, and "same seed, same device, same numbers" is the promise).
    # The demonstrations enter as a digest of the tensors themselves, so runs that differ only in how the
    # preference pairs are made (--length-bias, --pair-style, --tau) share one SFT model, as they should.
    demos = hashlib.sha256()
    for t in (task.sft_ids, task.sft_mask, task.sft_heldout_ids, task.sft_heldout_mask):
        demos.update(t.cpu().numpy().tobytes())
    key = {"version": 1, "demos": demos.hexdigest(), "model": asdict(cfg), "seed": seed, "steps": steps,
           "batch_size": SFT_BATCH_SIZE, "lr": SFT_LR, "device": device.type}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(sft_dir, f"sft-{digest}.pt")
    if os.path.exists(path):
        try:
            ckpt = torch.load(path, map_location=device, weights_only=True)
            if not isinstance(ckpt, dict) or ckpt.get("key") != key:
                raise ValueError("its key does not match this run's settings")
            model = GPT(cfg).to(device)
            model.load_state_dict(ckpt["model"])
            model.eval()
            return model, dict(ckpt["info"], cached=True, path=path)
        except Exception as e:  # corrupt, truncated, foreign: say so in one line and rebuild
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            print(f"note: SFT cache {path} is unusable ({first_line}); rebuilding it", file=sys.stderr)
    else:
        print(f"note: no SFT cache at {path}; training the SFT model ({steps} steps, once)", file=sys.stderr)

    torch.manual_seed(seed)
    model = GPT(cfg).to(device)
    ids, mask = task.sft_ids.to(device), task.sft_mask.to(device)
    held_ids, held_mask = task.sft_heldout_ids.to(device), task.sft_heldout_mask.to(device)
    ce_before = sft_ce(model, held_ids, held_mask)
    opt = torch.optim.AdamW(model.parameters(), lr=SFT_LR, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)          # batch order: CPU generator, same on every device
    t0 = time.time()
    model.train()
    bar = tqdm(range(steps), desc="SFT", disable=True if quiet else None, leave=False, dynamic_ncols=True)
    for step in bar:
        lr = SFT_LR * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))  # warmup, cosine
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, ids.shape[0], (SFT_BATCH_SIZE,), generator=g).to(device)
        b_ids, b_mask = trim(ids[idx], mask[idx])
        logps, lengths = sequence_logps(model, b_ids, b_mask)
        loss = -logps.sum() / lengths.sum()           # cross-entropy per response token
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    info = {"ce_before": ce_before, "ce_after": sft_ce(model, held_ids, held_mask),
            "seconds": time.time() - t0, "steps": steps}
    os.makedirs(sft_dir, exist_ok=True)
    atomic_torch_save({"key": key, "model": model.state_dict(), "info": info}, path)
    return model, dict(info, cached=False, path=path)


def trim(ids, mask):
    """Drop the columns that are padding in every row of a batch (right padding, so from the end)."""
    width = int((ids != 0).sum(0).nonzero().max().item()) + 1
    return ids[:, :width], mask[:, :width]


class swapped_weights:
    """with swapped_weights(model, state): the module computes with `state` (a state_dict) inside the block
    and gets its own weights back after. Lets one network play two models, as simpo.py's evaluation
    needs (the SFT baseline) without building a second one."""

    def __init__(self, model, state):
        self.model, self.state = model, state

    def __enter__(self):
        self.saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.state)
        return self.model

    def __exit__(self, *exc):
        self.model.load_state_dict(self.saved)
        return False


def frozen_copy(model):
    """A copy that never trains: eval mode, requires_grad False (DPO's pi_ref, SPPO's pi_t)."""
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


# ----------------------------------------------------------------------------------------------------
# 5. The run contract: flags, device, output folder, files, timing and memory
# ----------------------------------------------------------------------------------------------------

def _number(kind, test, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if not test(value) or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


positive_float = _number(float, lambda v: v > 0, "a number > 0")
nonneg_float = _number(float, lambda v: v >= 0, "a number >= 0")
positive_int = _number(int, lambda v: v > 0, "a whole number > 0")
nonneg_int = _number(int, lambda v: v >= 0, "a whole number >= 0")
probability = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def add_run_args(parser, method, steps, batch_size, lr, steps_help=None):
    """The flags every method script shares (the run contract), with each script's own defaults.
    steps=None leaves the default to the script (sppo.py: it depends on --variant; say so in steps_help)."""
    g = parser.add_argument_group("run")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where to run; auto = cuda, then mps, then cpu (default: %(default)s)")
    g.add_argument("--seed", type=nonneg_int, default=0,
                   help="seeds data, SFT, batches and sampling; same seed + same device = same numbers")
    g.add_argument("--out", default=f"out/{method}",
                   help="folder for metrics.json, log.jsonl and model.pt (default: %(default)s)")
    g.add_argument("--sft-dir", default="out/sft",
                   help="cache of SFT models, shared by all methods; delete it to retrain (default: %(default)s)")
    g.add_argument("--sft-steps", type=positive_int, default=300,
                   help="SFT steps for the warm start (more: a sharper start, slower first run)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=nonneg_int, default=steps,
                   help=steps_help or "optimiser steps (more: further from the start; 0 evaluates the SFT model)")
    g.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help="examples per step (larger: smoother, slower steps)")
    g.add_argument("--lr", type=positive_float, default=lr,
                   help="Adam learning rate (higher: faster, until the curve jumps in a few steps)")
    g.add_argument("--eval-samples", type=positive_int, default=512,
                   help="held-out samples per policy in the evaluation (more: less noise, slower)")
    return parser


def fail(message, code=2):
    """One clear line on stderr and a non-zero exit: how bad input ends, never with a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else (
            "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu")
    elif name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda, but this torch sees no CUDA device (torch.cuda.is_available() is False); "
             "use --device cpu, or install a CUDA build of torch")
    elif name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        fail("--device mps, but MPS is not available here; use --device cpu")
    print(f"device: {name}")
    return torch.device(name)


def prepare_out_dir(path):
    """Create the output folder and prove it writable before any training starts."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        fail(f"cannot write to output folder {path!r}: {e.strerror or e}")


def _atomic(path, write):
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)    # a reader sees the old file or the new one, never half of one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_torch_save(obj, path):
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text, path):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    _atomic(path, write)


def save_run(out_dir, model, args, metrics, log_rows):
    """metrics.json (flat), log.jsonl (one line per logged step) and model.pt (plain types only)."""
    atomic_write_text(json.dumps(metrics, indent=2) + "\n", os.path.join(out_dir, "metrics.json"))
    atomic_write_text("".join(json.dumps(r) + "\n" for r in log_rows), os.path.join(out_dir, "log.jsonl"))
    plain_args = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in vars(args).items()}
    atomic_torch_save({"model": model.state_dict(), "config": asdict(model.config), "args": plain_args},
                      os.path.join(out_dir, "model.pt"))


def load_checkpoint(path, device="cpu"):
    """Load a model.pt written by save_run; a missing, corrupt or foreign file is a clear error."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        model = GPT(GPTConfig(**ckpt["config"])).to(device)
        model.load_state_dict(ckpt["model"])
    except Exception as e:
        fail(f"cannot load checkpoint {path!r}: {(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}")
    model.eval()
    return model, ckpt["args"]


class MemoryMeter:
    """Peak memory of training, in MB, comparable between methods on the same device.

    CUDA: torch.cuda.max_memory_allocated since start(). CPU (glibc): the peak of live heap bytes
    (mallinfo2) above the level at start(), sampled after each forward and each backward, where a step
    holds the most. Elsewhere: the process's peak resident set (ru_maxrss), a coarse upper bound.
    Call start() before the method's own models and optimiser are built, so that they count too.
    On CPU the first backward pass of a process also allocates about 25 MB of runtime buffers that stay
    allocated; a run that had to train the SFT model first has paid for them before start(), so its
    number is lower by that much. Compare runs made with the SFT cache present, as the README does.
    """

    def __init__(self, device):
        self.device = device
        self.base = 0
        self.peak = 0
        self._mallinfo2 = None
        if device.type == "cpu":
            try:
                libc = ctypes.CDLL("libc.so.6")
                libc.mallinfo2.restype = _Mallinfo2
                self._mallinfo2 = libc.mallinfo2
            except (OSError, AttributeError):
                pass

    def _now(self):
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        if self._mallinfo2 is not None:
            info = self._mallinfo2()
            return info.uordblks + info.hblkhd
        import resource   # Unix only; imported here so that the rest of this file runs anywhere
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.base = self._now()
        self.peak = self.base
        return self

    def sample(self):
        if self.device.type == "cuda":
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
        else:
            self.peak = max(self.peak, self._now())

    def peak_mb(self):
        self.sample()
        return (self.peak - self.base) / 2**20


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]


# ----------------------------------------------------------------------------------------------------
# 6. A table policy: any distribution over a finite list of responses, as a language model (--exact)
# ----------------------------------------------------------------------------------------------------
#
# Each script's claim ("DPO's loss is minimised at pi*", "SPPO's regression is the multiplicative-weights
# step") is about the best POLICY, not the best network. To check a claim exactly, the policy must be able
# to represent every distribution over the responses, and the responses must be few enough to list. A table
# of one logit per response does both: pi(y) = exp(theta_y) / sum_y' exp(theta_y').
#
# Why a table that looks like a language model, and not a plain vector with its own log-prob function:
# the chain rule writes ANY distribution over a finite set of token sequences as next-token distributions,
#     pi(y_i | x, y_<i) = (mass of the responses that start with y_<i y_i) / (mass of those that start with y_<i)
# so the table's forward(idx) can return next-token logits, log(mass of each continuation), and then
# sequence_logps, pair_logps and sample work on it UNCHANGED: the sum over response tokens telescopes to
#     log pi(y|x) = theta_y - logsumexp(theta).
# The scripts' --exact modes sample from it with model.sample, and the tests check that sequence_logps and
# pair_logps on it give exactly that. To train it they read the same numbers from log_probs(), in one line and
# in float64 (sequence_logps works in float32, which blurs a loss's last digits: the checks want the minimiser
# to 1e-8, and a few hundred thousand evaluations to be cheap). The table ignores the prompt (one
# distribution for every x); the toy judge ignores it too, so the optima do as well. CPU only (float64).

NEVER = -1e30   # the logit of a next token that no listed response continues with (finite: no NaN gradients)


class TablePolicy(nn.Module):
    """pi(y|x) = softmax(theta)[y] over a fixed list of responses, served as a language model.

    responses   [C, L] token ids, each response ending in its EOS and then padding (0), all different
    prompt_len  number of prompt tokens before the first response token (the response starts there)
    vocab_size  width of the logits
    logits      [C] the starting theta (default: zeros, the uniform policy)
    forward(idx) returns next-token logits [B, T, vocab] like GPT.forward: at every position after the prompt,
    log of the table mass of each continuation of the prefix read so far. Logits at prompt positions are 0
    (they are never scored: the response mask is 0 there), and a prefix that is not the start of any listed
    response gets 0 too: the token that left the list already cost NEVER.
    """

    blocks = (None,)   # model.sample makes one cache dict per block: the table keeps the prefix read so far in it

    def __init__(self, responses, prompt_len, vocab_size, logits=None):
        super().__init__()
        responses = torch.as_tensor(responses, dtype=torch.long).cpu()
        C, L = responses.shape
        assert len({tuple(r) for r in responses.tolist()}) == C, "the listed responses must all differ"
        self.prompt_len, self.vocab_size = prompt_len, vocab_size
        self.logits = nn.Parameter(torch.zeros(C, dtype=torch.float64) if logits is None
                                   else torch.as_tensor(logits, dtype=torch.float64).clone())
        self.register_buffer("responses", responses)
        # The prefix tree. node[c, j] numbers the distinct prefixes responses[c, :j], j = 0..L (node 0: the
        # empty prefix); through[n, c] says that response c starts with prefix n; child[n, v] is the prefix n
        # followed by token v, or -1 if no listed response continues prefix n with v.
        prefixes = {}
        node = torch.zeros(C, L + 1, dtype=torch.long)
        for c in range(C):
            for j in range(L + 1):
                node[c, j] = prefixes.setdefault(tuple(responses[c, :j].tolist()), len(prefixes))
        through = torch.zeros(len(prefixes), C, dtype=torch.bool)
        child = torch.full((len(prefixes), vocab_size), -1, dtype=torch.long)
        for c in range(C):
            through[node[c], c] = True
            for j in range(L):
                child[node[c, j], responses[c, j]] = node[c, j + 1]
        self.register_buffer("node", node[:, :L])
        self.register_buffer("through", through)
        self.register_buffer("child", child)

    def log_probs(self):
        """log pi(y|x) of each listed response, [C], in float64: theta_y - logsumexp(theta), the number that
        sequence_logps computes through forward (in float32) by summing log pi(y_i | x, y_<i) over y's tokens."""
        return torch.log_softmax(self.logits, dim=0)

    def probs(self):
        """pi(y|x) of each listed response, [C], float64, detached (for KLs, win rates, exploitability)."""
        return torch.softmax(self.logits.detach(), dim=0)

    def forward(self, idx, caches=None):
        """idx [B, T] token ids -> logits [B, T, vocab]. caches: sampling's dict, which keeps the sequence so far."""
        B, T = idx.shape
        if caches is not None:                     # sampling feeds one new token at a time: rebuild the prefix
            seq = idx if "idx" not in caches[0] else torch.cat([caches[0]["idx"], idx], dim=1)
            caches[0]["idx"] = seq
        else:
            seq = idx
        C, L = self.responses.shape
        # log of the table mass of each prefix (logsumexp over the responses that start with it), and the next-token
        # logits of a prefix: the log mass of each continuation. log_softmax of them is log(mass(n v) / mass(n)).
        never = torch.full_like(self.logits, NEVER)
        prefix_mass = torch.logsumexp(torch.where(self.through, self.logits, never), dim=-1)                 # [nodes]
        node_logits = torch.where(self.child >= 0, prefix_mass[self.child.clamp(min=0)],
                                  torch.full_like(prefix_mass[self.child.clamp(min=0)], NEVER))   # [nodes, vocab]
        # the returned positions are the last T of seq; position start + j has read the first j response tokens
        S, start = seq.shape[1], self.prompt_len - 1
        out = torch.zeros(B, T, self.vocab_size, device=idx.device, dtype=node_logits.dtype)
        j0, j1 = max(S - T - start, 0), min(S - start, L)                  # prefix lengths j0..j1-1 to look up
        if j1 > j0:
            resp = seq[:, self.prompt_len:self.prompt_len + j1 - 1]        # [B, j1-1] the response tokens read
            same = resp[:, :, None] == self.responses[:, :j1 - 1].T[None]  # [B, j1-1, C]
            match = torch.cat([torch.ones(B, 1, C, dtype=torch.bool, device=idx.device),
                               same.long().cumprod(dim=1).bool()], dim=1)[:, j0:j1]   # [B, n, C]: c has this prefix
            first = match.long().argmax(-1)                                # [B, n] one response that has it
            rows = node_logits[self.node[first, torch.arange(j0, j1, device=idx.device)]]   # [B, n, vocab]
            offset = start - (S - T)
            out[:, offset + j0:offset + j1] = torch.where(match.any(-1)[..., None], rows, torch.zeros_like(rows))
        return out


def minimise(parameters, loss_fn, max_iter=300, tolerance_grad=1e-10):
    """Minimise a deterministic loss (an expectation computed in full, no minibatches) by L-BFGS with a line
    search, until no gradient entry exceeds tolerance_grad, the loss changes by less than 1e-15, or after
    max_iter iterations: a table has a few dozen numbers (float64) and the exact checks need its minimiser to
    about eight digits, which Adam's fixed steps only approach. Returns the final loss."""
    opt = torch.optim.LBFGS(parameters, lr=1.0, max_iter=max_iter, history_size=50, tolerance_grad=tolerance_grad,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return loss_fn().item()
