"""
data.py: the toy preference task, its judge, and how a run is evaluated.

A miniature of the DPO paper's controlled-sentiment experiment (arXiv 2305.18290, section 6.1): there a
GPT-2 continues the prefix of a movie review and a sentiment classifier is the ground-truth reward. Here
the prompt names a film ("new horror film"), the response is a short review of 3 to 16 words drawn from
a word-level vocabulary, and a program is the judge, so every effect of a method shows up in numbers.

One worked example (these numbers are what the functions below return):

    prompt          "classic comedy film"
    response a      "the acting was great and the music superb <eos>"   8 words: 2 positive, 0 negative
    response b      "a dull plot but lovely cast <eos>"                 6 words: 1 positive, 1 negative
    score(a)        = (2 - 0) / 8 = 0.25          the ground-truth reward: an AVERAGE per word, so
    score(b)        = (1 - 1) / 6 = 0.0           padding a review with words never raises it
    P(a > b | x)    = sigmoid((0.25 - 0.0) / tau) = sigmoid(1.25) = 0.777   (tau = 0.2)

The preference oracle is Bradley-Terry (a preference is a logistic function of a reward difference) on the
hidden score: P(y > y' | x) = sigmoid((s(y) - s(y')) / tau). It labels the offline pairs (by sampling, so
some labels are "wrong", as with human raters), and it is the P that SPPO's self-play asks. The prompt sets
the topic only: the judge ignores it, and so do the demonstrations (any prompt gets the same kind of review).

Two knobs build the conditions of the SimPO write-up's claims (off by default):
    length_bias  the raters favour the longer review: P(a chosen) = sigmoid((s_a - s_b)/tau + length_bias (|a| - |b|))
    pair_style   the pairs are written in another style: each pair response swaps a random fraction
                 (up to pair_style) of its neutral words for archaic ones ("verily", "forsooth") that the
                 SFT data never uses. The judge ignores style; the likelihood does not.
And two for checking what the objectives converge to: --judge cyclic, three "schools" of reviews that beat
each other in a circle, and ExactTask, 27 listed reviews on which every expectation is a finite sum.
"""

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from model import (TablePolicy, fail, model_config, number, pair_logps, pick_device, positive_float, prepare_out_dir,
                   progress, run, sample, save_files, sequence_logps_all, sft_model, trim)

# --- Vocabulary and tokenizer -------------------------------------------------------------------------------

PAD, BOS, SEP, EOS = "<pad>", "<bos>", "<sep>", "<eos>"
DECADES = "new old classic recent cult modern".split()                               # prompt word 1
GENRES = "horror comedy drama western thriller musical romance sci-fi war family".split()   # prompt word 2
NOUNS = "film movie sequel remake series documentary".split()                          # prompt word 3
POSITIVE = ("good great excellent wonderful superb brilliant lovely delightful moving charming fun "
            "beautiful amazing fantastic clever enjoyable").split()
NEGATIVE = ("bad awful terrible boring dull poor weak messy tedious bland clumsy lazy painful annoying "
            "dreadful forgettable").split()
NEUTRAL = ("the a and it was is this with its very quite rather really so but plot acting cast scenes "
           "ending music script story characters").split()
STYLE = "verily forsooth thus indeed whilst hath thee mayhap".split()   # score-neutral, absent from SFT data

VOCAB = [PAD, BOS, SEP, EOS] + DECADES + GENRES + NOUNS + POSITIVE + NEGATIVE + NEUTRAL + STYLE
STOI = {w: i for i, w in enumerate(VOCAB)}
PAD_ID, BOS_ID, SEP_ID, EOS_ID = 0, 1, 2, 3
PROMPT_LEN = 5            # BOS w1 w2 w3 SEP
MAX_WORDS = 16            # responses are 3..16 words, then EOS
MAX_RESPONSE = MAX_WORDS + 1
BANNED_IN_RESPONSE = (PAD_ID, BOS_ID, SEP_ID)  # a sampler never draws these

_ids = lambda words: np.array([STOI[w] for w in words])
POS_IDS, NEG_IDS, NEU_IDS, STYLE_IDS = _ids(POSITIVE), _ids(NEGATIVE), _ids(NEUTRAL), _ids(STYLE)
WORD_VALUE = torch.zeros(len(VOCAB))           # what each token adds to the score: +1, -1 or 0
WORD_VALUE[torch.as_tensor(POS_IDS)] = 1.0
WORD_VALUE[torch.as_tensor(NEG_IDS)] = -1.0


def encode(text):
    return [STOI[w] for w in text.split()]


def decode(ids):
    """Token ids -> words, stopping at EOS and skipping padding and markers."""
    words = []
    for i in (ids.tolist() if torch.is_tensor(ids) else ids):
        if i == EOS_ID:
            break
        if i not in (PAD_ID, BOS_ID, SEP_ID):
            words.append(VOCAB[i])
    return " ".join(words)


# --- The judge: the hidden score, and the preferences every method meets ------------------------------------

def score_responses(responses):
    """Hidden ground-truth reward of each response [N, L] (token ids, EOS then PAD): the mean word
    value, (#positive - #negative) / #words, in [-1, 1]. An empty review scores -1."""
    responses = torch.as_tensor(responses).cpu()
    is_word = (responses != PAD_ID) & (responses != EOS_ID)
    n_words = is_word.sum(-1)
    total = (WORD_VALUE[responses] * is_word).sum(-1)
    return torch.where(n_words > 0, total / n_words.clamp(min=1), torch.full_like(total, -1.0))


def response_lengths(responses):
    """Number of words (EOS not counted) in each response [N, L]."""
    responses = torch.as_tensor(responses).cpu()
    return ((responses != PAD_ID) & (responses != EOS_ID)).sum(-1)


def score(prompt, response):
    """score(x, y) for text: the prompt sets the topic and does not change the score."""
    return score_responses(torch.tensor([encode(response) + [EOS_ID]]))[0].item()


def oracle(prompt, response_a, response_b, tau=0.2):
    """P(a > b | x) for text, as in the worked example above: judge_prob (below) of the two reviews."""
    a, b = (torch.tensor([encode(response) + [EOS_ID]]) for response in (response_a, response_b))
    return judge_prob(a, b, TaskConfig(tau=tau), dtype=torch.float64).item()


# A second judge, --judge cyclic: preferences that go round in a circle. Bradley-Terry gives every review one
# number and prefers the larger, so its preferences order the reviews in a line. Real raters need not. Here
# three "schools" of critics, told apart by the nouns a review talks about, beat each other round a circle,
# like rock-paper-scissors: story beats acting, acting beats craft, craft beats story, each with probability
# cycle_prob (0.9), and a review in no school loses to one in any school as often. No reward can say this
# (it would need r(story) > r(acting) > r(craft) > r(story)). Within a school the judge calls a tie, so the
# game is rock-paper-scissors on the school shares, and its Nash equilibrium (a policy that no other beats
# more than half the time) is known: one third each. The nouns are the task's own NEUTRAL ones: no score changes.

SCHOOLS = ("story", "acting", "craft")                  # school i beats school (i + 1) % 3
SCHOOL_WORDS = ("plot story ending", "acting cast characters", "music scenes script")
NO_SCHOOL = -1
SCHOOL_CATEGORIES = (0, 1, 2, NO_SCHOOL)   # story, acting, craft, none: every review falls in exactly one
_SCHOOL_OF_TOKEN = torch.full((len(VOCAB),), NO_SCHOOL, dtype=torch.long)
for _i, _words in enumerate(SCHOOL_WORDS):
    _SCHOOL_OF_TOKEN[torch.as_tensor(_ids(_words.split()))] = _i


def school_of(responses):
    """The school of each response [..., L]: the one whose nouns it uses most; NO_SCHOOL (-1) if it uses
    none, or two schools' nouns equally often. Returns [...] (long)."""
    school = _SCHOOL_OF_TOKEN[torch.as_tensor(responses).cpu()]                 # [..., L]
    counts = torch.stack([(school == i).sum(-1) for i in range(len(SCHOOLS))], dim=-1)   # [..., 3]
    top = counts.max(-1)
    clear = (top.values > 0) & ((counts == top.values[..., None]).sum(-1) == 1)
    return torch.where(clear, top.indices, torch.full_like(top.indices, NO_SCHOOL))


def cyclic_preference_prob(school_a, school_b, cycle_prob=0.9):
    """The cyclic oracle P(a > b | x) from the schools of a and b (tensors that broadcast), float64:
    cycle_prob when a's school beats b's (i beats (i + 1) % 3, or a has a school and b none),
    1 - cycle_prob the other way round, 1/2 within a school. P(a > b) + P(b > a) = 1 exactly."""
    school_a, school_b = torch.as_tensor(school_a), torch.as_tensor(school_b)
    has_a, has_b = school_a >= 0, school_b >= 0
    a_beats_b = (has_a & has_b & (school_b == (school_a + 1) % 3)) | (has_a & ~has_b)
    b_beats_a = (has_a & has_b & (school_a == (school_b + 1) % 3)) | (has_b & ~has_a)
    half = torch.tensor(0.5, dtype=torch.float64)
    return torch.where(a_beats_b, cycle_prob, torch.where(b_beats_a, 1.0 - cycle_prob, half))


def judge_prob(responses_a, responses_b, config, length_bias=0.0, dtype=torch.float32):
    """P(a > b | x) under the task's judge, for response token tensors [..., L] that broadcast: every
    preference of every method (the pairs' labels, the evaluation, self-play, the exact mode) is this one.
    'bt': sigmoid((s_a - s_b)/tau + length_bias (|a| - |b|)) (the raters' length bias is for the pairs
    alone: the evaluation judges quality); 'cyclic': cyclic_preference_prob of the two schools. In `dtype`:
    float32 on the GPT's samples, float64 for the exact mode's minimisers."""
    if config.judge == "cyclic":
        return cyclic_preference_prob(school_of(responses_a), school_of(responses_b), config.cycle_prob).to(dtype)
    logit = (score_responses(responses_a).to(dtype) - score_responses(responses_b).to(dtype)) / config.tau
    words = (response_lengths(responses_a) - response_lengths(responses_b)).to(dtype)
    return torch.sigmoid(logit + length_bias * words)


def exploitability(policy_probs, prefs):
    """max_y P(y > pi) - 1/2, with P(y > pi) = sum_y' P(y > y') pi(y'), for policy_probs [C] and prefs [C, C]
    (prefs[y, y'] = P(y > y')). As P(y > y') + P(y' > y) = 1, pi ties with itself, so the best reply wins at least
    half the time: exploitability >= 0, and 0 exactly at a Nash equilibrium [SPPO-1].                    [Nash]"""
    policy_probs = torch.as_tensor(policy_probs, dtype=torch.float64)
    return (torch.as_tensor(prefs, dtype=torch.float64) @ policy_probs).max().item() - 0.5


def school_shares(responses):
    """The share of each of SCHOOL_CATEGORIES among responses [N, L]: [4] float64 (story, acting, craft, none)."""
    schools = school_of(responses)
    return torch.tensor([(schools == c).double().mean().item() for c in SCHOOL_CATEGORIES], dtype=torch.float64)


def school_exploitability(shares, cycle_prob=0.9):
    """Exploitability of a policy known by its school shares [4]: a review's chance to beat the policy
    depends on its school alone, so the best reply is one of the four categories."""
    cats = torch.tensor(SCHOOL_CATEGORIES)
    return exploitability(shares, cyclic_preference_prob(cats[:, None], cats[None, :], cycle_prob))


# --- The task: prompts, SFT demonstrations, preference pairs ------------------------------------------------

@dataclass
class TaskConfig:
    tau: float = 0.2               # oracle temperature: smaller = sharper, less noisy labels
    sentiment_rate: float = 0.5    # share of sentiment words in SFT-like reviews (the rest neutral)
    n_demos: int = 6000            # SFT demonstrations (train prompts)
    n_pairs: int = 4000            # training preference pairs
    n_heldout: int = 512           # held-out demonstrations and held-out pairs, each
    heldout_fraction: float = 0.2  # share of the 360 prompts kept for evaluation
    length_bias: float = 0.0       # > 0: raters prefer the longer review beyond what the score warrants
    pair_style: float = 0.0        # > 0: pair reviews use a foreign style (see the module docstring)
    judge: str = "bt"              # "bt": Bradley-Terry on the score; "cyclic": the schools' circle (--judge)
    cycle_prob: float = 0.9        # cyclic judge: how often a school's review beats the next school's
    school_shares: tuple = (0.6, 0.3, 0.1)   # cyclic judge: the schools' shares in the SFT data and the pairs
    pair_schools: str = "sft"      # cyclic judge: "sft", pairs in the SFT shares; "uniform", one third each


def _random_responses(rng, n, sentiment_rate, style_rate):
    """n SFT-like reviews [n, MAX_RESPONSE] of every quality: each draws its own propensity p ~ U(0, 1); each
    word is a sentiment word with probability sentiment_rate, positive with probability p; else neutral, and a
    neutral word is a style word with probability style_rate (a scalar or one rate per review)."""
    lengths = rng.integers(3, MAX_WORDS + 1, size=n)
    p = rng.random((n, 1))
    sentiment = rng.random((n, MAX_WORDS)) < sentiment_rate
    positive = rng.random((n, MAX_WORDS)) < p
    style = rng.random((n, MAX_WORDS)) < np.broadcast_to(np.asarray(style_rate, dtype=float).reshape(-1, 1), (n, 1))
    words = np.where(sentiment,
                     np.where(positive, rng.choice(POS_IDS, (n, MAX_WORDS)), rng.choice(NEG_IDS, (n, MAX_WORDS))),
                     np.where(style, rng.choice(STYLE_IDS, (n, MAX_WORDS)), rng.choice(NEU_IDS, (n, MAX_WORDS))))
    out = np.full((n, MAX_RESPONSE), PAD_ID, dtype=np.int64)
    out[:, :MAX_WORDS] = np.where(np.arange(MAX_WORDS) < lengths[:, None], words, PAD_ID)
    out[np.arange(n), lengths] = EOS_ID
    return torch.from_numpy(out)


def _with_schools(rng, responses, shares):
    """--judge cyclic: give each review [n, L] a school, drawn with probabilities `shares`: every school noun it
    has becomes one of its school's nouns, and so does one word at random, so school_of gives the school drawn."""
    out = responses.numpy().copy()
    n, L = out.shape
    schools = rng.choice(len(SCHOOLS), size=n, p=np.asarray(shares, dtype=float) / sum(shares))
    nouns = np.stack([_ids(words.split()) for words in SCHOOL_WORDS])          # [3, 3]
    own = nouns[schools[:, None], rng.integers(0, nouns.shape[1], (n, L))]     # [n, L] a noun of each review's school
    out = np.where(np.isin(out, nouns), own, out)
    lengths = ((out != PAD_ID) & (out != EOS_ID)).sum(1)
    out[np.arange(n), rng.integers(0, lengths)] = own[:, 0]
    return torch.from_numpy(out)


def join(prompts, responses):
    """prompts [N, PROMPT_LEN] + responses [N, L] -> input_ids [N, PROMPT_LEN + L] and the response mask:
    1 on response tokens (EOS included), 0 on the prompt and on padding."""
    ids = torch.cat([prompts, responses], dim=1)
    mask = torch.zeros_like(ids)
    mask[:, prompts.shape[1]:] = (responses != PAD_ID).long()
    return ids, mask


class Task:
    """All data of one run, built once from (config, seed), as tensors on the CPU."""

    def __init__(self, config=None, seed=0):
        self.config = c = config or TaskConfig()
        rng = np.random.default_rng(seed)
        grid = np.array([[BOS_ID, STOI[d], STOI[g], STOI[n], SEP_ID] for d in DECADES for g in GENRES for n in NOUNS])
        order = rng.permutation(len(grid))
        n_held = int(round(len(grid) * c.heldout_fraction))
        self.heldout_prompts = torch.from_numpy(grid[np.sort(order[:n_held])])   # never seen in training
        self.train_prompts = torch.from_numpy(grid[np.sort(order[n_held:])])
        # SFT demonstrations: a broad mix of good and bad reviews, so the SFT model has room to improve;
        # under --judge cyclic each review also gets a school, in the unequal shares c.school_shares.
        prompts_for = lambda pool, n: pool[torch.from_numpy(rng.integers(0, len(pool), n))]
        demos = lambda n: self._schooled(rng, _random_responses(rng, n, c.sentiment_rate, 0.0))
        # (arguments are evaluated left to right: the prompts are drawn first, then the reviews)
        self.sft_ids, self.sft_mask = join(prompts_for(self.train_prompts, c.n_demos), demos(c.n_demos))
        self.sft_heldout_ids, self.sft_heldout_mask = join(prompts_for(self.heldout_prompts, c.n_heldout),
                                                           demos(c.n_heldout))
        self.pairs = self._make_pairs(rng, self.train_prompts, c.n_pairs)
        self.heldout_pairs = self._make_pairs(rng, self.heldout_prompts, c.n_heldout)

    def _schooled(self, rng, reviews, shares=None):
        """Under --judge cyclic each review gets a school (_with_schools), in `shares` or the SFT data's."""
        if self.config.judge != "cyclic":
            return reviews
        return _with_schools(rng, reviews, shares or self.config.school_shares)

    def _make_pairs(self, rng, pool, n):
        """n preference pairs (x, y_w, y_l): two SFT-like reviews of one prompt, labelled by SAMPLING the
        judge (so about one label in five goes against the score, like noisy raters)."""
        c = self.config
        prompts = pool[torch.from_numpy(rng.integers(0, len(pool), n))]
        style = [rng.random(n) * c.pair_style for _ in range(2)]   # each review's own share of style words
        raw = [_random_responses(rng, n, c.sentiment_rate, rate) for rate in style]
        a, b = (self._schooled(rng, r, None if c.pair_schools == "sft" else (1, 1, 1)) for r in raw)
        a_wins = torch.from_numpy(rng.random(n)) < judge_prob(a, b, c, c.length_bias, torch.float64)
        chosen, rejected = torch.where(a_wins[:, None], a, b), torch.where(a_wins[:, None], b, a)
        (chosen_ids, chosen_mask), (rejected_ids, rejected_mask) = join(prompts, chosen), join(prompts, rejected)
        return {"chosen_ids": chosen_ids, "chosen_mask": chosen_mask,
                "rejected_ids": rejected_ids, "rejected_mask": rejected_mask,
                "chosen_score": score_responses(chosen), "rejected_score": score_responses(rejected)}

    def eval_prompts(self, n):
        """n held-out prompts, cycling through all of them in a fixed order."""
        return self.heldout_prompts.repeat(math.ceil(n / len(self.heldout_prompts)), 1)[:n]


def add_task_args(parser):
    """The task's knobs as flags, shared by the three scripts; task_config(args) reads them back."""
    g = parser.add_argument_group("task (data.py)")
    g.add_argument("--tau", type=positive_float, default=TaskConfig.tau,
                   help="judge temperature: sigmoid((s_a - s_b)/tau); smaller, less label noise (default: %(default)s)")
    g.add_argument("--length-bias", type=number(float, lambda v: True, "a finite number"), default=0.0,
                   help="raters prefer longer reviews by this many logits per extra word (default: %(default)s)")
    g.add_argument("--pair-style", type=number(float, lambda v: 0 <= v <= 1, "a number from 0 to 1"), default=0.0,
                   help="0..1: pairs written in a foreign style the judge ignores (default: %(default)s)")
    g.add_argument("--judge", choices=["bt", "cyclic"], default=TaskConfig.judge,
                   help="bt: Bradley-Terry on the score; cyclic: three schools of critics that beat each other "
                        "in a circle, which no reward can represent (default: %(default)s)")
    g.add_argument("--pair-schools", choices=["sft", "uniform"], default=TaskConfig.pair_schools,
                   help="cyclic judge: the pairs' schools in the SFT shares, or one third each (default: %(default)s)")


def task_config(args):
    return TaskConfig(tau=args.tau, length_bias=args.length_bias, pair_style=args.pair_style, judge=args.judge,
                      pair_schools=args.pair_schools)


def start_run(args):
    """What every method script does first, in this order: the device, the flags no parser can check, the
    output folder (proved writable before any work), the task, and the SFT model, loaded or trained.
    Returns (device, task, policy, sft_info); `policy` is the SFT model, ready to be trained further."""
    device = pick_device(args.device)
    cfg = model_config(args)
    progress.lr = args.lr
    prepare_out_dir(args.out)
    if os.path.exists(args.sft_dir) and not os.path.isdir(args.sft_dir):   # a read-only one is fine: it is read
        fail(f"--sft-dir {args.sft_dir!r} is a file, not a folder")
    torch.manual_seed(args.seed)
    task = Task(task_config(args), seed=args.seed)
    policy, sft_info = sft_model(task, device, args.sft_dir, args.seed, args.sft_steps, cfg)
    print(f"SFT model (cache {sft_info['path']}): {'loaded' if sft_info['cached'] else 'trained'}; held-out "
          f"cross-entropy {sft_info['ce_before']:.3f} -> {sft_info['ce_after']:.3f} nats/token", file=sys.stderr)
    return device, task, policy, sft_info


def pair_batch(pairs, idx, device):
    """The pairs at positions idx, trimmed of all-padding columns and moved to device."""
    out = {}
    for side in ("chosen", "rejected"):
        ids, mask = trim(pairs[f"{side}_ids"][idx], pairs[f"{side}_mask"][idx])
        out[f"{side}_ids"], out[f"{side}_mask"] = ids.to(device), mask.to(device)
    return out


@torch.no_grad()
def pair_logps_all(model, pairs, device, batch_size=512):
    """model.pair_logps over a whole pair set (Task.pairs or .heldout_pairs), in batches, no gradients.
    Returns chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, each [N] on the CPU."""
    n = pairs["chosen_ids"].shape[0]
    parts = [pair_logps(model, **pair_batch(pairs, torch.arange(s, min(s + batch_size, n)), device))
             for s in range(0, n, batch_size)]
    return tuple(torch.cat([p[i] for p in parts]).cpu() for i in range(4))


# --- Evaluation: sample on held-out prompts and let the judge compare ---------------------------------------
#
# Every run samples one review per held-out prompt from the trained policy (seed 10,000 + --seed) and one
# from the SFT model (seed 10,001 + --seed), at temperature 1, and reports:
#     win_rate_vs_sft   mean P(policy's review > SFT's review | x) under the task's judge
#     score, length     the judge's score and the words of the policy's reviews (sft_score, sft_length: the SFT's)
#     kl_to_sft         KL(policy || SFT) = E_{y~policy}[log pi(y|x) - log pi_sft(y|x)], a Monte-Carlo mean over
#                       the policy's reviews (summed over response tokens): the x-axis of the DPO paper's figure 2
# and the SFT model measured the same way against itself (sft_win_rate_vs_sft: 1/2 up to the sampling noise it
# shows). The seeds are the evaluation's, not the method's, so every method meets the same SFT reviews.

def heldout_reviews(model, task, device, n_samples, seed):
    """One review per held-out prompt (n_samples of them, cycling), at temperature 1: (prompts, reviews)."""
    prompts = task.eval_prompts(n_samples).to(device)
    return prompts, sample(model, prompts, MAX_RESPONSE, EOS_ID, BANNED_IN_RESPONSE,
                           generator=torch.Generator(device).manual_seed(10_000 + seed))


def win_rate(responses, baseline_responses, config):
    return judge_prob(responses, baseline_responses, config).mean().item()


def evaluate_sft(sft, task, device, n_samples, seed):
    """The SFT side of the evaluation: its reviews, and its win rate against itself (two sets of reviews)."""
    progress.phase = "evaluation"
    prompts, own = heldout_reviews(sft, task, device, n_samples, seed)
    _, reviews = heldout_reviews(sft, task, device, n_samples, seed + 1)
    return {"sft_win_rate_vs_sft": win_rate(own, reviews, task.config), "sft_samples": reviews.cpu(),
            "sft_score": score_responses(reviews).mean().item(),
            "sft_length": response_lengths(reviews).float().mean().item(),
            **{f"sft_{k}": v for k, v in game(reviews, task.config).items()}}


def evaluate(policy, sft, sft_side, task, device, n_samples, seed):
    """The evaluation every run reports, against the SFT model's side (evaluate_sft). `sft` is the SFT model,
    or anything that maps input ids to its logits (simpo.py's: its own network with the SFT weights)."""
    progress.phase = "evaluation"
    prompts, samples = heldout_reviews(policy, task, device, n_samples, seed)
    ids, mask = join(prompts, samples)
    kl = sequence_logps_all(policy, ids, mask)[0] - sequence_logps_all(sft, ids, mask)[0]
    return {**sft_side, "win_rate_vs_sft": win_rate(samples, sft_side["sft_samples"], task.config),
            "score": score_responses(samples).mean().item(), "length": response_lengths(samples).float().mean().item(),
            "kl_to_sft": kl.mean().item(), "samples": samples.cpu(), "prompts": prompts.cpu(),
            **game(samples, task.config)}


def game(samples, config):
    """Under the cyclic judge, where the game is: the school shares of the samples and their exploitability."""
    if config.judge != "cyclic":
        return {}
    shares = school_shares(samples)
    return {"school_shares": shares.tolist(), "exploitability": school_exploitability(shares, config.cycle_prob)}


def pair_log_row(step, loss, chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps):
    """One log.jsonl line of a pairwise method, with TRL's metric names (means over the batch)."""
    return {"step": step, "loss": loss.item(),
            "rewards/chosen": chosen_rewards.mean().item(), "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
            "logps/chosen": policy_chosen_logps.mean().item(), "logps/rejected": policy_rejected_logps.mean().item()}


def ranking_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, chosen_lengths, rejected_lengths):
    """On held-out pairs:
    reward_accuracy    fraction with r(x, y_w) > r(x, y_l) under the method's own reward
    ranking_agreement  fraction on which that reward and the generation metric, the average
                       log-likelihood (1/|y|) log pi_theta(y|x) [SimPO-1], order y_w and y_l the same way
                       (the SimPO paper measured about 50% for DPO; for SimPO it is 1 by construction)
    A tie orders nothing: it is not a correct ordering, and it agrees only with a tie. So a reward that is
    the same for every response (DPO's and SPPO's at the start, where pi_theta = pi_ref) scores 0 on both."""
    reward_order = torch.sign(chosen_rewards - rejected_rewards)                                 # +1, 0 (tie), -1
    likelihood_order = torch.sign(chosen_logps / chosen_lengths - rejected_logps / rejected_lengths)
    return {"reward_accuracy": (reward_order > 0).float().mean().item(),
            "ranking_agreement": (reward_order == likelihood_order).float().mean().item()}


# --- Summary: tables, completions and charts in the terminal (no plotting dependency) -----------------------

def print_table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))


SUMMARY_ROWS = [("win rate vs SFT", "win_rate_vs_sft", "{:.3f}"), ("score (judge)", "score", "{:+.3f}"),
                ("length (words)", "length", "{:.2f}"), ("KL to SFT (nats)", "kl_to_sft", "{:.2f}"),
                ("reward accuracy", "reward_accuracy", "{:.3f}"), ("ranking agreement", "ranking_agreement", "{:.3f}"),
                ("exploitability", "exploitability", "{:.3f}"),
                ("seconds per step", "seconds_per_step", "{:.4f}"), ("peak memory (MB)", "peak_memory_mb", "{:.2f}")]


def print_summary(method, metrics, sft_ranking, out, note=None):
    """The end of a run: a table (the SFT model on the left, as the evaluation measured it, and the trained
    policy; a row neither has is left out, a cost the SFT model never paid is '-'), held-out reviews, the
    last line."""
    sft = {"win_rate_vs_sft": metrics["sft_win_rate_vs_sft"], "score": metrics["sft_score"],
           "length": metrics["sft_length"], "kl_to_sft": 0.0, "exploitability": metrics.get("sft_exploitability"),
           **sft_ranking}
    cell = lambda d, key, fmt: fmt.format(d[key]) if d.get(key) is not None else "-"
    print_table(["", "SFT", method], [[label, cell(sft, key, fmt), cell(metrics, key, fmt)]
                                       for label, key, fmt in SUMMARY_ROWS if key in metrics])
    if "school_shares" in metrics:
        shares = lambda v: " / ".join(f"{x:.2f}" for x in v)
        print(f"school shares (story / acting / craft / none): SFT {shares(metrics['sft_school_shares'])}, "
              f"{method} {shares(metrics['school_shares'])}")
    if note:
        print(f"SFT column: the SFT model is the reference, so its reward {note} is 0 for every response and\n"
              f"orders no held-out pair: its reward accuracy and ranking agreement are 0 by definition (a tie is\n"
              f"not an ordering), not a judgement of the SFT model.")
    print(f"\nHeld-out reviews, SFT model and {method} policy (judge's score in brackets; every run samples with\n"
          f"the evaluation's own seeds, so every method shows the same SFT reviews):")
    s_sft, s_policy = score_responses(metrics["sft_samples"]), score_responses(metrics["samples"])
    for i in range(4):
        print(f"  prompt: {decode(metrics['prompts'][i])}\n    {'SFT':>8} [{s_sft[i]:+.2f}] "
              f"{decode(metrics['sft_samples'][i])}\n    {method:>8} [{s_policy[i]:+.2f}] "
              f"{decode(metrics['samples'][i])}")
    print(f"\nwin rate vs SFT {metrics['win_rate_vs_sft']:.3f} | reward accuracy {metrics['reward_accuracy']:.3f} | "
          f"ranking agreement {metrics['ranking_agreement']:.3f} | {metrics['wall_seconds']:.1f} s (start-up "
          f"{metrics['startup_seconds']:.1f}, training {metrics['train_seconds']:.1f}, evaluation "
          f"{metrics['eval_seconds']:.1f}) | wrote {out}/")


def chart(series, title, width=60, height=8, lo=None, hi=None):
    """Curves in the terminal: `series` is a list of values per step, or a list of (character, name, values)
    to draw several on one scale ('*' where two meet). Values are averaged into at most `width` columns.
    The title gives the data's own range; the axis gives the plotted one (column means, or lo and hi).
    Returns the lines."""
    if not series or not isinstance(series[0], tuple):
        series = [(glyphs()[0], None, series)]
    data, curves = [], []
    for char, name, values in series:
        values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        edges = np.linspace(0, len(values), min(width, len(values)) + 1).astype(int)
        curves.append((char, [float(np.mean(values[a:b])) for a, b in zip(edges[:-1], edges[1:])]))
        data += values
    if not data:
        return [f"{title}: (no data)"]
    lo = min(v for _, columns in curves for v in columns) if lo is None else lo
    hi = max(v for _, columns in curves for v in columns) if hi is None else hi
    grid = [[" "] * max(len(columns) for _, columns in curves) for _ in range(height)]
    for char, columns in curves:
        for col, v in enumerate(columns):
            row = round((hi - v) / ((hi - lo) or 1.0) * (height - 1))   # the top row holds hi
            for r in range(row, height if len(curves) == 1 else row + 1):   # one curve: filled down to the axis
                grid[r][col] = char if grid[r][col] in (" ", char) else "*"
    names = "".join(f"; {char} {name}" for char, name, _ in series if name)
    means = f" in {len(grid[0])} columns of means" if len(grid[0]) < max(len(v) for _, _, v in series) else ""
    return [f"{title}  ({len(data)} values{means}; min {min(data):.3g}, max {max(data):.3g}{names})",
            *frame(grid, hi, lo)]


def frame(grid, top, bottom):
    """The rows of a character grid beside a y-axis labelled `top` and `bottom`, and an x-axis below."""
    _, bar, corner, rule = glyphs()
    labels = [f"{top:9.3g}"] + [" " * 9] * (len(grid) - 2) + [f"{bottom:9.3g}"]
    return [f"{label} {bar}" + "".join(cells) for label, cells in zip(labels, grid)] + \
        [" " * 10 + corner + rule * len(grid[0])]


def glyphs():
    """The characters of the charts: Unicode, or ASCII where the terminal cannot show it (a non-UTF-8
    locale, PYTHONIOENCODING=ascii). Returns (block, axis, corner, rule)."""
    try:
        "█│└─".encode(sys.stdout.encoding or "ascii")
        return "█", "│", "└", "─"
    except (UnicodeEncodeError, LookupError):
        return "#", "|", "+", "-"


def scatter(points, x_title, y_title, width=56, height=14):
    """points: (label, x, y) -> lines of a text scatter plot, each point drawn as its label's first
    character (a legend below gives the values). The DPO paper's reward-vs-KL frontier, in miniature."""
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    x0, x1 = min(xs + [0.0]), max(xs) or 1.0
    y0, y1 = min(ys), max(ys)
    y0, y1 = (y0 - 0.05, y1 + 0.05) if y1 - y0 < 1e-9 else (y0, y1)
    grid = [[" "] * width for _ in range(height)]
    for label, x, y in points:
        grid[round((y1 - y) / (y1 - y0) * (height - 1))][round((x - x0) / ((x1 - x0) or 1.0) * (width - 1))] = label[0]
    return ([f"{y_title} against {x_title}", *frame(grid, y1, y0),
             f"           {x0:<10.2f}{x_title:^{width - 20}}{x1:>10.2f}"]
            + [f"  {label[0]} = {label[2:] if label[1:2] == ':' else label}: {x_title} {x:.2f}, {y_title} {y:.3f}"
               for label, x, y in points])


# --- Exact mode (--exact): every response listed, a table for the policy, every expectation a finite sum ----
#
# The responses: 27 reviews, one per (school, sentiment, length), with N1 N2 N3 a school's three nouns:
#     score +0.5   "great N1"    "great N1 lovely N2"    "great N1 lovely N2 fun N3"
#     score  0     "the N1"      "the N1 and N2"         "the N1 and N2 and N3"
#     score -0.5   "dull N1"     "dull N1 weak N2"       "dull N1 weak N2 bad N3"
# Each review has one school (the cyclic judge can act), the same score at 2, 4 and 6 words (so length and
# quality can be told apart: SimPO's claim), and its score is the task's own judge's (mean word value).
# The SFT table, pi_ref for DPO, pi_1 for SPPO and SimPO's start, is a fixed non-uniform stand-in for the SFT
# model: a product of three preferences, for the story school (0.6 / 0.3 / 0.1), for neutral reviews
# (0.25 / 0.5 / 0.25 for scores +0.5 / 0 / -0.5) and for short ones (0.5 / 0.3 / 0.2 for 2 / 4 / 6 words).
# The pairs are drawn as the GPT task draws them: two reviews from the SFT policy, labelled by sampling
# the judge. With the Bradley-Terry judge every review's reward is known, r(y) = s(y)/tau + length_bias |y|
# (|y| in words), so DPO's optimum pi* = pi_ref exp(r/beta)/Z [DPO-opt] is a vector we can write down.

EXACT_PROMPT = "classic comedy film"    # the table ignores the prompt, and so does the judge: one is enough
EXACT_TEMPLATES = ((0.5, ("great {0}", "great {0} lovely {1}", "great {0} lovely {1} fun {2}")),
                   (0.0, ("the {0}", "the {0} and {1}", "the {0} and {1} and {2}")),
                   (-0.5, ("dull {0}", "dull {0} weak {1}", "dull {0} weak {1} bad {2}")))
SFT_SCHOOL, SFT_SCORE, SFT_LENGTH = (0.6, 0.3, 0.1), (0.25, 0.5, 0.25), (0.5, 0.3, 0.2)


def kl(p, q):
    """KL(p || q) = sum_y p(y) log(p(y)/q(y)) in nats, float64; terms with p(y) = 0 count 0."""
    p, q = torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(q, dtype=torch.float64)
    terms = p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log())
    return torch.where(p > 0, terms, torch.zeros_like(p)).sum().item()


class ExactTask:
    """The listed responses, the SFT table, the judge's full preference matrix and the pairs, all exact."""

    def __init__(self, config=None):
        self.config = config or TaskConfig()
        self.texts, sft = [], []
        for school, nouns in enumerate(SCHOOL_WORDS):
            for level, (_, templates) in enumerate(EXACT_TEMPLATES):
                for length, template in enumerate(templates):
                    self.texts.append(template.format(*nouns.split()))
                    sft.append(SFT_SCHOOL[school] * SFT_SCORE[level] * SFT_LENGTH[length])
        width = max(len(t.split()) for t in self.texts) + 1
        self.responses = torch.tensor([encode(t) + [EOS_ID] + [PAD_ID] * (width - 1 - len(t.split()))
                                       for t in self.texts])                   # [C, 7]: EOS, then padding
        self.n = len(self.texts)                                              # C = 27
        self.sft_probs = torch.tensor(sft, dtype=torch.float64) / sum(sft)    # [C]
        self.scores = score_responses(self.responses).double()                # [C] the judge's score
        self.words = response_lengths(self.responses)                         # [C] |y| in words
        self.schools = school_of(self.responses)                              # [C]
        self.prompts = torch.tensor([[BOS_ID] + encode(EXACT_PROMPT) + [SEP_ID]])
        # the distribution the pairs' reviews are drawn from: the SFT table, or (--pair-schools uniform) the SFT
        # table with its school shares set to 1/3 each
        self.pair_probs = self.sft_probs
        if self.config.pair_schools == "uniform":
            self.pair_probs = self.sft_probs / torch.tensor(SFT_SCHOOL, dtype=torch.float64)[self.schools] / 3
        # prefs[a, b] = P(y_a > y_b | x), the judge on every pair (the raters': with their length bias): [C, C]
        self.prefs = judge_prob(self.responses[:, None, :], self.responses[None, :, :], self.config,
                                self.config.length_bias, torch.float64)
        self.reward = (self.scores / self.config.tau + self.config.length_bias * self.words.double()
                       if self.config.judge == "bt" else None)                # no reward under the cyclic judge
        self._table = TablePolicy(self.responses, PROMPT_LEN, len(VOCAB))     # built once; table() copies it

    def table(self, probs=None):
        """A model.TablePolicy over the responses, starting at `probs` (default: the SFT table)."""
        table = copy.deepcopy(self._table)
        with torch.no_grad():
            table.logits.copy_((self.sft_probs if probs is None else torch.as_tensor(probs, dtype=torch.float64)).log())
        return table

    def index_of(self, responses):
        """The position in the list of each response [M, L'] (token ids, EOS then padding), -1 if not listed."""
        width = max(responses.shape[1], self.responses.shape[1])
        pad = lambda r: torch.nn.functional.pad(r, (0, width - r.shape[1]))
        same = (pad(responses.cpu())[:, None, :] == pad(self.responses)[None, :, :]).all(-1)   # [M, C]
        return torch.where(same.any(-1), same.long().argmax(-1), torch.full((responses.shape[0],), -1))

    def population_pairs(self):
        """Every ordered pair (y_w, y_l), w != l, with its probability in the data: two reviews drawn from
        pair_probs (the SFT table), y_w the one the judge picked: 2 pi(w) pi(l) P(w > l), normalised (pairs of
        one review twice are left out: their loss is the same for every policy). Returns chosen [M],
        rejected [M] (response indices) and weights [M] (float64, summing to 1)."""
        w = 2 * self.pair_probs[:, None] * self.pair_probs[None, :] * self.prefs
        w.fill_diagonal_(0.0)
        chosen, rejected = w.nonzero(as_tuple=True)
        return chosen, rejected, w[chosen, rejected] / w.sum()

    def sampled_pairs(self, n, seed=0):
        """n pairs drawn as population_pairs describes, each label drawn from the judge (finite data):
        the same triples, weighted by how often they were drawn (counts / n)."""
        rng = np.random.default_rng(seed)
        a, b = (rng.choice(self.n, size=n, p=self.pair_probs.numpy()) for _ in range(2))
        a_wins = rng.random(n) < self.prefs[a, b].numpy()
        counts = torch.zeros(self.n, self.n, dtype=torch.float64)
        counts.index_put_((torch.from_numpy(np.where(a_wins, a, b)), torch.from_numpy(np.where(a_wins, b, a))),
                          torch.ones(n, dtype=torch.float64), accumulate=True)
        chosen, rejected = counts.nonzero(as_tuple=True)
        return chosen, rejected, counts[chosen, rejected] / n

    def dpo_optimum(self, beta):
        """[DPO-opt] pi*(y) = pi_ref(y) exp(r(y)/beta) / Z, the KL-regularised optimum (Bradley-Terry judge)."""
        return torch.softmax(self.sft_probs.log() + self.reward / beta, dim=0)

    def simpo_optimum_gamma0(self, beta):
        """SimPO's minimiser when gamma = 0 (Bradley-Terry judge): the labels' Bradley-Terry likelihood is
        maximised by any reward r(y) = (beta/|y|) log pi(y) equal to the true r(y) + c, and a table can take
        every such reward, so pi(y) = exp(|y| (r(y) + c) / beta), with the one c that makes it sum to 1
        (found by bisection: the sum grows with c). |y| counts tokens, EOS included, as sequence_logps does."""
        tokens = self.words.double() + 1
        total = lambda c: torch.exp(tokens * (self.reward + c) / beta).sum().item()
        lo, hi = -self.reward.max().item() - 50.0 * beta, -self.reward.max().item()   # total(lo) < 1 <= total(hi)
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if total(mid) < 1 else (lo, mid)
        return torch.exp(tokens * (self.reward + hi) / beta) / total(hi)

    def win_rates(self, probs):
        """P(y > pi) = sum_y' P(y > y') pi(y') for every listed y: [C] float64."""
        return self.prefs @ torch.as_tensor(probs, dtype=torch.float64)

    def exploitability(self, probs):
        return exploitability(probs, self.prefs)

    def best(self):
        """[C] bool: the reviews of the highest score, the judge's best (--length-bias sways the raters, not it)."""
        return self.scores == self.scores.max()

    def school_shares(self, probs):
        """[3] the mass the policy puts on each school."""
        return torch.stack([probs[self.schools == i].sum() for i in range(len(SCHOOLS))])

    def mean_words(self, probs):
        return (probs * self.words.double()).sum().item()


def start_exact(parser, defaults):
    """What every script's --exact does first: the flags (those not given take `defaults`: a table is not a
    GPT), the output folder, and the task. Returns (args, ExactTask)."""
    args = parser.parse_args(namespace=argparse.Namespace(**defaults))
    prepare_out_dir(args.out)
    torch.set_num_threads(1)                # a table's tensors are tiny: a second thread only waits
    return args, ExactTask(task_config(args))


def save_exact(args, ex, metrics, start_time):
    """metrics.json of an exact run (no GPT: no model.pt, no log.jsonl), with the table's responses. Returns
    the run's last line (its seconds counted from start_time, the script's START)."""
    metrics.update(responses=ex.texts, sft_probs=ex.sft_probs.tolist(), wall_seconds=time.time() - start_time)
    save_files(args.out, {"metrics.json": (json.dumps(metrics, indent=2) + "\n").encode()})
    game = (f"\nexploitability max_y P(y > pi) - 1/2 [Nash]: SFT {metrics['exploitability_sft']:.3f}, trained "
            f"{metrics['exploitability']:.3f}; school shares (story, acting, craft): "
            + " / ".join(f"{x:.3f}" for x in metrics["school_shares"]) + "\n" if "exploitability" in metrics else "")
    return game + f"{metrics['wall_seconds']:.1f} s | wrote {args.out}/metrics.json (no model.pt or log.jsonl: a table)"


def print_exact_groups(ex, named_probs, by="school"):
    """A small table: the mass each policy (name -> probs [C]) puts on each group of responses, grouped
    by school and score (by='school') or by length and score (by='length')."""
    rows = []
    for g in range(3):
        for score_value, _ in EXACT_TEMPLATES:
            member = ((ex.schools == g) if by == "school" else (ex.words == 2 * (g + 1))) & (ex.scores == score_value)
            label = f"{SCHOOLS[g] if by == 'school' else str(2 * (g + 1)) + ' words'}, score {score_value:+.1f}"
            rows.append([label] + [f"{p[member].sum().item():.4f}" for p in named_probs.values()])
    print_table([f"responses (by {by})", *named_probs], rows)


# --- Command line: python data.py [show | frontier | sample | curves | logps] -------------------------------

def frontier_point(run_dir):
    """(label, KL to SFT, score, SFT score) of a finished run, or one line that says what is wrong with it."""
    try:
        with open(os.path.join(run_dir, "metrics.json")) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        return f"{run_dir}: no readable metrics.json ({type(e).__name__}): is it a finished run's folder?"
    for key in ("kl_to_sft", "score", "sft_score"):
        v = m.get(key) if isinstance(m, dict) else None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return f"{run_dir}/metrics.json: {key} is {json.dumps(v)}, not a finite number (an --exact run?)"
    beta = f", beta {m['beta']}" if m.get("beta") is not None else ""
    label = f"{os.path.basename(os.path.normpath(run_dir))} ({m.get('method', 'run')}{beta})"
    return label, m["kl_to_sft"], m["score"], m["sft_score"]


def displacement(policy, sft, task, seed=0, n_samples=512):
    """Where a trained policy put its probability mass: the mean log pi(y|x) (summed over the response) of
    five sets of reviews under the SFT model and the policy. [(name, sft_mean, policy_mean)]. The first two
    are what log.jsonl's logps/chosen and logps/rejected follow, over the whole training set."""
    cpu = torch.device("cpu")
    sft_pairs, policy_pairs = pair_logps_all(sft, task.pairs, cpu), pair_logps_all(policy, task.pairs, cpu)
    rows = [("chosen y_w, training pairs", sft_pairs[0], policy_pairs[0]),
            ("rejected y_l, training pairs", sft_pairs[1], policy_pairs[1])]
    prompts, own = heldout_reviews(policy, task, cpu, n_samples, seed)                  # the evaluation's reviews
    sft_reviews = heldout_reviews(sft, task, cpu, n_samples, seed + 1)[1]
    # reviews of five positive words (the judge's favourite kind), kept only if no pair holds them
    g = torch.Generator().manual_seed(seed)
    best = torch.full((n_samples, MAX_RESPONSE), PAD_ID)
    best[:, :5] = torch.as_tensor(POS_IDS)[torch.randint(0, len(POS_IDS), (n_samples, 5), generator=g)]
    best[:, 5] = EOS_ID
    in_pairs = {tuple(y.tolist()) for side in ("chosen", "rejected") for y in task.pairs[f"{side}_ids"][:, PROMPT_LEN:]}
    best = best[[tuple(y.tolist()) not in in_pairs for y in best]]
    for name, p, responses in (("the policy's own samples", prompts, own),
                               ("the SFT model's samples", prompts, sft_reviews),
                               ("5 positive words, in no pair", prompts[:len(best)], best)):
        ids, mask = join(p, responses)
        rows.append((name, sequence_logps_all(sft, ids, mask)[0], sequence_logps_all(policy, ids, mask)[0]))
    return [(name, a.mean().item(), b.mean().item()) for name, a, b in rows]


def main(argv=None):
    """The task, and what finished runs left behind (README, "Using what you trained"):

    python data.py                           show the task: the worked example and a few training pairs
    python data.py frontier DIR...           score against KL(policy || SFT) for finished runs
                                             (metrics.json in each DIR): the DPO paper's figure 2 in miniature
    python data.py sample DIR --prompt "new horror film" -n 5
                                             reviews from a trained model (DIR/model.pt), judge's score beside each
    python data.py curves DIR --key KEY...   redraw any key of DIR/log.jsonl per step (default: loss)
    python data.py logps DIR                 where the mass went: mean log pi(y|x) of chosen, rejected
                                             and sampled reviews under the SFT model and DIR's policy"""
    import inspect
    from model import bounded_int, load_checkpoint
    parser = argparse.ArgumentParser(description=inspect.cleandoc(main.__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="show", choices=["show", "frontier", "sample", "curves", "logps"])
    parser.add_argument("dirs", nargs="*", help="run folders (what dpo.py, simpo.py or sppo.py wrote with --out)")
    parser.add_argument("--prompt", default="new horror film", help="sample: decade genre noun (default: %(default)s)")
    parser.add_argument("-n", type=bounded_int(1, 10_000), default=5, help="sample: reviews (default: %(default)s)")
    parser.add_argument("--temperature", type=positive_float, default=1.0, help="sample: (default: %(default)s)")
    parser.add_argument("--seed", type=bounded_int(0, 2**32 - 1), default=0, help="sample: (default: %(default)s)")
    parser.add_argument("--key", action="append", help="curves: a log.jsonl key, repeatable (default: loss)")
    args = parser.parse_args(argv)
    count = {"show": 0, "frontier": len(args.dirs) or 1}.get(args.command, 1)   # frontier: any number but 0
    if len(args.dirs) != count:
        fail(f"{args.command} takes {count if args.command != 'frontier' else 'some'} run folder(s), "
             f"got {len(args.dirs)}")
    run_dir = args.dirs[0] if args.dirs else None
    if args.command == "frontier":
        points = [frontier_point(d) for d in args.dirs]
        for problem in (p for p in points if isinstance(p, str)):   # one line per bad folder, then no chart
            print(f"error: {problem}", file=sys.stderr)
        if any(isinstance(p, str) for p in points):
            sys.exit(2)
        labelled = [("S:the SFT model", 0.0, points[0][3])] + [(f"{chr(65 + i)}:{label}", x, y) for i, (label, x, y, _)
                                                              in enumerate(points)]   # S: where every run starts
        print("\n".join(scatter(labelled, "KL(policy || SFT)", "score")))
    elif args.command == "sample":
        if [w in allowed for w, allowed in zip(args.prompt.split(), (DECADES, GENRES, NOUNS))] != [True] * 3:
            fail(f"--prompt takes a decade, a genre and a noun, e.g. 'new horror film' (decades: {' '.join(DECADES)}; "
                 f"genres: {' '.join(GENRES)}; nouns: {' '.join(NOUNS)}); got {args.prompt!r}")
        policy, _ = load_checkpoint(os.path.join(run_dir, "model.pt"))
        # in batches of 64 from one generator, so that the first reviews of a seed do not depend on -n
        prompts = torch.tensor([[BOS_ID] + encode(args.prompt) + [SEP_ID]] * (math.ceil(args.n / 64) * 64))
        reviews = sample(policy, prompts, MAX_RESPONSE, EOS_ID, BANNED_IN_RESPONSE, temperature=args.temperature,
                         generator=torch.Generator().manual_seed(args.seed), batch_size=64)[:args.n]
        for review in reviews:
            print(f"[{score_responses(review[None])[0]:+.2f}] {decode(review)}")
        print("(the judge and the demonstrations ignore the prompt: every prompt gets reviews of the same kind)")
    elif args.command == "curves":
        try:
            with open(os.path.join(run_dir, "log.jsonl")) as f:
                rows = [r for r in map(json.loads, f) if isinstance(r, dict)]
        except (OSError, ValueError) as e:
            fail(f"{run_dir}: no readable log.jsonl ({type(e).__name__}): is it a finished run's folder?")
        keys = sorted({k for r in rows for k in r})
        for key in args.key or ["loss"]:
            numbers = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)]
            if not numbers:
                fail(f"{run_dir}/log.jsonl has no numbers under {key!r} (a run with --steps 0?); its keys: "
                     f"{', '.join(keys)}")
            print("\n".join(chart(numbers, f"{key} per step ({run_dir})")))
            tail = numbers[-max(1, len(numbers) // 10):]   # the last tenth: a batch mean is noisy, their mean less so
            print(f"{key}: first {numbers[0]:.4g}, last {numbers[-1]:.4g}, mean of the last {len(tail)} "
                  f"{'value' if len(tail) == 1 else 'values'} {sum(tail) / len(tail):.4g}")
    elif args.command == "logps":
        policy, run_args = load_checkpoint(os.path.join(run_dir, "model.pt"))
        run_args = argparse.Namespace(**run_args)
        task = Task(task_config(run_args), seed=run_args.seed)
        sft, _ = sft_model(task, torch.device("cpu"), run_args.sft_dir, run_args.seed, run_args.sft_steps,
                           model_config(run_args))
        print(f"mean log pi(y|x), nats summed over the response: the SFT model, then {run_dir}'s policy")
        rows = displacement(policy, sft, task, run_args.seed)
        print_table(["reviews", "SFT", "policy", "change"], [[name, f"{a:.2f}", f"{b:.2f}", f"{b - a:+.2f}"]
                                                             for name, a, b in rows])
    else:
        a, b = "the acting was great and the music superb", "a dull plot but lovely cast"
        print(f"prompt: classic comedy film\n  a: {a}  score {score('', a):+.3f}\n  b: {b}  score {score('', b):+.3f}")
        print(f"  oracle P(a > b | x) = sigmoid(({score('', a):.2f} - {score('', b):.2f}) / tau) = "
              f"{oracle('', a, b):.3f}")
        pairs = Task(TaskConfig(n_demos=8, n_pairs=4, n_heldout=4)).pairs
        print("\ntraining pairs (chosen / rejected, judge's score):")
        for i in range(4):
            print(f"  {decode(pairs['chosen_ids'][i][:PROMPT_LEN])}\n"
                  f"    y_w [{pairs['chosen_score'][i]:+.2f}] {decode(pairs['chosen_ids'][i][PROMPT_LEN:])}\n"
                  f"    y_l [{pairs['rejected_score'][i]:+.2f}] {decode(pairs['rejected_ids'][i][PROMPT_LEN:])}")
        print(f"\nvocabulary: {len(VOCAB)} tokens; {len(DECADES) * len(GENRES) * len(NOUNS)} prompts")


if __name__ == "__main__":
    run(main)   # model.run: a closed pipe or Ctrl-C ends in one line, not a traceback
