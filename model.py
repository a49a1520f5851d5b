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
import errno
import hashlib
import io
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
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
    block_size: int = 32     # longest sequence: BOS + 3 prompt words + SEP + 16 words + EOS = 22
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
    return -logps.cpu().double().sum().item() / lengths.sum().item()   # float64 on the CPU: MPS has none


def sft_model(task, device, sft_dir, seed, steps, cfg=None, quiet=False):
    """The SFT model for this task: loaded from `sft_dir` when a cache with the same key is there, else
    trained (cross-entropy on the response tokens of the demonstrations task.sft_ids) and cached.
    Returns (model, info). Only four tensors of `task` are read: the demonstrations and their held-out set.

    A classroom shares one --sft-dir: runs that start together on an empty one train the model once (the
    first takes a file lock, the others wait for it and load its cache); a read-only folder that holds the
    cache is read; a cache that cannot be written (read-only folder, full disk) costs a note, not the run."""
    cfg = cfg or GPTConfig()
    path, key = sft_cache_path(task, device, sft_dir, seed, steps, cfg)
    if os.path.isdir(path):
        fail(f"the SFT cache path {path} is a folder, not a file: remove it or choose another --sft-dir")
    cached = _load_sft_cache(path, key, cfg, device, steps)
    if cached is not None:
        return cached
    with _file_lock(path + ".lock") as waited:
        if waited:   # another run held the lock: it has probably just written the cache
            cached = _load_sft_cache(path, key, cfg, device, steps)
            if cached is not None:
                return cached
        _remove_stale_temporaries(sft_dir)
        model, info = _train_sft(task, device, seed, steps, cfg, quiet)
        try:
            os.makedirs(sft_dir, exist_ok=True)
            atomic_torch_save({"key": key, "model": model.state_dict(), "info": info}, path)
        except OSError as e:   # read-only folder, full disk: the model just trained is still good
            print(f"note: could not write the SFT cache {path} ({_os_reason(e)}); going on with the model "
                  f"just trained (the next run will train it again)", file=sys.stderr)
    return model, dict(info, cached=False, path=path)


def sft_cache_path(task, device, sft_dir, seed, steps, cfg):
    """Where the SFT model of these settings is cached, and the key stored in the file.
    Everything that determines the weights goes into the key (the device too, down to the GPU model:
    CPU and CUDA kernels round differently, and "same seed, same device, same numbers" is the promise).
    The demonstrations enter as a digest of the tensors themselves, so runs that differ only in how the
    preference pairs are made (--length-bias, --pair-style, --tau) share one SFT model, as they should."""
    demos = hashlib.sha256()
    for t in (task.sft_ids, task.sft_mask, task.sft_heldout_ids, task.sft_heldout_mask):
        demos.update(t.cpu().numpy().tobytes())
    key = {"version": 1, "demos": demos.hexdigest(), "model": asdict(cfg), "seed": seed, "steps": steps,
           "batch_size": SFT_BATCH_SIZE, "lr": SFT_LR, "device": device_name(device)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(sft_dir, f"sft-{digest}.pt"), key


def _load_sft_cache(path, key, cfg, device, steps):
    """(model, info) from the cache file at `path`, or None, with a one-line note saying why not."""
    if not os.path.exists(path):
        print(f"note: no SFT cache at {path}; training the SFT model ({steps} steps, once)", file=sys.stderr)
        return None
    try:
        with warnings.catch_warnings():   # torch warns about some foreign files before failing on them
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        print(f"note: SFT cache {path} is {describe_bad_file(path, e)}; rebuilding it", file=sys.stderr)
        return None
    if not (isinstance(ckpt, dict) and {"key", "model", "info"} <= set(ckpt)):
        print(f"note: SFT cache {path} is not an SFT cache of this project; rebuilding it", file=sys.stderr)
        return None
    if ckpt["key"] != key:
        print(f"note: SFT cache {path} was made with other settings (its key differs); rebuilding it",
              file=sys.stderr)
        return None
    try:
        model = GPT(cfg).to(device)
        model.load_state_dict(ckpt["model"])
    except Exception:
        print(f"note: SFT cache {path} holds weights of another shape; rebuilding it", file=sys.stderr)
        return None
    model.eval()
    return model, dict(ckpt["info"], cached=True, path=path)


def _train_sft(task, device, seed, steps, cfg, quiet):
    """Cross-entropy on the response tokens of the demonstrations, AdamW with warm-up and a cosine decay."""
    torch.manual_seed(seed)
    model = GPT(cfg).to(device)
    ids, mask = task.sft_ids.to(device), task.sft_mask.to(device)
    held_ids, held_mask = task.sft_heldout_ids.to(device), task.sft_heldout_mask.to(device)
    ce_before = sft_ce(model, held_ids, held_mask)
    opt = torch.optim.AdamW(model.parameters(), lr=SFT_LR, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)          # batch order: CPU generator, same on every device
    t0 = time.time()
    model.train()
    progress.phase = "SFT training"
    bar = tqdm(range(steps), desc="SFT", disable=True if quiet else None, leave=False, dynamic_ncols=True)
    for step in bar:
        lr = SFT_LR * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))  # warmup, cosine
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, ids.shape[0], (SFT_BATCH_SIZE,), generator=g).to(device)
        b_ids, b_mask = trim(ids[idx], mask[idx])
        logps, lengths = sequence_logps(model, b_ids, b_mask)
        loss = -logps.sum() / lengths.sum()           # cross-entropy per response token
        check_loss(loss, step, steps, phase="SFT training")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    info = {"ce_before": ce_before, "ce_after": sft_ce(model, held_ids, held_mask),
            "seconds": time.time() - t0, "steps": steps}
    return model, info


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
# 5. The run contract: flags, device, output folder, files, faults, timing and memory
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


def bounded_int(low, high):
    """A whole number in [low, high]: sizes that cannot fit are refused before any work, with the bound."""
    return _number(int, lambda v: low <= v <= high, f"a whole number from {low} to {high}")


positive_float = _number(float, lambda v: v > 0, "a number > 0")
nonneg_float = _number(float, lambda v: v >= 0, "a number >= 0")
positive_int = _number(int, lambda v: v > 0, "a whole number > 0")
nonneg_int = _number(int, lambda v: v >= 0, "a whole number >= 0")
probability = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")

# Upper bounds of the size flags. Batches and samples beyond these need gigabytes for a toy whose data
# holds 4000 pairs and 72 held-out prompts; seeds are 32-bit so that every seed derived from one (the
# evaluation adds 10,000) still fits torch's generators.
MAX_SEED = 2**32 - 1
MAX_BATCH_SIZE = 4096
MAX_EVAL_SAMPLES = 65536
MAX_LAYERS, MAX_HEADS, MAX_EMBD = 48, 64, 2048


def add_run_args(parser, method, steps, batch_size, lr, steps_help=None):
    """The flags every method script shares (the run contract), with each script's own defaults.
    steps=None leaves the default to the script (sppo.py: it depends on --variant; say so in steps_help)."""
    g = parser.add_argument_group("run")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where to run; auto = cuda, then mps, then cpu (default: %(default)s)")
    g.add_argument("--seed", type=bounded_int(0, MAX_SEED), default=0,
                   help="seeds data, SFT, batches and sampling; same seed + same device = same numbers")
    g.add_argument("--out", default=f"out/{method}",
                   help="folder for metrics.json, log.jsonl and model.pt (default: %(default)s)")
    g.add_argument("--sft-dir", default="out/sft",
                   help="cache of SFT models, shared by all methods and runs (a read-only one is read); "
                        "delete it to retrain (default: %(default)s)")
    g.add_argument("--sft-steps", type=positive_int, default=300,
                   help="SFT steps for the warm start (more: a sharper start, slower first run)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=nonneg_int, default=steps,
                   help=steps_help or "optimiser steps (more: further from the start; 0 evaluates the SFT model)")
    g.add_argument("--batch-size", type=bounded_int(1, MAX_BATCH_SIZE), default=batch_size,
                   help="examples per step (larger: smoother, slower steps)")
    g.add_argument("--lr", type=positive_float, default=lr,
                   help="Adam learning rate (higher: faster, until the loss jumps or turns NaN)")
    g.add_argument("--eval-samples", type=bounded_int(1, MAX_EVAL_SAMPLES), default=512,
                   help="held-out samples per policy in the evaluation (more: less noise, slower)")
    g = parser.add_argument_group("model size (the SFT model and every policy; the default is the 0.1 M-parameter GPT)")
    g.add_argument("--n-layer", type=bounded_int(1, MAX_LAYERS), default=GPTConfig.n_layer,
                   help="transformer blocks (default: %(default)s)")
    g.add_argument("--n-head", type=bounded_int(1, MAX_HEADS), default=GPTConfig.n_head,
                   help="attention heads per block; must divide --n-embd (default: %(default)s)")
    g.add_argument("--n-embd", type=bounded_int(8, MAX_EMBD), default=GPTConfig.n_embd,
                   help="width of the residual stream (default: %(default)s)")
    return parser


def model_config(args):
    """The GPTConfig the size flags ask for (a bad combination is refused before any work)."""
    if args.n_embd % args.n_head:
        fail(f"--n-embd ({args.n_embd}) must be a multiple of --n-head ({args.n_head})")
    return GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)


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
    if name == "cuda":
        make_cuda_deterministic()
    print(f"device: {name}" + (f" ({torch.cuda.get_device_name()})" if name == "cuda" else ""))
    return torch.device(name)


def make_cuda_deterministic():
    """Same seed, same GPU, same numbers (PyTorch's "Reproducibility" notes). cuBLAS needs a fixed
    workspace (the environment variable, read when cuBLAS starts: before the first matmul); the
    flash and memory-efficient attention kernels accumulate gradients with atomic adds in no fixed order,
    so attention runs on the plain "math" kernel, which at 22 tokens costs nothing; every other op takes
    its deterministic implementation. warn_only: an op with none warns instead of stopping the run."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)


def device_name(device):
    """The device as the SFT cache key names it: "cpu", "mps", or "cuda:" and the GPU model (two GPU
    models round differently, so they must not share a cache)."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


# --- Faults: one line and an exit code, never a traceback ---------------------------------------------

class Progress:
    """How far the run has got, for the one-line messages of a fault (Ctrl-C, divergence, disk full)."""
    out = None          # the run's output folder
    phase = "setup"     # setup, SFT training, training, evaluation, saving, saved
    step = None         # the last step started in the current phase
    total = None        # steps in the current phase
    lr = None           # the run's --lr, for the hint of a diverged run

    def reset(self, out, lr=None):
        self.out, self.phase, self.step, self.total, self.lr = out, "setup", None, None, lr


progress = Progress()


class Diverged(Exception):
    pass


def check_loss(loss, step, total=None, phase="training"):
    """Every step: record where the run is (for Ctrl-C's message) and stop at a non-finite loss, before
    the optimiser spreads NaN into the weights and long before evaluation would crash on them."""
    progress.phase, progress.step, progress.total = phase, step, total
    value = float(loss.detach())
    if not math.isfinite(value):
        raise Diverged(f"the loss is {value} at step {step}{f' of {total}' if total else ''} ({phase}): "
                       f"the run diverged")


def check_weights(model):
    """After training: a last optimiser step can still have made a weight non-finite."""
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise Diverged("a weight is not finite after the last training step: the run diverged")


def run(main):
    """Run a script's main() so that every fault ends in one line on stderr and a non-zero exit:
    1 a fault of the run (diverged, out of memory, disk full), 2 bad input, 130 Ctrl-C.
    Output problems never stop a run: a reader that leaves (`python simpo.py | head -3`) silences the
    rest of the output, and a terminal that cannot show a character gets a '?' (the charts switch to
    ASCII by themselves, data.chart_glyphs)."""
    stdout = sys.stdout
    if hasattr(stdout, "reconfigure") and (stdout.encoding or "").lower().replace("-", "") not in ("utf8", "utf16", "utf32"):
        stdout.reconfigure(errors="replace")
    sys.stdout = _PipeSafe(stdout)
    try:
        main()
    except KeyboardInterrupt:
        where = _where()
        if progress.phase == "saved":
            print(f"interrupted {where}; the run was saved in {progress.out}", file=sys.stderr)
        else:
            print(f"interrupted {where}; {untouched_now()}", file=sys.stderr)
        sys.exit(130)
    except Diverged as e:
        if progress.phase == "SFT training":   # its learning rate is fixed (SFT_LR): the model size is the knob
            hint = "try a smaller model (--n-layer, --n-embd) or another --seed"
        else:
            hint = (f"lower the learning rate (--lr is {progress.lr:g}; try {progress.lr / 10:g})"
                    if progress.lr else "lower the learning rate (--lr)")
        print(f"error: {e}; {hint}; nothing was saved, {untouched_now()}", file=sys.stderr)
        sys.exit(1)
    except (torch.OutOfMemoryError, MemoryError) as e:
        print(f"error: out of memory {_where()} ({type(e).__name__}); lower --batch-size, --eval-samples or the "
              f"model size; {untouched_now()}", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as e:   # the CPU allocator reports a failed allocation as a RuntimeError
        if "can't allocate memory" not in str(e) and "out of memory" not in str(e):
            raise
        print(f"error: out of memory {_where()}; lower --batch-size, --eval-samples or the model size; "
              f"{untouched_now()}", file=sys.stderr)
        sys.exit(1)
    finally:
        sys.stdout = stdout


class _PipeSafe:
    """sys.stdout, except that a closed pipe silences it instead of raising BrokenPipeError mid-run."""

    def __init__(self, stream):
        self.stream, self.broken = stream, False

    def write(self, text):
        if not self.broken:
            try:
                return self.stream.write(text)
            except BrokenPipeError:
                self._silence()
        return len(text)

    def flush(self):
        if not self.broken:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._silence()

    def _silence(self):
        self.broken = True
        try:   # Python flushes stdout once more at exit: point its descriptor at /dev/null first
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
        except (OSError, ValueError):
            pass

    def __getattr__(self, name):   # encoding, isatty, fileno...: the real stream's
        return getattr(self.stream, name)


def untouched_now():
    return f"previous results in {progress.out or 'the output folder'} untouched"


def _where():
    if progress.step is None:
        return f"during {progress.phase}"
    if progress.phase.startswith("training") or progress.phase == "SFT training":
        of = f" of {progress.total}" if progress.total else ""
        return f"at step {progress.step}{of} ({progress.phase})"
    return f"during {progress.phase}, after {progress.step + 1} training steps"


# --- Files: a run is saved whole or not at all --------------------------------------------------------

RUN_FILES = ("metrics.json", "log.jsonl", "model.pt")   # what a run leaves in its folder
STAGING = ".incoming"                                    # the next run's files, until they are all written


def prepare_out_dir(path):
    """Create the output folder and prove it writable before any training starts; finish or undo a save
    that a killed process left halfway (see save_files)."""
    try:
        os.makedirs(path, exist_ok=True)
        recover_out_dir(path)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        fail(f"cannot write to output folder {path!r}: {_os_reason(e)}")


def save_run(out_dir, model, args, metrics, log_rows):
    """metrics.json (flat), log.jsonl (one line per logged step) and model.pt (plain types only), saved
    together: after any fault the folder holds the previous run's three files or this run's three.
    model=None (a run with no GPT to save) removes a previous run's model.pt with the rest."""
    files = {"metrics.json": (json.dumps(metrics, indent=2) + "\n").encode(),
             "log.jsonl": "".join(json.dumps(r) + "\n" for r in log_rows).encode()}
    if model is not None:
        plain_args = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                      for k, v in vars(args).items()}
        files["model.pt"] = torch_bytes({"model": model.state_dict(), "config": asdict(model.config),
                                         "args": plain_args})
    save_files(out_dir, files)


def save_files(out_dir, files):
    """Replace a run's files in `out_dir` as one set. A two-phase commit:
      1. write every new file into out_dir/.incoming/ (a full disk or Ctrl-C here: .incoming is removed,
         the previous files were never touched);
      2. write .incoming/COMMIT, the list of what to move in and what to remove: from this moment the
         save is decided;
      3. move each file into place (os.replace, atomic per file; Ctrl-C waits until this is done), remove
         the RUN_FILES the new run does not have, and remove .incoming.
    A process killed in 3 leaves COMMIT behind, and the next prepare_out_dir finishes the moves; killed
    before, it leaves no COMMIT, and .incoming is discarded. No temporary file outlives either."""
    progress.phase = "saving"
    staging = os.path.join(out_dir, STAGING)
    current = None
    try:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        for name, content in files.items():
            current = os.path.join(out_dir, name)
            _write_durably(os.path.join(staging, name), content)
        current = os.path.join(staging, "COMMIT")
        plan = {"move": sorted(files), "remove": [f for f in RUN_FILES if f not in files]}
        _write_durably(current + ".part", json.dumps(plan).encode())
        os.replace(current + ".part", current)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):
            if e.errno == errno.ENOSPC:
                fail(f"no space left on device writing {current}; nothing was saved, {untouched_now()}", 1)
            fail(f"cannot write {current} ({_os_reason(e)}); nothing was saved, {untouched_now()}", 1)
        raise
    with _sigint_deferred():
        _finish_commit(out_dir)
        progress.phase = "saved"


def recover_out_dir(out_dir):
    """Finish a save that reached its COMMIT, discard one that did not, and remove the temporary files
    of older versions of this project (NAME.tmp-PID)."""
    staging = os.path.join(out_dir, STAGING)
    if os.path.isdir(staging):
        if os.path.exists(os.path.join(staging, "COMMIT")):
            _finish_commit(out_dir)
            print(f"note: finished saving the run in {out_dir} that was interrupted while its files were "
                  f"being moved into place", file=sys.stderr)
        else:
            shutil.rmtree(staging)
            print(f"note: removed the unfinished save of an interrupted run in {out_dir}; the files "
                  f"beside it are the previous run's, whole", file=sys.stderr)
    _remove_stale_temporaries(out_dir)


def _finish_commit(out_dir):
    staging = os.path.join(out_dir, STAGING)
    with open(os.path.join(staging, "COMMIT")) as f:
        plan = json.load(f)
    for name in plan["move"]:
        if os.path.exists(os.path.join(staging, name)):   # a resumed commit: some are moved already
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    for name in plan["remove"]:
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    shutil.rmtree(staging)


class _sigint_deferred:
    """Ctrl-C inside this block is held back until its end (the block only renames files: milliseconds)."""

    def __enter__(self):
        self.caught, self.previous = False, None
        try:
            self.previous = signal.signal(signal.SIGINT, self._hold)
        except ValueError:   # not the main thread: signals cannot be caught here anyway
            pass
        return self

    def _hold(self, *_):
        self.caught = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        if self.caught and exc[0] is None:
            raise KeyboardInterrupt
        return False


def _write_durably(path, content):
    with open(path, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())


def torch_bytes(obj):
    """torch.save into memory: the file is then written by Python, whose errors (a full disk) are plain
    OSErrors with an errno, where torch's own writer reports them as an opaque RuntimeError."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _atomic(path, write):
    """Write one file under a temporary name beside it, then rename: readers see the old or the new."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_torch_save(obj, path):
    content = torch_bytes(obj)
    _atomic(path, lambda tmp: _write_durably(tmp, content))


def _remove_stale_temporaries(folder):
    """Temporary files (NAME.tmp-PID, .NAME.tmp-PID) of processes that no longer run: a killed process
    cannot clean up after itself, so the next one to use the folder does."""
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        pid = name.rpartition(".tmp-")[2]
        if ".tmp-" in name and pid.isdigit() and not _pid_alive(int(pid)):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def _pid_alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class _file_lock:
    """with _file_lock(path) as waited: an exclusive lock on `path` (fcntl.flock), so that runs sharing an
    SFT cache folder train each model once. `waited` is True when another process held the lock first.
    The holder deletes the lock file before it lets go, so none stays behind; a waiter that then wakes up
    holding the lock of a deleted file sees that the path no longer names its file, and tries again.
    Where no lock can be taken (a read-only folder, no fcntl on Windows) the block runs unlocked."""

    def __init__(self, path):
        self.path, self.fd = path, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return False
        waited = False
        while True:
            try:
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError:
                return waited
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                if not waited:
                    print(f"note: another run is training this SFT model (lock {self.path}); waiting for it",
                          file=sys.stderr)
                waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except OSError:
                same = False
            if same:
                self.fd = fd
                return waited
            os.close(fd)   # the holder deleted that file as it finished: lock the path's new file

    def __exit__(self, *exc):
        if self.fd is not None:
            try:
                os.remove(self.path)
            except OSError:
                pass
            os.close(self.fd)   # releases the lock
        return False


def _os_reason(e):
    if e.errno == errno.ENOSPC:
        return "no space left on device"
    return e.strerror or str(e)


def describe_bad_file(path, error):
    """Why torch.load failed on `path`, in words (torch's own message is a paragraph about weights_only)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"unreadable ({_os_reason(e)})"
    if not head:
        return "empty"
    if head != b"PK\x03\x04":   # torch.save writes a zip archive
        return "not a PyTorch file (unreadable or corrupt)"
    if "central directory" in str(error) or isinstance(error, EOFError):
        return "truncated (an interrupted copy or a full disk?)"
    if "weights_only" in str(error) or "Unpickl" in type(error).__name__:
        return "not a file of this project (it holds Python objects, not only tensors and plain values)"
    return f"unreadable ({type(error).__name__})"


def load_checkpoint(path, device="cpu"):
    """Load a model.pt written by save_run; a missing, corrupt or foreign file is a clear error."""
    if not os.path.isfile(path):
        fail(f"cannot load checkpoint {path!r}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        fail(f"cannot load checkpoint {path!r}: {describe_bad_file(path, e)}")
    try:
        model = GPT(GPTConfig(**ckpt["config"])).to(device)
        model.load_state_dict(ckpt["model"])
        args = ckpt["args"]
    except Exception:
        fail(f"cannot load checkpoint {path!r}: not a model.pt of this project (written by save_run)")
    model.eval()
    return model, args


class MemoryMeter:
    """Peak memory of training, in MB, comparable between methods on the same device.

    Every method starts the meter at the same point: the SFT model is on the device and nothing of the
    method exists yet (no reference copy, no optimiser). Training ends with pause(), before any
    evaluation (SPPO calls resume() after each iteration's evaluation), so evaluation never counts.
    CUDA: torch.cuda.max_memory_allocated since start(). CPU (glibc): the peak of live heap bytes
    (mallinfo2) above the level at start(), sampled after each forward and each backward, where a step
    holds the most. Elsewhere (macOS): the process's peak resident set (ru_maxrss: bytes on macOS,
    kilobytes on Linux), a coarse upper bound.
    A process keeps some memory for good after its first training step: the optimiser's first step
    imports parts of torch lazily (about 22 MB of Python objects), and the first forward and backward
    passes of a shape leave the math library's buffers (about 3 MB). A run that trained its SFT model has
    paid for both before start(); one that loaded it from the cache would pay during training, and the
    two would differ by 25 MB. So start(warm_up=policy) first runs one forward and backward pass of the
    policy on a dummy batch (its gradients are then dropped) and one Adam step on a throwaway tensor:
    the weights and every random number are untouched, and the number is the same for a first run and
    a cached one: what training adds.
    """

    def __init__(self, device):
        self.device = device
        self.base = 0
        self.peak = 0
        self.stopped = False
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
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if sys.platform == "darwin" else maxrss * 1024   # macOS: bytes; Linux: kilobytes

    def start(self, warm_up=None):
        if warm_up is not None:
            _warm_up(warm_up)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.base = self._now()
        self.peak = self.base
        self.stopped = False
        return self

    def sample(self):
        if self.stopped:
            return
        if self.device.type == "cuda":
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
        else:
            self.peak = max(self.peak, self._now())

    def pause(self):
        """Training stops here (for good, or for an evaluation between self-play iterations): calls to
        sample() no longer count until resume()."""
        self.sample()
        self.stopped = True

    def resume(self):
        if self.device.type == "cuda":   # the CUDA peak restarts from what is allocated now
            torch.cuda.reset_peak_memory_stats(self.device)
        self.stopped = False

    def peak_mb(self):
        self.sample()
        return (self.peak - self.base) / 2**20


def _warm_up(model):
    """What a process keeps after its first training step, paid now: a forward and backward pass of
    `model` on a dummy batch as large as a default training step (2 x 64 full-width sequences), its
    gradients dropped, and one Adam step on a throwaway tensor (the optimiser's lazy imports)."""
    device = next(model.parameters()).device
    ids = torch.ones(2 * SFT_BATCH_SIZE, model.config.block_size, dtype=torch.long, device=device)
    logps, _ = sequence_logps(model, ids, torch.ones_like(ids))
    logps.sum().backward()
    model.zero_grad(set_to_none=True)
    throwaway = torch.zeros(1, requires_grad=True)
    throwaway.sum().backward()
    torch.optim.Adam([throwaway]).step()


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
