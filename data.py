"""
data.py: the toy preference task, its judge, the batches, and the evaluation every method shares.

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

The preference oracle is Bradley-Terry on the hidden score: P(y > y' | x) = sigmoid((s(y) - s(y')) / tau).
It labels the offline pairs (by sampling, so some labels are "wrong", as with human raters), and it is the
P that SPPO's self-play queries. The score ignores the prompt: the prompt sets the topic only.

Two knobs build the conditions of the SimPO write-up's claims (off by default):
    length_bias  the raters favour the longer review: P(a chosen) = sigmoid((s_a - s_b)/tau + length_bias * (|a| - |b|))
    pair_style   the pairs are written in another style: each pair response swaps a random fraction
                 (up to pair_style) of its neutral words for archaic ones ("verily", "forsooth") that the
                 SFT data never uses. The judge ignores style; the likelihood does not.

Two more things for checking what the objectives converge to (python dpo.py --exact and the like):
    --judge cyclic  three "schools" of reviews that beat each other in a circle (no reward can say that)
    ExactTask       27 listed reviews, an SFT table and the judge on every pair: every expectation a sum
"""

import contextlib
import copy
import math
import os
import sys
import textwrap
from dataclasses import dataclass

import numpy as np
import torch

from model import (TablePolicy, fail, make_generator, model_config, pair_logps, pick_device, prepare_out_dir,
                   progress, sample, sequence_logps_all, sft_model, swapped_weights, trim)

# ----------------------------------------------------------------------------------------------------
# Vocabulary and tokenizer
# ----------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------
# The judge: score and preference oracle
# ----------------------------------------------------------------------------------------------------

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


def preference_prob(score_a, score_b, tau):
    """Bradley-Terry oracle P(a > b | x) = sigmoid((s_a - s_b) / tau). P(a > b) + P(b > a) = 1 exactly."""
    return torch.sigmoid((torch.as_tensor(score_a) - torch.as_tensor(score_b)) / tau)


def oracle(prompt, response_a, response_b, tau=0.2):
    """P(a > b | x) for text, as in the worked example above."""
    return preference_prob(score(prompt, response_a), score(prompt, response_b), tau).item()


# ----------------------------------------------------------------------------------------------------
# A second judge: preferences that go round in a circle (--judge cyclic)
# ----------------------------------------------------------------------------------------------------
#
# Bradley-Terry gives every review one number (its score) and prefers the larger, so its preferences are
# transitive: they order the reviews in a line. Real raters need not be. The cyclic judge has three
# "schools" of critics, told apart by the nouns a review talks about, and each school's reviews beat the next
# school's, round the circle, like rock-paper-scissors:
#     story beats acting, acting beats craft, craft beats story, each with probability cycle_prob (0.9).
# No reward can represent this: a reward would need r(story) > r(acting) > r(craft) > r(story). Within a
# school the judge calls a tie (1/2), so the game is exactly rock-paper-scissors on the school shares, and
# its Nash equilibrium [Nash] is known in closed form: every policy whose reviews fall in the three schools
# one third each (a review in no school loses to one in any school with probability cycle_prob, so no
# equilibrium writes one). The words are the task's own NEUTRAL nouns: no score changes.

SCHOOLS = ("story", "acting", "craft")                  # school i beats school (i + 1) % 3
SCHOOL_WORDS = ("plot story ending", "acting cast characters", "music scenes script")
NO_SCHOOL = -1
_SCHOOL_OF_TOKEN = torch.full((len(VOCAB),), NO_SCHOOL, dtype=torch.long)
for _i, _words in enumerate(SCHOOL_WORDS):
    _SCHOOL_OF_TOKEN[torch.as_tensor(_ids(_words.split()))] = _i


def school_of(responses):
    """The school of each response [..., L] (token ids): the one whose nouns it uses most; NO_SCHOOL (-1)
    if it uses none, or two schools' nouns equally often. Returns [...] (long)."""
    responses = torch.as_tensor(responses).cpu()
    school = _SCHOOL_OF_TOKEN[responses]                                        # [..., L]
    counts = torch.stack([(school == i).sum(-1) for i in range(len(SCHOOLS))], dim=-1)   # [..., 3]
    top = counts.max(-1)
    clear = (top.values > 0) & ((counts == top.values[..., None]).sum(-1) == 1)
    return torch.where(clear, top.indices, torch.full_like(top.indices, NO_SCHOOL))


def cyclic_preference_prob(school_a, school_b, cycle_prob=0.9):
    """The cyclic oracle P(a > b | x) from the schools of a and b (tensors that broadcast):
    cycle_prob when a's school beats b's (i beats (i + 1) % 3, or a has a school and b none),
    1 - cycle_prob the other way round, 1/2 within a school. P(a > b) + P(b > a) = 1 exactly."""
    school_a, school_b = torch.as_tensor(school_a), torch.as_tensor(school_b)
    n = len(SCHOOLS)
    has_a, has_b = school_a >= 0, school_b >= 0
    a_beats_b = (has_a & has_b & (school_b == (school_a + 1) % n)) | (has_a & ~has_b)
    b_beats_a = (has_a & has_b & (school_a == (school_b + 1) % n)) | (has_b & ~has_a)
    half = torch.tensor(0.5, dtype=torch.float64)
    return torch.where(a_beats_b, cycle_prob, torch.where(b_beats_a, 1.0 - cycle_prob, half))


def exploitability(policy_probs, prefs):
    """max_y P(y > pi) - 1/2, with P(y > pi) = sum_y' P(y > y') pi(y')                                [Nash]
    policy_probs [C] a distribution over C responses (or schools); prefs [C, C] with prefs[y, y'] = P(y > y').
    In a symmetric constant-sum game (P(y > y') + P(y' > y) = 1), pi wins against itself exactly half the
    time, so the best reply to pi wins at least half the time: exploitability >= 0, and it is 0 exactly when
    no response beats pi more often than not, which is the definition of a Nash equilibrium [SPPO-1]."""
    policy_probs = torch.as_tensor(policy_probs, dtype=torch.float64)
    return (torch.as_tensor(prefs, dtype=torch.float64) @ policy_probs).max().item() - 0.5


SCHOOL_CATEGORIES = (0, 1, 2, NO_SCHOOL)   # story, acting, craft, none: every review falls in exactly one


def school_shares(responses):
    """The share of each of SCHOOL_CATEGORIES among responses [N, L]: [4] float64 (story, acting, craft, none)."""
    schools = school_of(responses)
    return torch.tensor([(schools == c).double().mean().item() for c in SCHOOL_CATEGORIES], dtype=torch.float64)


def school_exploitability(shares, cycle_prob=0.9):
    """Exploitability [Nash] of a policy known by its school shares [4] (school_shares): a review's chance to
    beat the policy depends only on its school, so the best reply is one of the four categories."""
    cats = torch.tensor(SCHOOL_CATEGORIES)
    return exploitability(shares, cyclic_preference_prob(cats[:, None], cats[None, :], cycle_prob))


def judge_prob(responses_a, responses_b, config):
    """P(a > b | x) under the task's judge, in float64, for response token tensors [..., L] that broadcast.
    config.judge 'bt': the Bradley-Terry oracle sigmoid((s_a - s_b)/tau + length_bias (|a| - |b|)), the
    probability the pairs' labels are drawn with (Task._make_pairs); 'cyclic': cyclic_preference_prob."""
    if config.judge == "cyclic":
        return cyclic_preference_prob(school_of(responses_a), school_of(responses_b), config.cycle_prob)
    logit = (score_responses(responses_a).double() - score_responses(responses_b).double()) / config.tau
    logit = logit + config.length_bias * (response_lengths(responses_a) - response_lengths(responses_b)).double()
    return torch.sigmoid(logit)


# ----------------------------------------------------------------------------------------------------
# The task: prompts, SFT demonstrations, preference pairs
# ----------------------------------------------------------------------------------------------------

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
    demo_style_rate: float = 0.0   # how often SFT reviews use a style word
    judge: str = "bt"              # "bt": Bradley-Terry on the score; "cyclic": the schools' circle (--judge)
    cycle_prob: float = 0.9        # cyclic judge: how often a school's review beats the next school's
    school_shares: tuple = (0.6, 0.3, 0.1)   # cyclic judge: the schools' shares in the SFT data and the pairs
    pair_schools: str = "sft"      # cyclic judge: "sft", pairs in the SFT shares; "uniform", one third each


def _random_responses(rng, n, sentiment_rate, style_rate):
    """n SFT-like reviews [n, MAX_RESPONSE] with a broad mix of quality: each review draws its own
    propensity p ~ U(0, 1); each word is a sentiment word with probability sentiment_rate, positive
    with probability p; otherwise neutral, and a neutral word is a style word with probability
    style_rate (a scalar or one rate per review). Vectorised: no Python loop over reviews."""
    lengths = rng.integers(3, MAX_WORDS + 1, size=n)
    p = rng.random((n, 1))
    sentiment = rng.random((n, MAX_WORDS)) < sentiment_rate
    positive = rng.random((n, MAX_WORDS)) < p
    style = rng.random((n, MAX_WORDS)) < np.broadcast_to(np.asarray(style_rate, dtype=float).reshape(-1, 1), (n, 1))
    words = np.where(sentiment,
                     np.where(positive, rng.choice(POS_IDS, (n, MAX_WORDS)), rng.choice(NEG_IDS, (n, MAX_WORDS))),
                     np.where(style, rng.choice(STYLE_IDS, (n, MAX_WORDS)), rng.choice(NEU_IDS, (n, MAX_WORDS))))
    out = np.full((n, MAX_RESPONSE), PAD_ID, dtype=np.int64)
    pos = np.arange(MAX_RESPONSE)[None, :]
    out[:, :MAX_WORDS] = np.where(pos[:, :MAX_WORDS] < lengths[:, None], words, PAD_ID)
    out[np.arange(n), lengths] = EOS_ID
    return torch.from_numpy(out)


def _with_schools(rng, responses, shares):
    """--judge cyclic: give each review [n, L] a school, drawn with probabilities `shares`: every school noun it
    has becomes one of its own school's nouns, and one word at a random position becomes one too, so its
    school (school_of) is the one drawn. The sentiment words and the length are kept (one word may be lost
    to the noun), so the judge's score changes little; the cyclic judge ignores it anyway."""
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
        self.config = config or TaskConfig()
        c = self.config
        rng = np.random.default_rng(seed)
        grid = np.array([[BOS_ID, STOI[d], STOI[g], STOI[n], SEP_ID] for d in DECADES for g in GENRES for n in NOUNS])
        order = rng.permutation(len(grid))
        n_held = int(round(len(grid) * c.heldout_fraction))
        self.heldout_prompts = torch.from_numpy(grid[np.sort(order[:n_held])])   # never seen in training
        self.train_prompts = torch.from_numpy(grid[np.sort(order[n_held:])])

        def prompts_for(pool, n):
            return pool[torch.from_numpy(rng.integers(0, len(pool), n))]

        # SFT demonstrations: a broad mix of good and bad reviews, so the SFT model has room to improve.
        p = prompts_for(self.train_prompts, c.n_demos)
        # Under --judge cyclic every review also gets a school, in the unequal shares c.school_shares.
        schooled = (lambda r: _with_schools(rng, r, c.school_shares)) if c.judge == "cyclic" else (lambda r: r)
        self.sft_ids, self.sft_mask = join(p, schooled(_random_responses(rng, c.n_demos, c.sentiment_rate,
                                                                         c.demo_style_rate)))
        p = prompts_for(self.heldout_prompts, c.n_heldout)
        self.sft_heldout_ids, self.sft_heldout_mask = join(p, schooled(_random_responses(rng, c.n_heldout, c.sentiment_rate,
                                                                                         c.demo_style_rate)))
        self.pairs = self._make_pairs(rng, self.train_prompts, c.n_pairs)
        self.heldout_pairs = self._make_pairs(rng, self.heldout_prompts, c.n_heldout)

    def _make_pairs(self, rng, pool, n):
        """n preference pairs (x, y_w, y_l): two SFT-like reviews of one prompt, labelled by SAMPLING the
        oracle (so about one label in five goes against the score, like noisy raters). Under --judge cyclic
        the reviews have schools, in the SFT data's shares, and the cyclic oracle labels them."""
        c = self.config
        prompts = pool[torch.from_numpy(rng.integers(0, len(pool), n))]
        style = [c.demo_style_rate + rng.random(n) * c.pair_style for _ in range(2)]
        a = _random_responses(rng, n, c.sentiment_rate, style[0])
        b = _random_responses(rng, n, c.sentiment_rate, style[1])
        if c.judge == "cyclic":
            shares = c.school_shares if c.pair_schools == "sft" else (1, 1, 1)
            a, b = _with_schools(rng, a, shares), _with_schools(rng, b, shares)
            a_prob = cyclic_preference_prob(school_of(a), school_of(b), c.cycle_prob)
        else:
            logit = (score_responses(a) - score_responses(b)) / c.tau
            logit = logit + c.length_bias * (response_lengths(a) - response_lengths(b)).float()
            a_prob = torch.sigmoid(logit.double())
        a_wins = torch.from_numpy(rng.random(n)) < a_prob
        chosen = torch.where(a_wins[:, None], a, b)
        rejected = torch.where(a_wins[:, None], b, a)
        chosen_ids, chosen_mask = join(prompts, chosen)
        rejected_ids, rejected_mask = join(prompts, rejected)
        return {"chosen_ids": chosen_ids, "chosen_mask": chosen_mask,
                "rejected_ids": rejected_ids, "rejected_mask": rejected_mask,
                "chosen_score": score_responses(chosen), "rejected_score": score_responses(rejected)}

    def eval_prompts(self, n):
        """n held-out prompts, cycling through all of them in a fixed order."""
        reps = math.ceil(n / len(self.heldout_prompts))
        return self.heldout_prompts.repeat(reps, 1)[:n]


def add_task_args(parser):
    """The task's knobs as flags (shared by the three scripts); task_config(args) reads them back."""
    g = parser.add_argument_group("task (data.py)")
    g.add_argument("--tau", type=float, default=TaskConfig.tau,
                   help="oracle temperature in P(a > b) = sigmoid((s_a - s_b)/tau); smaller = less label noise")
    g.add_argument("--length-bias", type=float, default=TaskConfig.length_bias,
                   help="> 0: raters prefer longer reviews by this many logits per extra word (claim c)")
    g.add_argument("--pair-style", type=float, default=TaskConfig.pair_style,
                   help="0..1: pairs written in a foreign style the judge ignores (claim a); 0 = off")
    g.add_argument("--judge", choices=["bt", "cyclic"], default=TaskConfig.judge,
                   help="bt: Bradley-Terry on the score (transitive); cyclic: three schools of critics that beat "
                        "each other in a circle, which no reward can represent (default: %(default)s)")
    g.add_argument("--pair-schools", choices=["sft", "uniform"], default=TaskConfig.pair_schools,
                   help="--judge cyclic: the schools of the preference pairs' reviews, in the SFT data's unequal "
                        "shares, or one third each, so every school meets every other equally often (exercise) "
                        "(default: %(default)s)")
    return parser


def task_config(args):
    if not (args.tau > 0 and math.isfinite(args.tau)):   # tau = inf would pin every win rate at 1/2
        fail(f"--tau must be a finite number > 0, got {args.tau}")
    if not 0 <= args.pair_style <= 1:
        fail(f"--pair-style must be in [0, 1], got {args.pair_style}")
    if not math.isfinite(args.length_bias):
        fail(f"--length-bias must be a finite number, got {args.length_bias}")
    return TaskConfig(tau=args.tau, length_bias=args.length_bias, pair_style=args.pair_style, judge=args.judge,
                      pair_schools=args.pair_schools)


def start_run(args):
    """What every method script does first, in this order: pick the device, check the task flags, prove
    the output folders writable (before any work), seed, build the task, and load or train the SFT model.
    Returns (device, task, policy, sft_info); `policy` is the SFT model, ready to be trained further."""
    device = pick_device(args.device)
    task_cfg = task_config(args)
    cfg = model_config(args)
    progress.reset(args.out, getattr(args, "lr", None))
    prepare_out_dir(args.out)
    if os.path.exists(args.sft_dir) and not os.path.isdir(args.sft_dir):   # read-only is fine: it is read
        fail(f"--sft-dir {args.sft_dir!r} is a file, not a folder")
    torch.manual_seed(args.seed)
    task = Task(task_cfg, seed=args.seed)
    policy, sft_info = sft_model(task, device, args.sft_dir, args.seed, args.sft_steps, cfg)
    print(f"SFT model: {'loaded from' if sft_info['cached'] else 'trained and saved to'} {sft_info['path']} "
          f"(held-out cross-entropy {sft_info['ce_before']:.3f} -> {sft_info['ce_after']:.3f} nats/token)")
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


# ----------------------------------------------------------------------------------------------------
# Evaluation: sample on held-out prompts and let the judge compare
# ----------------------------------------------------------------------------------------------------

def head_to_head(policy, baseline, task, device, n_samples, seed, temperature=1.0, baseline_vs_itself=False):
    """Sample one review per held-out prompt from each model (temperature 1 by default) and compare.

    win_rate  mean oracle P(policy sample > baseline sample | x) over the prompts
    kl        Monte-Carlo KL(policy || baseline) = E_{y~policy}[log policy(y|x) - log baseline(y|x)]
              (summed over response tokens), the x-axis of the DPO paper's reward-vs-KL figure
    The baseline's draws use their own seed, so every method meets the same SFT samples.
    `baseline` is a model, or a state_dict that `policy`'s own module loads in turn (model.swapped_weights):
    simpo.py's way of evaluating against the SFT model without ever building a second network.
    baseline_vs_itself: also draw the baseline with the policy's seed and report its win rate against its
    own draws (`baseline_win_rate`): what `win_rate` would measure if the policy were the baseline, 1/2 up to
    the sampling noise of the evaluation, which this shows.
    """
    progress.phase = "evaluation"
    prompts = task.eval_prompts(n_samples).to(device)
    draw = lambda model, s: sample(model, prompts, MAX_RESPONSE, EOS_ID, BANNED_IN_RESPONSE, temperature,
                                   generator=make_generator(device, s))
    ys = draw(policy, seed)
    ids, mask = join(prompts, ys)
    lp_policy, _ = sequence_logps_all(policy, ids, mask)      # in batches, no gradients: --eval-samples may be large
    swap = swapped_weights(policy, baseline) if isinstance(baseline, dict) else contextlib.nullcontext(baseline)
    with swap as base_model:
        yb = draw(base_model, seed + 1)
        lp_base, _ = sequence_logps_all(base_model, ids, mask)   # the POLICY's samples, scored by the baseline
        yb_self = draw(base_model, seed) if baseline_vs_itself else None
    s_policy, s_base = score_responses(ys), score_responses(yb)
    cyclic = task.config.judge == "cyclic"

    def win_prob(a, b):   # P(a > b | x) under the run's judge, sample by sample
        if cyclic:
            return cyclic_preference_prob(school_of(a), school_of(b), task.config.cycle_prob)
        return preference_prob(score_responses(a), score_responses(b), task.config.tau)

    out = {"win_rate": win_prob(ys, yb).mean().item(),
           "score": s_policy.mean().item(), "baseline_score": s_base.mean().item(),
           "length": response_lengths(ys).float().mean().item(),
           "baseline_length": response_lengths(yb).float().mean().item(),
           "kl": (lp_policy - lp_base).mean().item(),
           "samples": ys.cpu(), "baseline_samples": yb.cpu(), "prompts": prompts.cpu()}
    if baseline_vs_itself:
        out["baseline_win_rate"] = win_prob(yb_self, yb).mean().item()
    if cyclic:   # where the game is cyclic: the school shares of both sample sets, and their exploitability [Nash]
        for prefix, samples in (("", ys), ("baseline_", yb)):
            shares = school_shares(samples)
            out[prefix + "school_shares"] = shares.tolist()
            out[prefix + "exploitability"] = school_exploitability(shares, task.config.cycle_prob)
    return out


def evaluate(policy, sft, task, device, n_samples=512, seed=0):
    """The run contract's evaluation: the trained policy against the SFT model on held-out prompts, and the
    SFT model against itself the same way (sft_win_rate_vs_sft: 1/2 up to sampling noise)."""
    r = head_to_head(policy, sft, task, device, n_samples, seed=10_000 + seed, baseline_vs_itself=True)
    out = {"win_rate_vs_sft": r["win_rate"], "score": r["score"], "sft_score": r["baseline_score"],
           "length": r["length"], "sft_length": r["baseline_length"], "kl_to_sft": r["kl"],
           "sft_win_rate_vs_sft": r["baseline_win_rate"],
           "samples": r["samples"], "sft_samples": r["baseline_samples"], "prompts": r["prompts"]}
    if "exploitability" in r:   # --judge cyclic
        out.update(school_shares=r["school_shares"], exploitability=r["exploitability"],
                   sft_school_shares=r["baseline_school_shares"], sft_exploitability=r["baseline_exploitability"])
    return out


@torch.no_grad()
def sample_mixture(models, prompts, generator):
    """One response per prompt row from the AVERAGE of `models` (SPPO's average of the iterates): each row picks
    one model uniformly at random, then samples from it. Returns responses [N, MAX_RESPONSE] and the picks [N]."""
    pick = torch.randint(len(models), (prompts.shape[0],), generator=generator, device=prompts.device)
    responses = torch.zeros(prompts.shape[0], MAX_RESPONSE, dtype=torch.long, device=prompts.device)
    for i, m in enumerate(models):
        rows = (pick == i).nonzero().squeeze(1)
        if len(rows):
            responses[rows] = sample(m, prompts[rows], MAX_RESPONSE, EOS_ID, BANNED_IN_RESPONSE, generator=generator)
    return responses.cpu(), pick.cpu()


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


# ----------------------------------------------------------------------------------------------------
# Summary: tables, completions and curves in the terminal (Unicode blocks, no plotting dependency)
# ----------------------------------------------------------------------------------------------------

def print_table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))


def print_completions(prompts, before, after, n=4, before_name="SFT", after_name="trained"):
    """The same held-out prompts, a sample before and after training, with the judge's score."""
    s_before, s_after = score_responses(before), score_responses(after)
    for i in range(min(n, len(prompts))):
        print(f"  prompt: {decode(prompts[i])}")
        print(f"    {before_name:>8} [{s_before[i]:+.2f}] {decode(before[i])}")
        print(f"    {after_name:>8} [{s_after[i]:+.2f}] {decode(after[i])}")


def chart(values, title, width=60, height=8):
    """A curve as Unicode block characters: `width` columns (each the mean of its span of values),
    `height` rows of eight levels each. Returns the lines, to be printed."""
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return [f"{title}: (no data)"]
    if len(values) > width:                          # average consecutive values into `width` columns
        edges = np.linspace(0, len(values), width + 1).astype(int)
        values = [float(np.mean(values[a:b])) for a, b in zip(edges[:-1], edges[1:])]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    levels = [round((v - lo) / span * (height * 8 - 1)) + 1 for v in values]   # 1..height*8
    blocks, bar, corner, rule = chart_glyphs()
    lines = [f"{title}  (min {lo:.3g}, max {hi:.3g}, {len(values)} columns)"]
    for row in range(height - 1, -1, -1):
        cells = "".join(blocks[min(8, max(0, lv - row * 8))] for lv in levels)
        label = f"{hi:9.3g} {bar}" if row == height - 1 else (f"{lo:9.3g} {bar}" if row == 0 else f"          {bar}")
        lines.append(label + cells)
    lines.append(f"          {corner}" + rule * len(values))
    return lines


def chart_glyphs(stream=None):
    """The characters of the charts: Unicode blocks, or ASCII where the terminal cannot show them
    (a non-UTF-8 locale, PYTHONIOENCODING=ascii). Returns (9 levels from empty to full, axis, corner, rule)."""
    fancy = (" ▁▂▃▄▅▆▇█", "│", "└", "─")
    try:
        "".join(fancy).encode((stream or sys.stdout).encoding or "ascii")
        return fancy
    except (UnicodeEncodeError, LookupError):
        return (" .,:;=+*#", "|", "+", "-")


SUMMARY_ROWS = [("win rate vs SFT", "win_rate_vs_sft", "{:.3f}"), ("score (judge)", "score", "{:+.3f}"),
                ("length (words)", "length", "{:.2f}"), ("KL to SFT (nats)", "kl_to_sft", "{:.2f}"),
                ("reward accuracy", "reward_accuracy", "{:.3f}"), ("ranking agreement", "ranking_agreement", "{:.3f}"),
                ("seconds per step", "seconds_per_step", "{:.4f}"), ("peak memory (MB)", "peak_memory_mb", "{:.2f}")]


def print_before_after(before, after, rows=SUMMARY_ROWS, names=("SFT", "trained")):
    """The end-of-run table: one row per metric, SFT on the left, the trained policy on the right.
    A metric missing on one side (a cost the SFT model never paid) prints as '-'."""
    cell = lambda d, key, fmt: fmt.format(d[key]) if d.get(key) is not None else "-"
    print_table(["", *names], [[label, cell(before, key, fmt), cell(after, key, fmt)] for label, key, fmt in rows])


def tied_reward_note(reward):
    """The line under the end-of-run table of a method whose reward is a log-ratio to the SFT model."""
    return textwrap.fill(f"SFT column: the SFT model is the reference, so its reward {reward} is 0 for every "
                         f"response and orders no held-out pair: its reward accuracy and ranking agreement are 0 "
                         f"by definition (a tie is not an ordering), not a judgement of the SFT model.", width=100)


def print_sft_vs_policy(method, result, metrics, sft_metrics=None, note=None):
    """The end-of-run table, then a few held-out completions before and after. The SFT column comes from the
    evaluation `result` (its win rate: the SFT model against itself, measured the same way as the policy;
    its KL to itself: 0), plus the `sft_metrics` (reward accuracy, ranking agreement) the method measured on
    the SFT model; `note`, if given, is printed under the table."""
    sft_row = {"win_rate_vs_sft": result["sft_win_rate_vs_sft"], "score": result["sft_score"],
               "length": result["sft_length"], "kl_to_sft": 0.0, **(sft_metrics or {})}
    if "exploitability" in result:   # --judge cyclic: the game's numbers too
        sft_row["exploitability"] = result["sft_exploitability"]
        print_before_after(sft_row, metrics, SUMMARY_ROWS + [("exploitability", "exploitability", "{:.3f}")])
        shares = lambda v: " / ".join(f"{x:.2f}" for x in v)
        print(f"school shares (story / acting / craft / none): SFT {shares(result['sft_school_shares'])}, "
              f"{method} {shares(result['school_shares'])}")
    else:
        print_before_after(sft_row, metrics)
    if note:
        print(note)
    print(f"\nHeld-out completions, SFT model and {method} policy (judge's score in brackets):")
    print_completions(result["prompts"], result["sft_samples"], result["samples"], after_name=method)


def print_curves(log_rows, curves):
    """One chart per (key in log.jsonl, title): what the run did, before the numbers."""
    for key, title in curves:
        for line in chart([r[key] for r in log_rows if key in r], title):
            print(line)


def shares_chart(shares, title, height=11, letters="sac"):
    """School shares per iteration [T][>= 3] as three lines of letters (s story, a acting, c craft; * where two
    meet), one column per iteration, share 0 at the bottom and 1 at the top. Returns the lines."""
    grid = [[" "] * len(shares) for _ in range(height)]
    for col, row_shares in enumerate(shares):
        for letter, share in zip(letters, row_shares):
            row = height - 1 - round(float(share) * (height - 1))
            grid[row][col] = letter if grid[row][col] == " " else "*"
    lines = [f"{title}  ({', '.join(f'{l} {n}' for l, n in zip(letters, SCHOOLS))})"]
    for r, cells in enumerate(grid):
        lines.append((" 1.0 │" if r == 0 else " 0.0 │" if r == height - 1 else "     │") + " ".join(cells))
    lines.append("     └" + "─" * (2 * len(shares) - 1))
    lines.append("      " + " ".join(str(t % 10) for t in range(len(shares))) + "   iteration")
    return lines


def scatter(points, x_title, y_title, width=56, height=14):
    """points: (label, x, y) -> lines of a text scatter plot, each point drawn as its label's first
    character (a legend below gives the values). The DPO paper's reward-vs-KL frontier, in miniature."""
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    x0, x1 = min(xs + [0.0]), max(xs) or 1.0
    y0, y1 = min(ys), max(ys)
    y0, y1 = (y0 - 0.05, y1 + 0.05) if y1 - y0 < 1e-9 else (y0, y1)
    grid = [[" "] * width for _ in range(height)]
    for label, x, y in points:
        col = round((x - x0) / ((x1 - x0) or 1.0) * (width - 1))
        row = round((y1 - y) / ((y1 - y0) or 1.0) * (height - 1))
        grid[row][col] = label[0]
    _, bar, corner, rule = chart_glyphs()
    lines = [f"{y_title} against {x_title}"]
    for r, cells in enumerate(grid):
        tick = f"{y1:7.2f} {bar}" if r == 0 else (f"{y0:7.2f} {bar}" if r == height - 1 else f"        {bar}")
        lines.append(tick + "".join(cells))
    lines.append(f"        {corner}" + rule * width)
    lines.append(f"         {x0:<10.2f}{x_title:^{width - 20}}{x1:>10.2f}")
    lines += [f"  {label[0]} = {label[2:] if label[1:2] == ':' else label}: {x_title} {x:.2f}, {y_title} {y:.3f}"
              for label, x, y in points]
    return lines


def chart_lines(series, title, width=60, height=10):
    """Several curves in ONE frame, on one shared scale: series is a list of (character, name, values),
    values per step, averaged into `width` columns as chart() does; each curve is drawn with its own
    character, and '*' where two meet. dpo.py draws log pi(y_w|x) and log pi(y_l|x) this way: both can
    fall, and which one falls faster is the point (README, "Reading your logs"). Returns the lines."""
    curves = []
    for char, name, values in series:
        values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        if len(values) > width:
            edges = np.linspace(0, len(values), width + 1).astype(int)
            values = [float(np.mean(values[a:b])) for a, b in zip(edges[:-1], edges[1:])]
        curves.append((char, values))
    every = [v for _, values in curves for v in values]
    if not every:
        return [f"{title}: (no data)"]
    lo, hi = min(every), max(every)
    n_cols = max(len(values) for _, values in curves)
    grid = [[" "] * n_cols for _ in range(height)]
    for char, values in curves:
        for col, v in enumerate(values):
            row = round((hi - v) / ((hi - lo) or 1.0) * (height - 1))   # the top row holds the maximum
            grid[row][col] = char if grid[row][col] in (" ", char) else "*"
    _, bar, corner, rule = chart_glyphs()
    lines = [f"{title}  (min {lo:.3g}, max {hi:.3g}, {n_cols} columns)"]
    for r, cells in enumerate(grid):
        label = f"{hi:9.3g} {bar}" if r == 0 else (f"{lo:9.3g} {bar}" if r == height - 1 else f"          {bar}")
        lines.append(label + "".join(cells))
    lines.append(f"          {corner}" + rule * n_cols)
    lines.append("           " + ", ".join(f"{char} = {name}" for char, name, _ in series) + ", * = both")
    return lines


# ----------------------------------------------------------------------------------------------------
# Exact mode (--exact): every response listed, a table for the policy, every expectation a finite sum
# ----------------------------------------------------------------------------------------------------
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
            self.pair_probs = self.sft_probs / torch.tensor(SFT_SCHOOL, dtype=torch.float64)[self.schools] / len(SCHOOLS)
        # prefs[a, b] = P(y_a > y_b | x), the judge on every pair: [C, C], 1/2 on the diagonal
        self.prefs = judge_prob(self.responses[:, None, :], self.responses[None, :, :], self.config)
        self.reward = (self.scores / self.config.tau + self.config.length_bias * self.words.double()
                       if self.config.judge == "bt" else None)                # no reward under the cyclic judge
        self._table = None

    def table(self, probs=None):
        """A model.TablePolicy over the responses, starting at `probs` (default: the SFT table)."""
        if self._table is None:    # the prefix tree is built once; every table after is a copy with other logits
            self._table = TablePolicy(self.responses, PROMPT_LEN, len(VOCAB))
        table = copy.deepcopy(self._table)
        with torch.no_grad():
            table.logits.copy_((self.sft_probs if probs is None else torch.as_tensor(probs, dtype=torch.float64)).log())
        return table

    def sequences(self, index=None):
        """input_ids and response mask of the responses at `index` (default: all), for model.sequence_logps."""
        responses = self.responses if index is None else self.responses[index]
        return join(self.prompts.expand(responses.shape[0], -1), responses)

    def index_of(self, responses):
        """The position in the list of each response [M, L'] (token ids, EOS then padding), -1 if not listed."""
        width = max(responses.shape[1], self.responses.shape[1])
        pad = lambda r: torch.nn.functional.pad(r, (0, width - r.shape[1]))
        same = (pad(responses.cpu())[:, None, :] == pad(self.responses)[None, :, :]).all(-1)   # [M, C]
        return torch.where(same.any(-1), same.long().argmax(-1), torch.full((responses.shape[0],), -1))

    def pair_batch(self, chosen, rejected):
        """The pairs (x, y_w = response chosen[i], y_l = response rejected[i]) as model.pair_logps takes them."""
        (chosen_ids, chosen_mask), (rejected_ids, rejected_mask) = self.sequences(chosen), self.sequences(rejected)
        return {"chosen_ids": chosen_ids, "chosen_mask": chosen_mask,
                "rejected_ids": rejected_ids, "rejected_mask": rejected_mask}

    def population_pairs(self, probs=None):
        """Every ordered pair (y_w, y_l), w != l, with its probability in the data: two reviews drawn from
        `probs` (default: pair_probs, the SFT table), y_w the one the judge picked: 2 pi(w) pi(l) P(w > l),
        normalised (pairs of one review twice are left out: their loss is the same for every policy).
        Returns chosen [M], rejected [M] (response indices) and weights [M] (float64, summing to 1)."""
        probs = self.pair_probs if probs is None else probs
        w = 2 * probs[:, None] * probs[None, :] * self.prefs
        w.fill_diagonal_(0.0)
        chosen, rejected = w.nonzero(as_tuple=True)
        return chosen, rejected, w[chosen, rejected] / w.sum()

    def sampled_pairs(self, n, seed=0, probs=None):
        """n pairs drawn as population_pairs describes, each label drawn from the judge (finite data):
        the same triples, weighted by how often they were drawn (counts / n)."""
        probs = self.pair_probs if probs is None else probs
        rng = np.random.default_rng(seed)
        a, b = (rng.choice(self.n, size=n, p=probs.numpy()) for _ in range(2))
        a_wins = rng.random(n) < self.prefs[a, b].numpy()
        counts = torch.zeros(self.n, self.n, dtype=torch.float64)
        counts.index_put_((torch.from_numpy(np.where(a_wins, a, b)), torch.from_numpy(np.where(a_wins, b, a))),
                          torch.ones(n, dtype=torch.float64), accumulate=True)
        chosen, rejected = counts.nonzero(as_tuple=True)
        return chosen, rejected, counts[chosen, rejected] / n

    def dpo_optimum(self, beta, ref_probs=None):
        """[DPO-opt] pi*(y) = pi_ref(y) exp(r(y)/beta) / Z, the KL-regularised optimum (Bradley-Terry judge)."""
        if self.reward is None:
            raise ValueError("the cyclic judge has no reward, so no pi*")
        ref_probs = self.sft_probs if ref_probs is None else ref_probs
        return torch.softmax(ref_probs.log() + self.reward / beta, dim=0)

    def simpo_optimum_gamma0(self, beta):
        """SimPO's minimiser when gamma = 0 (Bradley-Terry judge): the labels' Bradley-Terry likelihood is
        maximised by any reward r(y) = (beta/|y|) log pi(y) equal to the true r(y) + c, and a table can take
        every such reward, so pi(y) = exp(|y| (r(y) + c) / beta), with the one c that makes it sum to 1
        (found by bisection: the sum grows with c). |y| counts tokens, EOS included, as sequence_logps does."""
        if self.reward is None:
            raise ValueError("the cyclic judge has no reward")
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
        """[C] bool: the responses with the highest score (what the Bradley-Terry judge prefers to all others)."""
        return self.scores == self.scores.max()

    def school_shares(self, probs):
        """[3] the mass the policy puts on each school."""
        return torch.stack([probs[self.schools == i].sum() for i in range(len(SCHOOLS))])

    def mean_words(self, probs):
        return (probs * self.words.double()).sum().item()


def print_exact_groups(ex, named_probs, by="school"):
    """A small table: the mass each policy (name -> probs [C]) puts on each group of responses, grouped
    by school and score (by='school') or by length and score (by='length')."""
    rows = []
    for g in range(3):
        for level, (score, _) in enumerate(EXACT_TEMPLATES):
            member = ((ex.schools == g) if by == "school" else (ex.words == 2 * (g + 1))) & (ex.scores == score)
            label = f"{SCHOOLS[g] if by == 'school' else str(2 * (g + 1)) + ' words'}, score {score:+.1f}"
            rows.append([label] + [f"{p[member].sum().item():.4f}" for p in named_probs.values()])
    print_table([f"responses (by {by})", *named_probs], rows)


# ----------------------------------------------------------------------------------------------------
# Command line: python data.py [show | frontier | sample | curves | logps]
# ----------------------------------------------------------------------------------------------------

def read_metrics(run_dir):
    """(metrics dict, None) for a run folder whose metrics.json has what the frontier plots, else
    (None, one line saying what is wrong). Valid JSON of the wrong shape is an error too, not a crash."""
    import json
    path = os.path.join(run_dir, "metrics.json")
    try:
        with open(path) as f:
            m = json.load(f)
    except FileNotFoundError:
        return None, f"{run_dir}: no metrics.json (is it a run folder? runs write one at the end)"
    except (OSError, ValueError) as e:
        return None, f"{path}: unreadable ({type(e).__name__}: {str(e)[:100]})"
    if not isinstance(m, dict):
        return None, f"{path}: holds a JSON {type(m).__name__}, not the object a run writes"
    for key in ("kl_to_sft", "score", "sft_score"):
        if key not in m:
            return None, f"{path}: no {key!r} (keys: {', '.join(sorted(m)) or 'none'})"
        v = m[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return None, f"{path}: {key} is {json.dumps(v)}, not a finite number (a run that diverged?)"
    return m, None


def load_run(run_dir):
    """The trained policy of a run folder (its model.pt, on the CPU) and the run's arguments, or one
    clear line and exit 2: no model.pt, an unreadable one, or a file this project did not write."""
    from model import load_checkpoint
    path = os.path.join(run_dir, "model.pt")
    if not os.path.isfile(path):
        fail(f"no model.pt in {run_dir!r}: train one first, e.g. python simpo.py --out {run_dir}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        fail(f"{path} is unreadable (truncated or corrupt?): run the script again to rewrite it")
    if not (isinstance(ckpt, dict) and {"model", "config", "args"} <= set(ckpt)):
        fail(f"{path} is not a model.pt written by dpo.py, simpo.py or sppo.py")
    return load_checkpoint(path, "cpu")


def prompt_ids(text):
    """'new horror film' -> [BOS, new, horror, film, SEP], or one clear line naming the bad word."""
    words = text.split()
    if len(words) != 3:
        fail(f"--prompt takes three words, a decade, a genre and a noun (e.g. 'new horror film'); got {text!r}")
    for word, allowed, what in zip(words, (DECADES, GENRES, NOUNS), ("decade", "genre", "noun")):
        if word not in allowed:
            fail(f"--prompt: {word!r} is not a {what} of this task; the {what}s are: {' '.join(allowed)}")
    return [BOS_ID] + encode(text) + [SEP_ID]


def read_log(run_dir):
    """The rows of a run's log.jsonl, or one clear line and exit 2."""
    import json
    path = os.path.join(run_dir, "log.jsonl")
    try:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        fail(f"no log.jsonl in {run_dir!r}: train one first, e.g. python dpo.py --out {run_dir}")
    except (OSError, ValueError) as e:
        fail(f"{path} is unreadable ({type(e).__name__}: {str(e)[:100]})")
    if not rows or not all(isinstance(r, dict) for r in rows):
        fail(f"{path} holds no steps (a run with --steps 0?)" if not rows else f"{path}: not one JSON object per line")
    return rows


def displacement(policy, sft, task, n_samples=512, seed=0):
    """Where a trained policy put its probability mass, against the SFT model it started from: the mean
    log pi(y|x) (summed over the response) of five sets of reviews under both models. Returns
    [(name, sft_mean, policy_mean)]. The first two rows are what log.jsonl's logps/chosen and
    logps/rejected follow, over the whole training set; the others say where the mass went instead."""
    from model import sequence_logps_all
    cpu = torch.device("cpu")
    pol_pairs, sft_pairs = pair_logps_all(policy, task.pairs, cpu), pair_logps_all(sft, task.pairs, cpu)
    r = head_to_head(policy, sft, task, cpu, n_samples, seed=10_000 + seed)   # the evaluation's own samples
    # Reviews of five positive words (the judge's favourite kind), kept only if no pair holds them.
    g = torch.Generator().manual_seed(seed)
    words = torch.as_tensor(POS_IDS)[torch.randint(0, len(POS_IDS), (n_samples, 5), generator=g)]
    best = torch.full((n_samples, MAX_RESPONSE), PAD_ID)
    best[:, :5], best[:, 5] = words, EOS_ID
    in_pairs = {tuple(y.tolist()) for side in ("chosen", "rejected")
                for y in task.pairs[f"{side}_ids"][:, PROMPT_LEN:]}
    best = best[[tuple(y.tolist()) not in in_pairs for y in best]]
    rows = [("chosen y_w, training pairs", sft_pairs[0], pol_pairs[0]),
            ("rejected y_l, training pairs", sft_pairs[1], pol_pairs[1])]
    for name, prompts, responses in (("the policy's own samples", r["prompts"], r["samples"]),
                                     ("the SFT model's samples", r["prompts"], r["baseline_samples"]),
                                     ("5 positive words, in no pair", r["prompts"][:len(best)], best)):
        ids, mask = join(prompts, responses)
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
    import argparse
    import inspect
    import sys
    from model import nonneg_int, positive_float, positive_int, sample
    parser = argparse.ArgumentParser(description=inspect.cleandoc(main.__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="show", choices=["show", "frontier", "sample", "curves", "logps"])
    parser.add_argument("dirs", nargs="*", help="run folders (what dpo.py, simpo.py or sppo.py wrote with --out)")
    parser.add_argument("--prompt", default="new horror film", help="sample: decade genre noun (default: %(default)s)")
    parser.add_argument("-n", type=positive_int, default=5, help="sample: how many reviews (default: %(default)s)")
    parser.add_argument("--temperature", type=positive_float, default=1.0, help="sample: (default: %(default)s)")
    parser.add_argument("--seed", type=nonneg_int, default=0, help="sample: the sampler's seed (default: %(default)s)")
    parser.add_argument("--key", action="append", help="curves: a log.jsonl key, repeatable (default: loss)")
    args = parser.parse_args(argv)

    def one_dir():
        if len(args.dirs) != 1:
            fail(f"{args.command} takes one run folder, got {len(args.dirs)}")
        return args.dirs[0]

    if args.command == "frontier":
        if not args.dirs:
            fail("frontier needs at least one run folder")
        points, problems, first = [], [], None
        for d in args.dirs:
            m, problem = read_metrics(d)
            if problem:
                problems.append(problem)
                continue
            first = first or m
            beta = f", beta {m['beta']}" if m.get("beta") is not None else ""
            points.append((f"{chr(ord('A') + len(points))}:{os.path.basename(os.path.normpath(d))} "
                           f"({m.get('method', 'run')}{beta})", float(m["kl_to_sft"]), float(m["score"])))
        for problem in problems:                 # one line per bad folder, then no chart: a partial one misleads
            print(f"error: {problem}", file=sys.stderr)
        if problems:
            sys.exit(2)
        points.insert(0, ("S:the SFT model", 0.0, float(first["sft_score"])))   # where every run starts
        print("\n".join(scatter(points, "KL(policy || SFT)", "score")))
    elif args.command == "sample":
        d = one_dir()
        ids = prompt_ids(args.prompt)
        if args.n > 10_000:
            fail(f"-n {args.n}: at most 10000 reviews at once")
        if args.seed >= 2**63:
            fail(f"--seed must be below 2**63, got {args.seed}")
        policy, _ = load_run(d)
        reviews = sample(policy, torch.tensor([ids] * args.n), MAX_RESPONSE, EOS_ID, BANNED_IN_RESPONSE,
                         temperature=args.temperature, generator=torch.Generator().manual_seed(args.seed))
        for review in reviews:
            print(f"[{score('', decode(review)):+.2f}] {decode(review)}")
    elif args.command == "curves":
        d = one_dir()
        rows = read_log(d)
        keys = sorted({k for r in rows for k in r})
        for key in args.key or ["loss"]:
            if key not in keys:
                fail(f"{os.path.join(d, 'log.jsonl')} has no key {key!r}; its keys: {', '.join(keys)}")
            values = [r.get(key) for r in rows]
            if not any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                fail(f"{key!r} in {os.path.join(d, 'log.jsonl')} holds no numbers")
            values = [v if isinstance(v, (int, float)) and not isinstance(v, bool) else None for v in values]
            print("\n".join(chart(values, f"{key} per step ({d})")))
            numbers = [v for v in values if v is not None]
            tail = numbers[-max(1, len(numbers) // 10):]    # the last tenth: a batch mean is noisy, their mean less so
            print(f"{key}: first {numbers[0]:.4g}, last {numbers[-1]:.4g}, "
                  f"mean of the last {len(tail)} {'value' if len(tail) == 1 else 'values'} {sum(tail) / len(tail):.4g}")
    elif args.command == "logps":
        d = one_dir()
        policy, run_args = load_run(d)
        run_args = argparse.Namespace(**run_args)
        task = Task(task_config(run_args), seed=run_args.seed)
        sft, _ = sft_model(task, torch.device("cpu"), run_args.sft_dir, run_args.seed, run_args.sft_steps)
        print(f"mean log pi(y|x), nats summed over the response: the SFT model, then {d}'s policy")
        print_table(["reviews", "SFT", "policy", "change"],
                    [[name, f"{a:.2f}", f"{b:.2f}", f"{b - a:+.2f}"]
                     for name, a, b in displacement(policy, sft, task, seed=run_args.seed)])
    else:
        if args.dirs:
            fail("show takes no run folder (commands: show, frontier, sample, curves, logps)")
        a, b = "the acting was great and the music superb", "a dull plot but lovely cast"
        print(f"prompt: classic comedy film\n  a: {a}  score {score('', a):+.3f}\n  b: {b}  score {score('', b):+.3f}")
        print(f"  oracle P(a > b | x) = sigmoid(({score('', a):.2f} - {score('', b):.2f}) / tau) = {oracle('', a, b):.3f}")
        task = Task(TaskConfig(n_demos=8, n_pairs=4, n_heldout=4))
        print("\ntraining pairs (chosen / rejected, judge's score):")
        for i in range(4):
            p = task.pairs
            print(f"  {decode(p['chosen_ids'][i][:PROMPT_LEN])}\n"
                  f"    y_w [{p['chosen_score'][i]:+.2f}] {decode(p['chosen_ids'][i][PROMPT_LEN:])}\n"
                  f"    y_l [{p['rejected_score'][i]:+.2f}] {decode(p['rejected_ids'][i][PROMPT_LEN:])}")
        print(f"\nvocabulary: {len(VOCAB)} tokens; {len(DECADES) * len(GENRES) * len(NOUNS)} prompts")


if __name__ == "__main__":
    main()
