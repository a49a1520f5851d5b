"""
test_all.py: the tests of model.py, data.py, dpo.py, simpo.py and sppo.py (standard-library unittest only).

    python -m unittest test_all -v        (or: python -m pytest test_all.py)

Every test checks a value worked out independently of the code under test (by hand, in closed form, with
a plain Python loop) or an invariance the code promises (padding, batch order, seeds, caches). Sizes are
tiny so that the whole file runs in well under two minutes on a 2-core CPU.
"""

import argparse
import contextlib
import errno
import os

# The tests start several scripts at once; on 2 cores, OpenMP threads that spin while they wait would slow
# every process many times over, so they sleep instead (inherited by the subprocesses). Before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import glob
import inspect
import io
import itertools
import json
import math
import signal
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import dpo
import model
import simpo
import sppo

REPO = os.path.dirname(os.path.abspath(__file__))
CPU = torch.device("cpu")

# The keys every run's metrics.json carries (issues 2 and 3), and the TRL names of every log.jsonl line.
METRIC_KEYS = ["method", "seed", "device", "steps", "train_seconds", "seconds_per_step", "peak_memory_mb",
               "win_rate_vs_sft", "score", "sft_score", "length", "sft_length", "kl_to_sft",
               "reward_accuracy", "ranking_agreement"]
TIMING_KEYS = {"train_seconds", "seconds_per_step", "peak_memory_mb", "wall_seconds"}
LOG_KEYS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected"]
# A few-step run of a method script: the smallest settings the scripts accept that still exercise every stage.
TINY_RUN = ["--steps", "3", "--sft-steps", "5", "--eval-samples", "16", "--batch-size", "8", "--device", "cpu"]


def small_task(seed=0, **kw):
    return data.Task(data.TaskConfig(n_demos=64, n_pairs=16, n_heldout=16, **kw), seed=seed)


def sharp_model(seed=0):
    """A GPT whose next-token distributions are far from uniform (a freshly initialised one predicts
    about log(1/90) everywhere, which would hide an off-by-one in a log-prob test)."""
    torch.manual_seed(seed)
    m = model.GPT(model.GPTConfig())
    with torch.no_grad():
        m.wte.weight.mul_(20.0)    # tied with lm_head: logits of a few nats' spread
        m.wpe.weight.normal_(0.0, 0.5)
    m.eval()
    return m


def script(name, *args):
    """Start `python name args...` in the repo directory (not waited for)."""
    return subprocess.Popen([sys.executable, name, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_main(module, argv):
    """module.main() in this process with sys.argv = argv, its output silenced; returns stderr text."""
    err = io.StringIO()
    with mock.patch.object(sys, "argv", [module.__name__ + ".py", *argv]), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        module.main()
    return err.getvalue()


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ====================================================================================================
# model.py: the network, log-probs
# ====================================================================================================

class TestNetwork(unittest.TestCase):
    def test_vocab_size_matches_data(self):
        self.assertEqual(model.GPTConfig().vocab_size, len(data.VOCAB))

    def test_size(self):
        m = model.GPT(model.GPTConfig())
        self.assertTrue(5e4 <= model.num_params(m) <= 1e6, model.num_params(m))
        self.assertIs(m.lm_head.weight, m.wte.weight)             # weight tying

    def test_causal_mask(self):
        """Changing the token at position 7 never changes the logits of positions 0..6 (but does change 7)."""
        m = sharp_model(0)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(4, len(data.VOCAB), (3, 12), generator=g)
        changed = ids.clone()
        changed[:, 7] = (ids[:, 7] - 4 + 1) % (len(data.VOCAB) - 4) + 4   # a different real token
        with torch.no_grad():
            a, b = m(ids), m(changed)
        torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-5)
        self.assertGreater((a[:, 7:] - b[:, 7:]).abs().max().item(), 1e-2)

    def test_kv_cache_matches_full_forward(self):
        """Prompt through the cache in one pass, then one token at a time: the same logits as one full pass."""
        m = sharp_model(2)
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(4, len(data.VOCAB), (2, 15), generator=g)
        with torch.no_grad():
            full = m(ids)
            caches = [dict() for _ in m.blocks]
            parts = [m(ids[:, :5], caches)]
            for t in range(5, ids.shape[1]):
                parts.append(m(ids[:, t:t + 1], caches))
        torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)


class TestSequenceLogps(unittest.TestCase):
    """model.sequence_logps alone: log pi(y|x) = sum over response tokens of log pi(y_i | x, y_<i), and |y|."""

    @classmethod
    def setUpClass(cls):
        cls.m = sharp_model(4)
        task = small_task(seed=5)
        cls.ids, cls.mask = task.sft_ids[:5], task.sft_mask[:5]    # BOS prompt SEP response EOS PAD...

    def loop_logps(self, ids, mask):
        """The definition, one token at a time: each response token scored by a forward pass on its prefix."""
        out = []
        for b in range(ids.shape[0]):
            total = 0.0
            for t in range(1, ids.shape[1]):
                if mask[b, t]:
                    with torch.no_grad():
                        logits = self.m(ids[b:b + 1, :t])[0, -1]
                    total += torch.log_softmax(logits.double(), dim=-1)[ids[b, t]].item()
            out.append(total)
        return torch.tensor(out, dtype=torch.float64)

    def mistakes(self, ids, mask):
        """What the usual wrong versions return for these rows, each with its hint."""
        with torch.no_grad():
            logits = self.m(ids).double()                                     # [B, T, V]
        lsm = torch.log_softmax(logits, -1)
        shifted = lsm[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)        # log pi(token t+1 | tokens <= t)
        right = (shifted * mask[:, 1:]).sum(-1)
        raw = logits[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        not_pad = (ids[:, 1:] != data.PAD_ID).double()
        return [((lsm.gather(-1, ids[..., None]).squeeze(-1) * mask).sum(-1),
                 "no shift: position t's logits predict token t+1, so compare logits[:, :-1] with input_ids[:, 1:]"),
                ((shifted * mask[:, :-1]).sum(-1), "the mask is not shifted with the targets: use response_mask[:, 1:], "
                                                   "so the first response token counts and the token after EOS does not"),
                ((shifted * not_pad).sum(-1), "the prompt is counted: only response tokens (response_mask) count"),
                (shifted.sum(-1), "the mask is missing: the prompt and the padding are counted"),
                (right / mask.sum(-1), "averaged: log pi(y|x) is a SUM over response tokens (SimPO divides by |y| itself)"),
                ((raw * mask[:, 1:]).sum(-1), "raw logits: take log_softmax over the vocabulary first"),
                ((torch.log_softmax(logits[:, :-1], 1).gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]).sum(-1),
                 "log_softmax over the wrong dimension: it normalises over the vocabulary, dim=-1")]

    def logps(self, ids, mask):
        return attempt(self, model.sequence_logps, self.m, ids, mask, returns=("logps", "lengths"))

    def test_against_python_loop(self):
        self.assertTrue(len(set(self.mask.sum(1).tolist())) > 1, "want rows of different lengths")
        with torch.no_grad():
            logps, lengths = self.logps(self.ids, self.mask)
        expect_close(self, logps, self.loop_logps(self.ids, self.mask),
                     "log pi(y|x) of 5 demonstrations against a loop that scores each response token from its prefix",
                     self.mistakes(self.ids, self.mask), atol=1e-3, rtol=0)
        if logps.dtype != torch.float32:
            self.fail(f"log-probs must be float32 (log_softmax on logits.float()); got {logps.dtype}")

    def test_lengths_count_the_response_and_its_eos(self):
        prompt = torch.tensor([[data.BOS_ID] + data.encode("new horror film") + [data.SEP_ID]] * 2)
        r1 = data.encode("great acting") + [data.EOS_ID]                      # 2 words + EOS = 3 tokens
        r2 = data.encode("the plot was dull and boring") + [data.EOS_ID]      # 6 words + EOS = 7 tokens
        ids = torch.cat([prompt, torch.tensor([r1 + [data.PAD_ID] * 5, r2 + [data.PAD_ID] * 1])], dim=1)
        mask = torch.zeros_like(ids)
        mask[0, 5:8], mask[1, 5:12] = 1, 1                                  # the response tokens, EOS included
        with torch.no_grad():
            logps, lengths = self.logps(ids, mask)
        expect_close(self, lengths, t(3.0, 7.0), "|y| of 'great acting <eos>' and 'the plot was dull and boring <eos>'", [
            (t(2.0, 6.0), "the closing EOS is not counted: |y| is the number of response tokens, EOS included"),
            (t(8.0, 12.0), "the prompt is counted: |y| counts response tokens only"),
            (t(12.0, 12.0), "the padding and the prompt are counted: |y| is the sum of the response mask")])
        expect_close(self, logps, self.loop_logps(ids, mask), "log pi(y|x) of the same two reviews",
                     self.mistakes(ids, mask), atol=1e-3, rtol=0)

    def test_extra_right_padding_changes_nothing(self):
        ids = F.pad(self.ids, (0, 6))     # PAD is id 0
        mask = F.pad(self.mask, (0, 6))
        with torch.no_grad():
            a, la = self.logps(self.ids, self.mask)
            b, lb = self.logps(ids, mask)
        expect_close(self, b, a, "log pi(y|x) with 6 more PAD columns on the right: unchanged",
                     self.mistakes(ids, mask), atol=1e-4, rtol=0)
        expect_close(self, lb, la, "|y| with 6 more PAD columns on the right: unchanged (padding never counts)")

    def test_batch_order_changes_nothing(self):
        perm = torch.tensor([3, 0, 4, 2, 1])
        with torch.no_grad():
            a, la = self.logps(self.ids, self.mask)
            b, lb = self.logps(self.ids[perm], self.mask[perm])
        expect_close(self, b, a[perm], "log pi(y|x) of the same rows in another order: each row's own value, permuted",
                     atol=1e-4, rtol=0)
        expect_close(self, lb, la[perm], "|y| of the same rows in another order")

    def test_gradient_reaches_the_model(self):
        """Training differentiates log pi(y|x) with respect to the weights: nothing may be detached."""
        m = sharp_model(4)
        logps, _ = attempt(self, model.sequence_logps, m, self.ids, self.mask, returns=("logps", "lengths"))
        if not logps.requires_grad:
            self.fail("the log-probs carry no gradient: no .detach(), .item() or torch.no_grad() inside sequence_logps")
        logps.sum().backward()
        self.assertGreater(m.wte.weight.grad.abs().sum().item(), 0.0, "the token embeddings got no gradient")


# ====================================================================================================
# data.py: tokenizer, judge, task, metrics, chart
# ====================================================================================================

EXAMPLE_A = "the acting was great and the music superb"   # the docstring's worked example
EXAMPLE_B = "a dull plot but lovely cast"


class TestJudge(unittest.TestCase):
    def test_encode_decode_round_trip(self):
        ids = data.encode(EXAMPLE_A) + [data.EOS_ID, data.PAD_ID, data.PAD_ID]
        self.assertEqual(data.decode(ids), EXAMPLE_A)
        self.assertEqual(data.decode(torch.tensor(ids)), EXAMPLE_A)

    def test_score_worked_example(self):
        # a: the acting was GREAT and the music SUPERB -> 8 words, 2 positive, 0 negative
        self.assertAlmostEqual(data.score("classic comedy film", EXAMPLE_A), (2 - 0) / 8, places=6)
        # b: a DULL plot but LOVELY cast -> 6 words, 1 positive, 1 negative
        self.assertAlmostEqual(data.score("classic comedy film", EXAMPLE_B), (1 - 1) / 6, places=6)
        # c: terrible boring script -> 3 words, 0 positive, 2 negative
        self.assertAlmostEqual(data.score("", "terrible boring script"), (0 - 2) / 3, places=6)
        self.assertEqual(data.score("new horror film", EXAMPLE_A), data.score("old war sequel", EXAMPLE_A))

    def test_score_matches_word_count_on_task_pairs(self):
        """score_responses against counting the words of the decoded text."""
        task = small_task(seed=7)
        pos, neg = set(data.POSITIVE), set(data.NEGATIVE)
        for side in ("chosen", "rejected"):
            for row, s in zip(task.pairs[f"{side}_ids"], task.pairs[f"{side}_score"]):
                words = data.decode(row[data.PROMPT_LEN:]).split()
                expect = (sum(w in pos for w in words) - sum(w in neg for w in words)) / len(words)
                self.assertAlmostEqual(s.item(), expect, places=6)

    def test_length_alone_does_not_raise_score(self):
        base = data.score("", EXAMPLE_A)
        self.assertAlmostEqual(data.score("", EXAMPLE_A + " " + EXAMPLE_A), base, places=6)   # twice as long
        self.assertLess(data.score("", EXAMPLE_A + " the plot and the story"), base)           # neutral filler
        self.assertLessEqual(data.score("", "great " + " ".join(["the"] * 15)), data.score("", "great"))
        ids = torch.tensor([data.encode(EXAMPLE_A) + [data.EOS_ID]])
        padded = F.pad(ids, (0, 7))                                                         # extra PAD
        self.assertEqual(data.score_responses(ids).item(), data.score_responses(padded).item())

    def test_oracle_symmetry_and_direction(self):
        g = torch.Generator().manual_seed(0)
        sa, sb = torch.rand(200, generator=g) * 2 - 1, torch.rand(200, generator=g) * 2 - 1
        for tau in (0.05, 0.2, 1.0):
            pab, pba = data.preference_prob(sa, sb, tau), data.preference_prob(sb, sa, tau)
            torch.testing.assert_close(pab + pba, torch.ones(200), rtol=0, atol=1e-6)
            self.assertTrue(torch.equal(pab > 0.5, sa > sb))
        self.assertEqual(data.preference_prob(0.3, 0.3, 0.2).item(), 0.5)
        # smaller tau: a sharper judge
        self.assertGreater(data.preference_prob(0.3, 0.1, 0.1).item(), data.preference_prob(0.3, 0.1, 0.5).item())
        p = data.oracle("x", EXAMPLE_A, EXAMPLE_B)
        self.assertAlmostEqual(p + data.oracle("x", EXAMPLE_B, EXAMPLE_A), 1.0, places=6)

    def test_oracle_worked_example(self):
        # sigmoid((0.25 - 0.0) / 0.2) = 1 / (1 + exp(-1.25))
        self.assertAlmostEqual(data.oracle("classic comedy film", EXAMPLE_A, EXAMPLE_B),
                               1 / (1 + math.exp(-0.25 / 0.2)), places=6)


class TestTask(unittest.TestCase):
    def tensors(self, task):
        out = {"train_prompts": task.train_prompts, "heldout_prompts": task.heldout_prompts,
               "sft_ids": task.sft_ids, "sft_mask": task.sft_mask,
               "sft_heldout_ids": task.sft_heldout_ids, "sft_heldout_mask": task.sft_heldout_mask}
        out.update({f"pairs/{k}": v for k, v in task.pairs.items()})
        out.update({f"heldout_pairs/{k}": v for k, v in task.heldout_pairs.items()})
        return out

    def test_reproducible_with_a_seed(self):
        a, b, c = self.tensors(small_task(seed=3)), self.tensors(small_task(seed=3)), self.tensors(small_task(seed=4))
        for k in a:
            self.assertTrue(torch.equal(a[k], b[k]), k)
        self.assertFalse(torch.equal(a["train_prompts"], c["train_prompts"]))
        self.assertFalse(torch.equal(a["sft_ids"], c["sft_ids"]))
        self.assertFalse(torch.equal(a["pairs/chosen_ids"], c["pairs/chosen_ids"]))

    def test_heldout_prompts_disjoint_from_train(self):
        task = small_task(seed=8)
        rows = lambda t: {tuple(r.tolist()) for r in t}
        train, held = rows(task.train_prompts), rows(task.heldout_prompts)
        self.assertEqual(len(train & held), 0)
        self.assertEqual(len(train) + len(held), len(data.DECADES) * len(data.GENRES) * len(data.NOUNS))
        P = data.PROMPT_LEN
        self.assertLessEqual(rows(task.sft_ids[:, :P]), train)
        self.assertLessEqual(rows(task.pairs["chosen_ids"][:, :P]), train)
        self.assertLessEqual(rows(task.sft_heldout_ids[:, :P]), held)
        self.assertLessEqual(rows(task.heldout_pairs["chosen_ids"][:, :P]), held)
        self.assertLessEqual(rows(task.eval_prompts(50)), held)
        self.assertTrue(torch.equal(task.pairs["chosen_ids"][:, :P], task.pairs["rejected_ids"][:, :P]))

    def test_labels_are_sampled_from_the_oracle(self):
        """The higher-scoring response is chosen at the rate the oracle predicts: not always (noisy
        raters), not at chance. Expected rate: mean of sigmoid(|s_a - s_b| / tau) over the pairs."""
        task = data.Task(data.TaskConfig(n_demos=8, n_pairs=3000, n_heldout=8), seed=9)
        cs, rs = task.pairs["chosen_score"].double(), task.pairs["rejected_score"].double()
        differ = cs != rs
        observed = (cs[differ] > rs[differ]).double().mean().item()
        expected = torch.sigmoid((cs[differ] - rs[differ]).abs() / task.config.tau).mean().item()
        se = math.sqrt(expected * (1 - expected) / differ.sum().item())
        self.assertLess(abs(observed - expected), 5 * se)
        self.assertLess(observed, 0.97)

    def test_length_bias_knob(self):
        cfg = dict(n_demos=8, n_pairs=2000, n_heldout=8)
        words = lambda ids: data.response_lengths(ids[:, data.PROMPT_LEN:]).double()
        plain = data.Task(data.TaskConfig(**cfg), seed=10).pairs
        biased = data.Task(data.TaskConfig(length_bias=0.5, **cfg), seed=10).pairs
        gap = lambda p: (words(p["chosen_ids"]) - words(p["rejected_ids"])).mean().item()
        self.assertGreater(words(biased["chosen_ids"]).mean().item(), words(plain["chosen_ids"]).mean().item() + 1.0)
        self.assertGreater(gap(biased), 2.0)
        self.assertLess(abs(gap(plain)), 1.0)     # unbiased raters: no systematic length gap

    def test_pair_style_knob(self):
        cfg = dict(n_demos=500, n_pairs=1000, n_heldout=8, demo_style_rate=0.0)
        style = torch.as_tensor(data.STYLE_IDS)
        share = lambda ids: (torch.isin(ids[:, data.PROMPT_LEN:], style).sum()
                             / data.response_lengths(ids[:, data.PROMPT_LEN:]).sum()).item()
        plain = data.Task(data.TaskConfig(**cfg), seed=11)
        styled = data.Task(data.TaskConfig(pair_style=1.0, **cfg), seed=11)
        self.assertEqual(share(plain.pairs["chosen_ids"]), 0.0)
        self.assertGreater(share(styled.pairs["chosen_ids"]), 0.05)
        self.assertGreater(share(styled.pairs["rejected_ids"]), 0.05)
        self.assertEqual(share(styled.sft_ids), 0.0)              # the SFT data keeps its own style
        # the judge ignores style: the stored scores are the scores of the text
        for row, s in zip(styled.pairs["chosen_ids"][:50], styled.pairs["chosen_score"][:50]):
            self.assertAlmostEqual(data.score("", data.decode(row[data.PROMPT_LEN:])), s.item(), places=6)


class TestMetricsAndChart(unittest.TestCase):
    def test_scatter_places_points_by_value(self):
        lines = data.scatter([("A:low", 0.0, 0.0), ("B:high", 4.0, 1.0), ("C:mid", 2.0, 0.5)], "KL", "score",
                             width=41, height=11)
        grid = lines[1:12]                                       # the plot rows, top row = highest score
        row_of = {ch: next(r for r, line in enumerate(grid) if ch in line.split("│", 1)[1]) for ch in "ABC"}
        col_of = {ch: grid[row_of[ch]].split("│", 1)[1].index(ch) for ch in "ABC"}
        self.assertEqual((row_of["B"], row_of["C"], row_of["A"]), (0, 5, 10))   # score 1, 0.5, 0 top to bottom
        self.assertEqual((col_of["A"], col_of["C"], col_of["B"]), (0, 20, 40))  # KL 0, 2, 4 left to right
        self.assertTrue(any(line.strip().startswith("B = high") for line in lines))

    def test_frontier_command(self):
        with tempfile.TemporaryDirectory() as d:
            for name, kl, sc in (("run_a", 1.5, 0.4), ("run_b", 3.0, 0.8)):
                os.makedirs(os.path.join(d, name))
                with open(os.path.join(d, name, "metrics.json"), "w") as f:
                    json.dump({"method": "dpo", "beta": 0.1, "kl_to_sft": kl, "score": sc, "sft_score": 0.0}, f)
            ok = subprocess.run([sys.executable, "data.py", "frontier", os.path.join(d, "run_a"), os.path.join(d, "run_b")],
                                cwd=REPO, capture_output=True, text=True)
            self.assertEqual(ok.returncode, 0, ok.stderr)
            self.assertIn("B = run_b (dpo, beta 0.1): KL(policy || SFT) 3.00, score 0.800", ok.stdout)
            self.assertIn("S = the SFT model: KL(policy || SFT) 0.00, score 0.000", ok.stdout)
            bad = subprocess.run([sys.executable, "data.py", "frontier", os.path.join(d, "missing")],
                                 cwd=REPO, capture_output=True, text=True)
            self.assertEqual(bad.returncode, 2)
            self.assertIn("error:", bad.stderr)
            self.assertNotIn("Traceback", bad.stderr)

    def test_ranking_metrics_constructed_case(self):
        chosen_rewards = torch.tensor([1.0, 2.0, 3.0, 4.0])
        rejected_rewards = torch.tensor([0.0, 3.0, 2.0, 5.0])      # reward puts y_w first: T F T F -> 0.5
        chosen_logps = torch.tensor([-8.0, -8.0, -6.0, -4.0])
        chosen_lengths = torch.tensor([8.0, 4.0, 3.0, 2.0])        # averages -1 -2 -2 -2
        rejected_logps = torch.tensor([-4.0, -3.0, -2.0, -1.0])
        rejected_lengths = torch.tensor([2.0, 3.0, 2.0, 1.0])      # averages -2 -1 -1 -1: T F F F
        m = data.ranking_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps,
                                 chosen_lengths, rejected_lengths)
        self.assertAlmostEqual(m["reward_accuracy"], 2 / 4)
        # agreement of T F T F with T F F F: 3 of 4 (the SUMMED log-probs, F F F F, would give 2 of 4)
        self.assertAlmostEqual(m["ranking_agreement"], 3 / 4)
        # a tie in reward is not a correct ordering
        m = data.ranking_metrics(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]), torch.tensor([-1.0, -1.0]),
                                 torch.tensor([-2.0, -2.0]), torch.ones(2), torch.ones(2))
        self.assertAlmostEqual(m["reward_accuracy"], 1 / 2)
        # length decides: -4 over 4 tokens beats -3 over 1 token on average (summed it would lose)
        m = data.ranking_metrics(chosen_rewards, torch.tensor([0.0, 1.0, 2.0, 5.0]),   # T T T F
                                 torch.full((4,), -4.0), torch.full((4,), -3.0),
                                 torch.full((4,), 4.0), torch.ones(4))                 # averages -1 vs -3: T T T T
        self.assertAlmostEqual(m["reward_accuracy"], 3 / 4)
        self.assertAlmostEqual(m["ranking_agreement"], 3 / 4)

    def column_heights(self, lines, height):
        """Sum the block levels of each column over the chart's rows (the rows after the title)."""
        blocks = " ▁▂▃▄▅▆▇█"
        rows = [line.split("│", 1)[1] for line in lines[1:1 + height]]
        return [sum(blocks.index(r[c]) for r in rows) for c in range(len(rows[0]))]

    def test_chart_rises_with_a_rising_series(self):
        h = self.column_heights(data.chart(list(range(12)), "rising", width=60, height=4), 4)
        self.assertEqual(len(h), 12)
        self.assertTrue(all(a < b for a, b in zip(h, h[1:])), h)
        self.assertEqual(h[-1], 4 * 8)                             # the maximum fills its column
        self.assertLessEqual(h[0], 1)                              # the minimum at most one eighth
        # more values than columns: averaged into `width` columns, still rising
        h = self.column_heights(data.chart([x * x for x in range(200)], "t", width=20, height=3), 3)
        self.assertEqual(len(h), 20)
        self.assertTrue(all(a <= b for a, b in zip(h, h[1:])) and h[0] < h[-1], h)
        h = self.column_heights(data.chart(list(range(10, 0, -1)), "falling", width=60, height=2), 2)
        self.assertTrue(all(a > b for a, b in zip(h, h[1:])), h)
        self.assertEqual(len(data.chart([], "empty")), 1)


# ====================================================================================================
# model.py: sampling
# ====================================================================================================

class FixedLogits(nn.Module):
    """A stand-in model whose next-token logits are the same row for every position."""

    def __init__(self, row):
        super().__init__()
        self.row = row
        self.blocks = nn.ModuleList()

    def forward(self, idx, caches=None):
        return self.row.expand(idx.shape[0], idx.shape[1], -1)


class TestSampling(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.m = sharp_model(12)
        cls.prompts = small_task(seed=12).eval_prompts(200)

    def draw(self, seed, **kw):
        return model.sample(self.m, self.prompts, data.MAX_RESPONSE, data.EOS_ID, data.BANNED_IN_RESPONSE,
                            generator=model.make_generator(CPU, seed), **kw)

    def test_reproducible_with_a_generator_seed(self):
        a, b, c = self.draw(0), self.draw(0), self.draw(1)
        self.assertTrue(torch.equal(a, b))
        self.assertFalse(torch.equal(a, c))

    def test_does_not_touch_global_rng(self):
        torch.manual_seed(123)
        state = torch.random.get_rng_state()
        self.draw(0)
        self.draw(0, use_cache=False)
        self.assertTrue(torch.equal(state, torch.random.get_rng_state()))

    def check_rows(self, ys):
        """Every row: allowed tokens, then EOS, then only PAD. Returns the EOS positions."""
        ends = []
        for row in ys.tolist():
            self.assertIn(data.EOS_ID, row)
            e = row.index(data.EOS_ID)
            ends.append(e)
            self.assertTrue(all(t == data.PAD_ID for t in row[e + 1:]), row)
            self.assertTrue(all(t not in data.BANNED_IN_RESPONSE for t in row[:e]), row)
        return ends

    def test_rows_end_in_eos_then_pad_and_never_banned(self):
        for use_cache in (True, False):
            ys = self.draw(2, use_cache=use_cache)
            self.assertEqual(tuple(ys.shape), (200, data.MAX_RESPONSE))
            self.check_rows(ys)
        # a model that says EOS with probability 0.15 at every step (and would rather say PAD, BOS, SEP):
        # both ways of ending occur, EOS drawn early and EOS forced at the last position
        V = len(data.VOCAB)
        probs = torch.full((V,), 0.85 / (V - 4))
        probs[data.EOS_ID] = 0.15
        row = probs.log()
        row[list(data.BANNED_IN_RESPONSE)] = 50.0
        ys = model.sample(FixedLogits(row), self.prompts, data.MAX_RESPONSE, data.EOS_ID, data.BANNED_IN_RESPONSE,
                          generator=model.make_generator(CPU, 0))
        ends = torch.tensor(self.check_rows(ys), dtype=torch.float64)
        self.assertEqual(ends.min().item(), 0)
        self.assertEqual(ends.max().item(), data.MAX_RESPONSE - 1)
        # P(EOS drawn at step i) = 0.85^i * 0.15 for i < 16; the rest forced at 16: E[end] = sum_i 0.85^i, i<16
        expected = sum(0.85 ** i for i in range(data.MAX_RESPONSE - 1))
        self.assertLess(abs(ends.mean().item() - expected), 1.5)

    def test_cache_and_no_cache_give_identical_samples(self):
        self.assertTrue(torch.equal(self.draw(3), self.draw(3, use_cache=False)))

    def test_banned_ids_never_drawn_even_when_most_likely(self):
        V = len(data.VOCAB)
        good, bad = data.STOI["good"], data.STOI["bad"]
        row = torch.full((V,), float("-inf"))
        row[list(data.BANNED_IN_RESPONSE)] = 50.0               # what an unconstrained sampler would draw
        row[good], row[bad] = math.log(0.75), math.log(0.25)
        stub = FixedLogits(row)
        prompts = torch.zeros(4000, data.PROMPT_LEN, dtype=torch.long)
        ys = model.sample(stub, prompts, 2, data.EOS_ID, data.BANNED_IN_RESPONSE,
                          generator=model.make_generator(CPU, 0))
        self.assertTrue(torch.isin(ys[:, 0], torch.tensor([good, bad])).all())
        self.assertTrue((ys[:, 1] == data.EOS_ID).all())        # closed by force at max_new_tokens
        # temperature 1 draws with the model's probabilities, 0.5 squares the odds: 0.75^2/(0.75^2+0.25^2)
        se = math.sqrt(0.25 * 0.75 / 4000)
        self.assertLess(abs((ys[:, 0] == good).double().mean().item() - 0.75), 5 * se)
        ys = model.sample(stub, prompts, 2, data.EOS_ID, data.BANNED_IN_RESPONSE, temperature=0.5,
                          generator=model.make_generator(CPU, 0))
        self.assertLess(abs((ys[:, 0] == good).double().mean().item() - 0.9), 5 * math.sqrt(0.09 / 4000))
        ys = model.sample(stub, prompts, 2, data.EOS_ID, data.BANNED_IN_RESPONSE, top_k=1,
                          generator=model.make_generator(CPU, 0))
        self.assertTrue((ys[:, 0] == good).all())               # top-1: the most likely allowed token


# ====================================================================================================
# model.py: SFT cache, checkpoints, evaluation helpers
# ====================================================================================================

def state_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class TestSFTCache(unittest.TestCase):
    def sft(self, task, d, steps=8):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            m, info = model.sft_model(task, CPU, d, seed=0, steps=steps, quiet=True)
        return m, info, err.getvalue()

    def test_cache_reused_rebuilt_after_corruption_and_on_key_mismatch(self):
        task = small_task(seed=13)
        with tempfile.TemporaryDirectory() as d:
            m1, info1, _ = self.sft(task, d)
            self.assertFalse(info1["cached"])
            self.assertTrue(os.path.exists(info1["path"]))
            self.assertLess(info1["ce_after"], info1["ce_before"])          # SFT lowers held-out CE
            w1 = m1.state_dict()

            # reused: loaded, not retrained (an optimiser would mean training), same weights
            with mock.patch.object(torch.optim, "AdamW", side_effect=AssertionError("retrained")):
                m2, info2, _ = self.sft(task, d)
            self.assertTrue(info2["cached"])
            self.assertEqual(info2["path"], info1["path"])
            self.assertEqual(info2["ce_after"], info1["ce_after"])
            self.assertTrue(state_equal(w1, m2.state_dict()))

            # corrupt: rebuilt with a one-line notice, the same weights again (same seed), then loads
            with open(info1["path"], "wb") as f:
                f.write(b"this is not a checkpoint\x00\xff" * 10)
            m3, info3, err = self.sft(task, d)
            self.assertFalse(info3["cached"])
            lines = err.strip().splitlines()
            self.assertEqual(len(lines), 1, err)
            self.assertIn(info1["path"], lines[0])
            self.assertNotIn("Traceback", err)
            self.assertTrue(state_equal(w1, m3.state_dict()))
            _, info4, _ = self.sft(task, d)
            self.assertTrue(info4["cached"])

            # a cache whose stored key disagrees with this run's settings is rebuilt
            ckpt = torch.load(info1["path"], weights_only=True)
            ckpt["key"]["steps"] = 999
            torch.save(ckpt, info1["path"])
            _, info5, err = self.sft(task, d)
            self.assertFalse(info5["cached"])
            self.assertEqual(len(err.strip().splitlines()), 1, err)
            self.assertEqual(torch.load(info1["path"], weights_only=True)["key"]["steps"], 8)

            # a different setting (steps, task, seed) is a different cache file
            _, info6, _ = self.sft(task, d, steps=3)
            self.assertFalse(info6["cached"])
            self.assertNotEqual(info6["path"], info1["path"])
            self.assertEqual(glob.glob(os.path.join(d, "*.tmp-*")), [])


class TestCheckpoint(unittest.TestCase):
    def test_round_trip_same_logits_plain_types(self):
        m = sharp_model(14)
        args = argparse.Namespace(beta=0.1, out="x", flag=True, seed=3, nothing=None, odd=[1, 2])
        ids = small_task(seed=14).sft_ids[:4]
        with tempfile.TemporaryDirectory() as d:
            model.save_run(d, m, args, {"method": "test", "score": 0.5}, [{"step": 0, "loss": 0.7}])
            self.assertEqual(sorted(os.listdir(d)), ["log.jsonl", "metrics.json", "model.pt"])  # no *.tmp-*
            ckpt = torch.load(os.path.join(d, "model.pt"), weights_only=True)
            self.assertEqual(set(ckpt), {"model", "config", "args"})
            self.assertIsInstance(ckpt["config"], dict)
            self.assertEqual(model.GPTConfig(**ckpt["config"]), m.config)
            self.assertEqual(ckpt["args"], {"beta": 0.1, "out": "x", "flag": True, "seed": 3, "nothing": None,
                                            "odd": "[1, 2]"})
            loaded, loaded_args = model.load_checkpoint(os.path.join(d, "model.pt"))
            self.assertEqual(loaded_args["beta"], 0.1)
            self.assertEqual(read_json(os.path.join(d, "metrics.json")), {"method": "test", "score": 0.5})
            self.assertEqual(read_jsonl(os.path.join(d, "log.jsonl")), [{"step": 0, "loss": 0.7}])
        with torch.no_grad():
            self.assertTrue(torch.equal(m(ids), loaded(ids)))

    def test_corrupt_or_missing_checkpoint_exits_2(self):
        with tempfile.TemporaryDirectory() as d:
            bad = os.path.join(d, "model.pt")
            with open(bad, "wb") as f:
                f.write(b"garbage" * 20)
            for path in (bad, os.path.join(d, "missing.pt")):
                err = io.StringIO()
                with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as cm:
                    model.load_checkpoint(path)
                self.assertEqual(cm.exception.code, 2)
                self.assertIn(path, err.getvalue())
                self.assertEqual(len(err.getvalue().strip().splitlines()), 1)


class TestEvaluationHelpers(unittest.TestCase):
    def test_frozen_copy(self):
        m = sharp_model(15)
        m.train()
        ref = model.frozen_copy(m)
        self.assertFalse(ref.training)
        self.assertTrue(all(not p.requires_grad for p in ref.parameters()))
        self.assertTrue(all(p.requires_grad for p in m.parameters()))
        with torch.no_grad():
            next(m.parameters()).add_(1.0)
        self.assertFalse(torch.equal(next(m.parameters()), next(ref.parameters())))   # not shared

    def test_swapped_weights_and_state_dict_baseline(self):
        """head_to_head against a state_dict (simpo.py's way) equals head_to_head against a model holding
        those weights, and the policy gets its own weights back."""
        task = small_task(seed=16)
        policy, base = sharp_model(16), sharp_model(17)
        before = {k: v.clone() for k, v in policy.state_dict().items()}
        a = data.head_to_head(policy, base, task, CPU, 24, seed=5)
        b = data.head_to_head(policy, base.state_dict(), task, CPU, 24, seed=5)
        for k in ("win_rate", "score", "baseline_score", "length", "baseline_length", "kl"):
            self.assertAlmostEqual(a[k], b[k], places=5, msg=k)
        self.assertTrue(torch.equal(a["baseline_samples"], b["baseline_samples"]))
        self.assertTrue(state_equal(before, policy.state_dict()))
        # the baseline's samples do not depend on the policy: every method meets the same SFT samples
        other = data.head_to_head(sharp_model(18), base.state_dict(), task, CPU, 24, seed=5)
        self.assertTrue(torch.equal(other["baseline_samples"], b["baseline_samples"]))
        self.assertFalse(torch.equal(other["samples"], b["samples"]))
        # against itself: KL exactly 0
        c = data.head_to_head(policy, policy, task, CPU, 24, seed=5)
        self.assertEqual(c["kl"], 0.0)
        self.assertNotEqual(a["kl"], 0.0)


# ====================================================================================================
# The run contract: bad arguments
# ====================================================================================================

class TestArguments(unittest.TestCase):
    def test_number_parsers(self):
        for parse, bad, good in [(model.positive_float, ["0", "-1", "abc", "nan", "inf", ""], [("0.5", 0.5)]),
                                 (model.positive_int, ["0", "-3", "1.5", "x"], [("7", 7)]),
                                 (model.nonneg_int, ["-1", "2.0"], [("0", 0)]),
                                 (model.nonneg_float, ["-0.1", "nan"], [("0", 0.0)])]:
            for text in bad:
                with self.assertRaises(argparse.ArgumentTypeError, msg=text):
                    parse(text)
            for text, value in good:
                self.assertEqual(parse(text), value)

    def test_defaults_and_help_text(self):
        for module, method in ((dpo, "dpo"), (simpo, "simpo")):
            args = module.parser.parse_args([])
            self.assertEqual(args.out, f"out/{method}")
            self.assertEqual(args.sft_dir, "out/sft")             # one SFT cache shared by every method
            self.assertEqual(args.device, "auto")
            for action in module.parser._actions:
                self.assertTrue(action.help, action.dest)         # every flag says what it does

    def test_in_process_failures_exit_2(self):
        with tempfile.NamedTemporaryFile() as f:
            for call in (lambda: model.prepare_out_dir(os.path.join(f.name, "sub")),
                         lambda: model.fail("boom")):
                err = io.StringIO()
                with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as cm:
                    call()
                self.assertEqual(cm.exception.code, 2)
                self.assertTrue(err.getvalue().startswith("error:"), err.getvalue())

    def test_bad_arguments_rejected_without_traceback(self):
        with tempfile.TemporaryDirectory() as d:
            blocker = os.path.join(d, "a-file")
            with open(blocker, "w") as f:
                f.write("not a folder")
            # tiny settings, so that a value wrongly accepted costs a short run, not a default one
            safe = ["--out", os.path.join(d, "out"), "--sft-dir", os.path.join(d, "sft"), "--device", "cpu",
                    "--steps", "1", "--sft-steps", "1", "--eval-samples", "4", "--batch-size", "4"]
            unwritable = os.path.join(blocker, "sub")
            cases = [("dpo.py", ["--beta", "-1"], "--beta"), ("dpo.py", ["--lr", "0"], "--lr"),
                     ("dpo.py", ["--batch-size", "0"], "--batch-size"), ("dpo.py", ["--steps", "-1"], "--steps"),
                     ("dpo.py", ["--lr", "abc"], "--lr"), ("simpo.py", ["--gamma", "-1"], "--gamma"),
                     ("dpo.py", ["--out", unwritable], unwritable)]
            if not torch.cuda.is_available():
                cases.append(("simpo.py", ["--device", "cuda"], "cuda"))
            procs = []
            for i in range(0, len(cases), 4):                   # a few at a time: 2 cores
                batch = [(name, args, expect, script(name, *safe, *args)) for name, args, expect in cases[i:i + 4]]
                for name, args, expect, p in batch:
                    out, err = p.communicate(timeout=300)
                    procs.append((name, args, expect, p.returncode, err))
            for name, args, expect, rc, err in procs:
                with self.subTest(script=name, args=args):
                    self.assertEqual(rc, 2, err)
                    self.assertNotIn("Traceback", err)
                    self.assertIn("error", err.lower())
                    self.assertIn(expect, err)                  # the message names what was wrong
            self.assertFalse(os.path.exists(os.path.join(d, "sft")))   # rejected before any training


    def test_more_bad_arguments_in_process(self):
        """The same contract through main() in this process (cheaper than a process per case): SystemExit(2),
        a message naming the flag, and nothing else escaping (an exception here would be a traceback there)."""
        with tempfile.TemporaryDirectory() as d:
            safe = ["--out", os.path.join(d, "out"), "--sft-dir", os.path.join(d, "sft"), "--device", "cpu",
                    "--steps", "1", "--sft-steps", "1", "--eval-samples", "4", "--batch-size", "4"]
            cases = [(simpo, ["--beta", "0"], "--beta"), (simpo, ["--seed", "x"], "--seed"),
                     (simpo, ["--seed", "-2"], "--seed"), (dpo, ["--tau", "0"], "--tau"),
                     (dpo, ["--tau", "nan"], "--tau"), (simpo, ["--pair-style", "2"], "--pair-style"),
                     (simpo, ["--length-bias", "inf"], "--length-bias"), (dpo, ["--eval-samples", "0"], "--eval-samples"),
                     (dpo, ["--sft-steps", "0"], "--sft-steps"), (dpo, ["--beta", "nan"], "--beta"),
                     (simpo, ["--lr", "1e400"], "--lr"), (simpo, ["--device", "tpu"], "--device")]
            for module, args, expect in cases:
                with self.subTest(script=module.__name__, args=args):
                    with self.assertRaises(SystemExit) as cm:
                        err = io.StringIO()
                        with mock.patch.object(sys, "argv", [module.__name__ + ".py", *safe, *args]), \
                                contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                            module.main()
                    self.assertEqual(cm.exception.code, 2)
                    self.assertIn(expect, err.getvalue())
            self.assertEqual(os.listdir(d), [])                  # rejected before any folder was made


def t(*values, grad=False):
    return torch.tensor(values, dtype=torch.float32, requires_grad=grad)


def softplus(z):
    """log(1 + exp(z)), written out: -log sigmoid(x) = softplus(-x)."""
    return math.log(1 + math.exp(z))


# ----------------------------------------------------------------------------------------------------
# Feedback for "write it yourself" (README, "Classroom exercises"): the test classes of dpo_loss,
# simpo_loss, sppo_loss, estimate_win_rates and sequence_logps call the function alone, nothing of the
# script around it, and when a value is wrong they say what was expected, what came, and which common
# mistake gives exactly what came (each mistake below is computed, not guessed from the message).
# ----------------------------------------------------------------------------------------------------

NOT_MATCHED = "no mistake these tests know gives this: compare your code with the docstring and the derivation above it"
NOT_FINITE = ("not finite: torch.log(torch.sigmoid(z)) is log(0) = -inf once z < -104 in float32, and its gradient "
              "is NaN; use F.logsigmoid(z), which is finite for any z")


def attempt(test, fn, *args, returns=None):
    """fn(*args), failing with a sentence instead of a traceback when fn is not written yet or returns
    something else than the tuple `returns` names (e.g. ("losses", "chosen_rewards", "rejected_rewards"))."""
    try:
        out = fn(*args)
    except NotImplementedError:
        out = NotImplemented
    if out is NotImplemented:
        test.fail(f"{fn.__name__} is not written yet (it raises NotImplementedError): write its body from its "
                  f"docstring and the derivation above it in {fn.__module__}.py")
    if returns is not None and not (isinstance(out, tuple) and len(out) == len(returns)):
        test.fail(f"{fn.__name__} must return {len(returns)} values, ({', '.join(returns)}); got {type(out).__name__}"
                  + (f" of {len(out)}" if isinstance(out, (tuple, list)) else ""))
    return out


def show(x):
    """A tensor as short text: [0.6931, 0.25] or 8 x 0.6931 when every value is the same."""
    x = torch.as_tensor(x).detach().double().flatten()
    if x.numel() > 1 and bool((x == x[0]).all()):
        return f"{x.numel()} x {x[0].item():.4g}"
    if x.numel() == 1:
        return f"{x.item():.4g}"
    more = f", ... ({x.numel()} values)" if x.numel() > 6 else ""
    return "[" + ", ".join(f"{v:.4g}" for v in x[:6].tolist()) + more + "]"


def expect_close(test, got, want, what, mistakes=(), atol=1e-4, rtol=1e-4):
    """Assert got == want (up to float rounding); else fail with: what, expected, got, and the hint of
    the first (value, hint) in `mistakes` whose value is what came."""
    if not torch.is_tensor(got):
        test.fail(f"{what}: expected a tensor {show(want)}; got {type(got).__name__} {got!r}")
    got_d, want_d = got.detach().double(), torch.as_tensor(want).double()
    if got_d.shape == want_d.shape and torch.allclose(got_d, want_d, rtol=rtol, atol=atol):
        return
    if got_d.shape != want_d.shape:
        hint = (f"shape {tuple(got_d.shape)} instead of {tuple(want_d.shape)}: one value per example is expected"
                + ("; do not average here, the training loop takes the mean" if got_d.dim() == 0 else ""))
    elif not torch.isfinite(got_d).all():
        hint = NOT_FINITE
    else:
        same = lambda value: torch.allclose(got_d, torch.as_tensor(value).double().expand_as(got_d), rtol=rtol, atol=atol)
        hint = next((h for value, h in mistakes if same(value)), NOT_MATCHED)
    test.fail(f"{what}: expected {show(want_d)}; got {show(got_d)}: {hint}")


def expect_grad(test, tensor, want, what, mistakes=()):
    """The gradient that reached `tensor` after backward(): present, finite, and equal to want."""
    if tensor.grad is None:
        test.fail(f"{what}: no gradient reached it: the loss must be computed from the policy log-probs "
                  f"without .detach(), .item() or torch.no_grad()")
    expect_close(test, tensor.grad, want, what, mistakes)


def expect_detached(test, rewards, name):
    if rewards.requires_grad:
        test.fail(f"{name} carries a gradient: return it .detach()ed (rewards are logged and compared; only "
                  f"the loss is optimised)")


# ====================================================================================================
# dpo.py and simpo.py: the objectives (write it yourself: python -m unittest test_all.TestDPOLoss)
# ====================================================================================================

DPO_RETURNS = ("losses", "chosen_rewards", "rejected_rewards")    # each [B]


class TestDPOLoss(unittest.TestCase):
    """dpo.dpo_loss alone: losses -log sigma(beta (log-ratio_w - log-ratio_l)) [DPO-1], rewards [DPO-2]."""

    def test_equal_policy_and_reference_give_ln2(self):
        g = torch.Generator().manual_seed(0)
        pc, pr = -torch.rand(8, generator=g) * 30, -torch.rand(8, generator=g) * 30
        pc.requires_grad_(True)
        beta = 0.1
        losses, cr, rj = attempt(self, dpo.dpo_loss, pc, pr, pc.detach().clone(), pr.clone(), beta, returns=DPO_RETURNS)
        no_ref = -F.logsigmoid(beta * (pc - pr)).detach()
        expect_close(self, losses, torch.full((8,), math.log(2)),
                     "pi_theta = pi_ref (log-ratios 0, logits 0): every loss must be -log sigmoid(0) = ln 2 = 0.693", [
                         (0.0, "is the log-sigmoid missing? The loss is -log sigmoid(logits), not -logits"),
                         (-math.log(2), "the sign: the loss is MINUS log sigmoid(logits)"),
                         (0.5, "sigmoid(logits) without the log: the loss is -log sigmoid(logits)"),
                         (-0.5, "the log is missing: the loss is -log sigmoid(logits)"),
                         (no_ref, "the reference is not subtracted: each log-ratio is log pi_theta(y|x) - log pi_ref(y|x)")])
        expect_close(self, cr, torch.zeros(8), "chosen_rewards when pi_theta = pi_ref: beta * log-ratio = 0", [
            (beta * pc.detach(), "the reference is not subtracted: the reward is beta (log pi_theta(y|x) - log pi_ref(y|x))")])
        expect_close(self, rj, torch.zeros(8), "rejected_rewards when pi_theta = pi_ref: beta * log-ratio = 0", [
            (beta * pr, "the reference is not subtracted: the reward is beta (log pi_theta(y|x) - log pi_ref(y|x))")])
        losses.sum().backward()
        expect_grad(self, pc, torch.full((8,), -beta * 0.5), "d loss / d log pi_theta(y_w|x) at logits 0: -beta sigmoid(0) = -0.05", [
            (beta * 0.5, "the sign: raising log pi_theta(y_w|x) must LOWER the loss"),
            (-0.5, "beta is missing from the logits: beta (log-ratio_w - log-ratio_l)")])

    def test_hand_computed_batch(self):
        pc, pr = t(-5.0, -3.0, -10.0), t(-6.0, -2.0, -4.0)
        rc, rr = t(-5.5, -3.5, -8.0), t(-5.0, -2.5, -7.0)
        beta = 0.5
        losses, cr, rj = attempt(self, dpo.dpo_loss, pc, pr, rc, rr, beta, returns=DPO_RETURNS)
        # log-ratios: chosen 0.5, 0.5, -2.0; rejected -1.0, 0.5, 3.0
        # logits = beta * (chosen - rejected) = 0.75, 0.0, -2.5; loss = -log sigmoid(z) = log(1 + exp(-z))
        z = torch.tensor([0.75, 0.0, -2.5])
        expect_close(self, losses, t(softplus(-0.75), math.log(2), softplus(2.5)),
                     "losses for log-ratios w (0.5, 0.5, -2) and l (-1, 0.5, 3), beta 0.5, logits (0.75, 0, -2.5)", [
                         (F.softplus(z), "chosen and rejected swapped (or the logit's sign flipped): the logit is "
                                         "beta (log-ratio of y_w - log-ratio of y_l), and the loss -log sigmoid(logit)"),
                         (F.softplus(-z / beta), "beta is missing: logits = beta (log-ratio_w - log-ratio_l)"),
                         (F.softplus(-beta * (pc - pr)), "the reference is not subtracted: log-ratio = log pi_theta - log pi_ref"),
                         (F.softplus(-beta * ((pc + rc) - (pr + rr))), "the reference is added: log pi_theta/pi_ref = log pi_theta - log pi_ref"),
                         (-z, "the log-sigmoid is missing: the loss is -log sigmoid(logits), not -logits"),
                         (F.logsigmoid(z), "the sign: the loss is MINUS log sigmoid(logits)"),
                         (torch.sigmoid(-z), "sigmoid without the log: the loss is -log sigmoid(logits)")])
        expect_close(self, cr, t(0.25, 0.25, -1.0), "chosen_rewards = beta (log pi_theta(y_w|x) - log pi_ref(y_w|x))", [
            (pc - rc, "beta is missing from the reward: beta * log-ratio"),
            (beta * pc, "the reference is not subtracted from the reward"),
            (beta * (pr - rr), "chosen and rejected rewards swapped"),
            (beta * (rc - pc), "the sign: policy minus reference, log pi_theta - log pi_ref")])
        expect_close(self, rj, t(-0.5, 0.25, 1.5), "rejected_rewards = beta (log pi_theta(y_l|x) - log pi_ref(y_l|x))", [
            (pr - rr, "beta is missing from the reward: beta * log-ratio"),
            (beta * pr, "the reference is not subtracted from the reward"),
            (beta * (pc - rc), "chosen and rejected rewards swapped"),
            (beta * (rr - pr), "the sign: policy minus reference, log pi_theta - log pi_ref")])

    def test_gradient_closed_form(self):
        pc, pr = t(-5.0, -3.0, -10.0, -1.0, grad=True), t(-6.0, -2.0, -4.0, -9.0, grad=True)
        rc, rr = t(-5.5, -3.5, -8.0, -2.0), t(-5.0, -2.5, -7.0, -3.0)
        beta = 0.7
        losses, cr, rj = attempt(self, dpo.dpo_loss, pc, pr, rc, rr, beta, returns=DPO_RETURNS)
        expect_detached(self, cr, "chosen_rewards")
        expect_detached(self, rj, "rejected_rewards")
        losses.sum().backward()
        # paper, section 4: grad = -beta sigma(r_l - r_w) (grad log pi(y_w) - grad log pi(y_l))
        logit = beta * ((pc - rc) - (pr - rr)).detach()
        weight = torch.sigmoid(-logit)
        mistakes = [(-beta * torch.sigmoid(logit), "chosen and rejected swapped (or the logit's sign flipped)"),
                    (beta * torch.sigmoid(logit), "chosen and rejected swapped (or the logit's sign flipped)"),
                    (-torch.sigmoid(-logit / beta), "beta is missing from the logits"),
                    (-beta * weight / 4, "a quarter of the right gradient for a batch of 4: the losses were averaged "
                                         "inside dpo_loss; return one loss per example"),
                    (-beta * torch.sigmoid(-beta * (pc - pr).detach()), "the reference is not subtracted"),
                    (torch.full((4,), -beta), "the log-sigmoid is missing: -logits has the same gradient -beta for "
                                              "every pair; -log sigmoid weighs each pair by how wrong it is")]
        expect_grad(self, pc, -beta * weight, "d loss / d log pi_theta(y_w|x) = -beta sigmoid(-logit)",
                    mistakes + [(beta * weight, "the sign: raising log pi_theta(y_w|x) must lower the loss")])
        expect_grad(self, pr, beta * weight, "d loss / d log pi_theta(y_l|x) = +beta sigmoid(-logit)",
                    [(-value, hint) for value, hint in mistakes]
                    + [(-beta * weight, "the sign: raising log pi_theta(y_l|x) must raise the loss")])

    def test_finite_at_extreme_margins(self):
        pc, pr = t(0.0, -1000.0, -1000.0, 0.0, grad=True), t(-1000.0, 0.0, -1000.0, 0.0, grad=True)
        zero = torch.zeros(4)
        losses, cr, rj = attempt(self, dpo.dpo_loss, pc, pr, zero, zero, 1.0, returns=DPO_RETURNS)
        # logits +1000, -1000, 0, 0: losses ~0, 1000, log 2, log 2; d/dpc = -sigmoid(-logit) = 0, -1, -1/2, -1/2
        z = t(1000.0, -1000.0, 0.0, 0.0)
        expect_close(self, losses, t(0.0, 1000.0, math.log(2), math.log(2)),
                     "losses at logits +1000, -1000, 0, 0 (beta 1): ~0, 1000, ln 2, ln 2, all finite", [
                         (-z, "the log-sigmoid is missing: the loss is -log sigmoid(logits), not -logits"),
                         (F.softplus(z), "chosen and rejected swapped (or the logit's sign flipped)")])
        losses.sum().backward()
        expect_grad(self, pc, t(0.0, -1.0, -0.5, -0.5), "d loss / d log pi_theta(y_w|x) at logits +1000, -1000, 0, 0")
        expect_grad(self, pr, t(0.0, 1.0, 0.5, 0.5), "d loss / d log pi_theta(y_l|x) at logits +1000, -1000, 0, 0")


SIMPO_RETURNS = ("losses", "chosen_rewards", "rejected_rewards")  # each [B]


class TestSimPOLoss(unittest.TestCase):
    """simpo.simpo_loss alone: rewards (beta/|y|) log pi_theta(y|x) [SimPO-2], loss -log sigma(r_w - r_l - gamma) [SimPO-4]."""

    def test_hand_computed_batch(self):
        pc, pr = t(-6.0, -4.0, -3.0), t(-9.0, -2.0, -12.0)
        lc, lr = t(3.0, 2.0, 6.0), t(3.0, 1.0, 4.0)
        beta, gamma = 2.0, 0.5
        losses, cr, rj = attempt(self, simpo.simpo_loss, pc, pr, lc, lr, beta, gamma, returns=SIMPO_RETURNS)
        # rewards beta/|y| * logp: chosen 2*-6/3 = -4, 2*-4/2 = -4, 2*-3/6 = -1; rejected -6, -4, -6
        for got, logps, lengths, other, want, name in ((cr, pc, lc, pr / lr, t(-4.0, -4.0, -1.0), "chosen"),
                                                       (rj, pr, lr, pc / lc, t(-6.0, -4.0, -6.0), "rejected")):
            expect_close(self, got, want, f"{name}_rewards = (beta/|y|) log pi_theta(y|x), beta 2", [
                (beta * logps, "the length normalisation is missing: divide log pi_theta(y|x) by |y| [SimPO-2]"),
                (logps / lengths, "beta is missing from the reward: (beta/|y|) log pi_theta(y|x)"),
                (beta * logps * lengths, "multiplied by |y|: the reward DIVIDES by the length"),
                (beta * other, "chosen and rejected rewards swapped")])
        # logits r_w - r_l - gamma = 1.5, -0.5, 4.5; loss = log(1 + exp(-z))
        margin = t(2.0, 0.0, 5.0)
        expect_close(self, losses, t(softplus(-1.5), softplus(0.5), softplus(-4.5)),
                     "losses for reward margins (2, 0, 5), gamma 0.5: -log sigmoid(margin - gamma)", [
                         (F.softplus(-(margin + gamma)), "gamma is added: the chosen reward must beat the rejected "
                                                         "one BY gamma, logits = r_w - r_l - gamma"),
                         (F.softplus(-margin), "gamma is missing: logits = r_w - r_l - gamma [SimPO-3]"),
                         (F.softplus(-(margin - beta * gamma)), "gamma is multiplied by beta: the target margin is gamma "
                                                                "itself (the official code's gamma_beta_ratio is gamma/beta)"),
                         (F.softplus(-(margin - gamma / beta)), "gamma is divided by beta: the target margin is gamma itself"),
                         (F.softplus(margin + gamma), "chosen and rejected swapped: logits = r_w - r_l - gamma"),
                         (F.softplus(margin - gamma), "the sign: chosen minus rejected, then the loss -log sigmoid(logits)"),
                         (-(margin - gamma), "the log-sigmoid is missing: the loss is -log sigmoid(logits), not -logits"),
                         (F.logsigmoid(margin - gamma), "the sign: the loss is MINUS log sigmoid(logits)")])

    def test_equal_rewards_give_log_one_plus_exp_gamma(self):
        """SimPO does not start at ln 2: with equal rewards the logit is -gamma (README, "Reading your logs")."""
        pc = t(-6.0, -10.0, -4.0, grad=True)
        lengths = t(3.0, 5.0, 2.0)
        beta, gamma = 2.0, 1.0
        losses, cr, rj = attempt(self, simpo.simpo_loss, pc, pc.detach().clone(), lengths, lengths, beta, gamma,
                                 returns=SIMPO_RETURNS)
        expect_close(self, losses, torch.full((3,), softplus(gamma)),
                     "equal rewards, gamma 1: every loss must be -log sigmoid(-gamma) = ln(1 + e) = 1.313", [
                         (math.log(2), "gamma is missing: logits = r_w - r_l - gamma, so equal rewards give -log sigmoid(-gamma)"),
                         (softplus(-gamma), "gamma is added instead of subtracted"),
                         (softplus(beta * gamma), "gamma is multiplied by beta: the target margin is gamma itself"),
                         (gamma, "the log-sigmoid is missing: the loss is -log sigmoid(logits)")])
        expect_detached(self, cr, "chosen_rewards")
        expect_detached(self, rj, "rejected_rewards")
        losses.sum().backward()
        # d/d logp_w of -log sigma(beta logp_w/|y_w| - ...) = -(beta/|y_w|) sigma(-logit) = -(beta/|y_w|) sigma(gamma)
        expect_grad(self, pc, -beta / lengths * sig(gamma), "d loss / d log pi_theta(y_w|x) = -(beta/|y_w|) sigmoid(gamma)", [
            (-beta * sig(gamma) * torch.ones(3), "the length normalisation is missing from the gradient's path"),
            (-1 / lengths * sig(gamma), "beta is missing from the rewards: (beta/|y|) log pi_theta(y|x)"),
            (beta / lengths * sig(gamma), "the sign: raising log pi_theta(y_w|x) must lower the loss")])

    def test_reward_scales_as_one_over_length(self):
        pc, pr = t(-6.0, -4.0), t(-9.0, -2.0)
        _, c1, r1 = attempt(self, simpo.simpo_loss, pc, pr, t(3.0, 2.0), t(3.0, 1.0), 2.5, 0.0, returns=SIMPO_RETURNS)
        _, c2, r2 = attempt(self, simpo.simpo_loss, pc, pr, t(6.0, 4.0), t(6.0, 2.0), 2.5, 0.0, returns=SIMPO_RETURNS)
        hint = [(c1, "the reward does not change with |y|: divide log pi_theta(y|x) by the length"),
                (c1 * 4, "the reward grows with |y|: it must DIVIDE by the length")]
        expect_close(self, c2, c1 / 2, "chosen_rewards with every length doubled: half of what they were", hint)
        expect_close(self, r2, r1 / 2, "rejected_rewards with every length doubled: half of what they were",
                     [(r1, hint[0][1]), (r1 * 4, hint[1][1])])

    def test_gamma_shifts_the_logit_by_exactly_gamma(self):
        pc, pr, lc, lr = t(-6.0, -4.0, -3.0), t(-9.0, -2.0, -12.0), t(3.0, 2.0, 6.0), t(3.0, 1.0, 4.0)
        beta = 2.0
        logit = lambda loss: -torch.log(torch.expm1(loss.double()))    # the logit, read back from -log sigmoid(z)
        no_gamma, _, _ = attempt(self, simpo.simpo_loss, pc, pr, lc, lr, beta, 0.0, returns=SIMPO_RETURNS)
        for gamma in (0.3, 1.0, 2.5):
            with self.subTest(gamma=gamma):
                with_gamma, _, _ = attempt(self, simpo.simpo_loss, pc, pr, lc, lr, beta, gamma, returns=SIMPO_RETURNS)
                shift = logit(no_gamma) - logit(with_gamma)
                expect_close(self, shift, torch.full((3,), gamma), f"how much gamma = {gamma} lowers every logit", [
                    (-gamma, "gamma is added: logits = r_w - r_l - gamma"),
                    (beta * gamma, "gamma is multiplied by beta: the margin is gamma itself"),
                    (gamma / beta, "gamma is divided by beta: the margin is gamma itself"),
                    (0.0, "gamma is ignored")])

    def test_unit_lengths_give_summed_reward(self):
        """The --no-length-norm ablation: lengths all 1, the reward is beta * log pi(y|x), summed."""
        pc, pr = t(-6.0, -14.0), t(-9.0, -2.0)
        ones = torch.ones(2)
        losses, cr, rj = attempt(self, simpo.simpo_loss, pc, pr, ones, ones, 2.0, 1.0, returns=SIMPO_RETURNS)
        expect_close(self, cr, 2.0 * pc, "chosen_rewards with lengths 1: beta log pi_theta(y_w|x)",
                     [(pc, "beta is missing from the reward"), (2.0 * pr, "chosen and rejected rewards swapped")])
        expect_close(self, rj, 2.0 * pr, "rejected_rewards with lengths 1: beta log pi_theta(y_l|x)",
                     [(pr, "beta is missing from the reward"), (2.0 * pc, "chosen and rejected rewards swapped")])
        # margins 2*(-6+9) = 6 and 2*(-14+2) = -24; logits margin - gamma = 5 and -25
        margin = t(6.0, -24.0)
        expect_close(self, losses, t(softplus(-5.0), softplus(25.0)), "losses at margins 6 and -24, gamma 1 (lengths 1)", [
            (F.softplus(-(margin + 1)), "gamma is added: logits = r_w - r_l - gamma"),
            (F.softplus(-margin), "gamma is missing: logits = r_w - r_l - gamma"),
            (F.softplus(-(margin - 2)), "gamma is multiplied by beta: the target margin is gamma itself"),
            (F.softplus(margin + 1), "chosen and rejected swapped: logits = r_w - r_l - gamma")])

    def test_finite_at_extreme_margins(self):
        pc, pr = t(0.0, -1000.0, -3.0, grad=True), t(-1000.0, 0.0, -3.0, grad=True)
        ones = torch.ones(3)
        losses, _, _ = attempt(self, simpo.simpo_loss, pc, pr, ones, ones, 1.0, 0.0, returns=SIMPO_RETURNS)
        z = t(1000.0, -1000.0, 0.0)
        expect_close(self, losses, t(0.0, 1000.0, math.log(2)), "losses at logits +1000, -1000, 0: ~0, 1000, ln 2, all finite", [
            (-z, "the log-sigmoid is missing: the loss is -log sigmoid(logits), not -logits"),
            (F.softplus(z), "chosen and rejected swapped (or the logit's sign flipped)")])
        losses.sum().backward()
        expect_grad(self, pc, t(0.0, -1.0, -0.5), "d loss / d log pi_theta(y_w|x) at logits +1000, -1000, 0")   # -beta/|y| sigmoid(-logit)
        expect_grad(self, pr, t(0.0, 1.0, 0.5), "d loss / d log pi_theta(y_l|x) at logits +1000, -1000, 0")


# ====================================================================================================
# dpo.py and simpo.py: whole runs
# ====================================================================================================

class CountGPTs:
    """Counts every GPT object created while active: GPT(...) runs __init__; copy.deepcopy (how a frozen
    reference copy is usually made) skips __init__ but restores the copy's state with __setstate__."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        counter, init = self, model.GPT.__init__

        def counting_init(gpt, *args, **kwargs):
            counter.count += 1
            init(gpt, *args, **kwargs)

        def counting_setstate(gpt, state):
            counter.count += 1
            nn.Module.__setstate__(gpt, state)

        self.patches = [mock.patch.object(model.GPT, "__init__", counting_init),
                        mock.patch.object(model.GPT, "__setstate__", counting_setstate, create=True)]
        for p in self.patches:
            p.start()
        return self

    def __exit__(self, *exc):
        for p in reversed(self.patches):
            p.stop()
        return False


class TestSimPOOneModel(unittest.TestCase):
    def test_simpo_builds_one_model_dpo_more(self):
        with tempfile.TemporaryDirectory() as d:
            common = TINY_RUN + ["--sft-dir", os.path.join(d, "sft")]
            with CountGPTs() as cold:       # first run: trains and caches the SFT model
                run_main(simpo, common + ["--out", os.path.join(d, "s1")])
            (cache,) = glob.glob(os.path.join(d, "sft", "*.pt"))
            stamp = (os.stat(cache).st_ino, os.stat(cache).st_mtime_ns)
            with CountGPTs() as warm:       # second run: the SFT model comes from the cache
                run_main(simpo, common + ["--out", os.path.join(d, "s2")])
            self.assertEqual((os.stat(cache).st_ino, os.stat(cache).st_mtime_ns), stamp)   # not rebuilt
            with CountGPTs() as dpo_count:  # DPO keeps a reference copy: the counter can see it
                run_main(dpo, common + ["--out", os.path.join(d, "d")])
            self.assertEqual(cold.count, 1)
            self.assertEqual(warm.count, 1)
            self.assertGreater(dpo_count.count, 1)
            self.assertEqual(model.GPT.__init__.__name__, "__init__")               # patches undone
            self.assertNotIn("__setstate__", vars(model.GPT))
            # same seed, cold cache or warm: the same numbers
            m1, m2 = read_json(os.path.join(d, "s1", "metrics.json")), read_json(os.path.join(d, "s2", "metrics.json"))
            self.assertEqual({k: v for k, v in m1.items() if k not in TIMING_KEYS},
                             {k: v for k, v in m2.items() if k not in TIMING_KEYS})


class TestScripts(unittest.TestCase):
    """Few-step runs sharing one SFT cache: dpo.py and simpo.py as processes, and dpo.py again with the
    same seed in this process (same seed, same numbers)."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        d = cls.tmp.name
        cls.sft_dir = os.path.join(d, "sft")
        # the SFT cache the scripts will find (same task, seed and steps as TINY_RUN), built once here so
        # the three runs below do not race to build it
        with contextlib.redirect_stderr(io.StringIO()):
            _, info = model.sft_model(data.Task(data.TaskConfig(), seed=0), CPU, cls.sft_dir, 0, 5, quiet=True)
        cls.sft_file = os.path.basename(info["path"])
        cls.out = {k: os.path.join(d, k) for k in ("dpo_a", "dpo_b", "simpo")}
        runs = [("dpo.py", "dpo_a"), ("simpo.py", "simpo")]
        procs = [(k, script(name, *TINY_RUN, "--seed", "0", "--out", cls.out[k], "--sft-dir", cls.sft_dir))
                 for name, k in runs]
        # the same DPO run once more, in this process meanwhile (cheaper than a third process)
        run_main(dpo, TINY_RUN + ["--seed", "0", "--out", cls.out["dpo_b"], "--sft-dir", cls.sft_dir])
        cls.results = {}
        for k, p in procs:
            out, err = p.communicate(timeout=300)
            cls.results[k] = (p.returncode, out, err)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_runs_succeed_from_the_cache(self):
        for k, (rc, out, err) in self.results.items():
            with self.subTest(run=k):
                self.assertEqual(rc, 0, err[-2000:])
                self.assertNotIn("Traceback", err)
        self.assertEqual(os.listdir(self.sft_dir), [self.sft_file])   # every run reused the one SFT cache

    def test_metrics_json_has_every_key(self):
        for k, method in (("dpo_a", "dpo"), ("simpo", "simpo")):
            with self.subTest(run=k):
                m = read_json(os.path.join(self.out[k], "metrics.json"))
                for key in METRIC_KEYS:
                    self.assertIn(key, m)
                self.assertEqual((m["method"], m["seed"], m["device"], m["steps"]), (method, 0, "cpu", 3))
                for key in ("win_rate_vs_sft", "reward_accuracy", "ranking_agreement"):
                    self.assertTrue(0.0 <= m[key] <= 1.0, (key, m[key]))
                for key in METRIC_KEYS[4:]:
                    self.assertTrue(math.isfinite(m[key]), key)
        # SimPO's reward IS the length-normalised log-likelihood, so the two orders agree on every pair
        self.assertEqual(read_json(os.path.join(self.out["simpo"], "metrics.json"))["ranking_agreement"], 1.0)

    def test_log_jsonl_one_line_per_step_with_trl_names(self):
        for k in ("dpo_a", "simpo"):
            with self.subTest(run=k):
                rows = read_jsonl(os.path.join(self.out[k], "log.jsonl"))
                self.assertEqual(len(rows), 3)
                for row in rows:
                    for key in LOG_KEYS:
                        self.assertIn(key, row)
                        self.assertTrue(math.isfinite(row[key]))
                    self.assertAlmostEqual(row["rewards/margins"], row["rewards/chosen"] - row["rewards/rejected"],
                                           places=5)
                    self.assertTrue(0.0 <= row["rewards/accuracies"] <= 1.0)
        # DPO's first step: policy = reference, so loss log 2 and rewards 0
        first = read_jsonl(os.path.join(self.out["dpo_a"], "log.jsonl"))[0]
        self.assertAlmostEqual(first["loss"], math.log(2), places=5)
        self.assertEqual((first["rewards/chosen"], first["rewards/rejected"]), (0.0, 0.0))

    def test_model_pt_plain_types(self):
        for k in ("dpo_a", "simpo"):
            with self.subTest(run=k):
                path = os.path.join(self.out[k], "model.pt")
                ckpt = torch.load(path, weights_only=True)
                self.assertEqual(set(ckpt), {"model", "config", "args"})
                self.assertIsInstance(ckpt["config"], dict)
                self.assertIsInstance(ckpt["args"], dict)
                self.assertTrue(all(torch.is_tensor(v) for v in ckpt["model"].values()))
                self.assertTrue(all(isinstance(v, (int, float, str, bool, type(None))) for v in ckpt["args"].values()))
                self.assertEqual(ckpt["args"]["steps"], 3)
                loaded, _ = model.load_checkpoint(path)
                self.assertTrue(state_equal(ckpt["model"], loaded.state_dict()))

    def test_same_seed_same_metrics(self):
        a = read_json(os.path.join(self.out["dpo_a"], "metrics.json"))
        b = read_json(os.path.join(self.out["dpo_b"], "metrics.json"))
        self.assertEqual(a.keys(), b.keys())
        self.assertEqual({k: v for k, v in a.items() if k not in TIMING_KEYS},
                         {k: v for k, v in b.items() if k not in TIMING_KEYS})
        self.assertEqual(read_jsonl(os.path.join(self.out["dpo_a"], "log.jsonl")),
                         read_jsonl(os.path.join(self.out["dpo_b"], "log.jsonl")))

    def test_no_leftover_temporary_files(self):
        for folder in [*self.out.values(), self.sft_dir]:
            self.assertEqual(glob.glob(os.path.join(folder, "*.tmp-*")), [], folder)
            self.assertEqual(glob.glob(os.path.join(folder, ".write-test-*")), [], folder)
        for k in ("dpo_a", "simpo"):
            self.assertEqual(sorted(os.listdir(self.out[k])), ["log.jsonl", "metrics.json", "model.pt"])

# ====================================================================================================
# sppo.py: the objective, the win-rate estimator, one self-play iteration, the script
# ====================================================================================================

SPPO_METRIC_KEYS = METRIC_KEYS + ["eta", "k", "iterations", "variant"]
SPPO_TIMING_KEYS = TIMING_KEYS | {"sampling_seconds"}
SPPO_TINY = ["--steps", "2", "--k", "2", "--sft-steps", "5", "--eval-samples", "16", "--batch-size", "8",
             "--device", "cpu", "--seed", "0"]


def sig(z):
    return 1.0 / (1.0 + math.exp(-z))


class TestSPPOLoss(unittest.TestCase):
    """sppo.sppo_loss alone: (log pi_theta(y|x)/pi_ref(y|x) - eta (P - 1/2))^2 per sample [SPPO-6]."""

    def mistakes(self, policy, ref, win, eta):
        """What the usual wrong versions return, each with its hint."""
        logratio, target = (policy - ref).detach(), eta * (torch.as_tensor(win) - 0.5)
        return [((logratio - (torch.as_tensor(win) - 0.5) / eta) ** 2,
                 "the target is eta (P - 1/2), not (P - 1/2)/eta: the SPPO write-up's error (its 'eta' there is TRL's beta = 1/eta)"),
                ((logratio - eta * torch.as_tensor(win)) ** 2,
                 "the -1/2 is missing: log Z is replaced by eta/2, so the target is eta P - eta/2 = eta (P - 1/2)"),
                ((-logratio - target) ** 2, "the log-ratio is reversed: log pi_theta(y|x) - log pi_ref(y|x), policy minus reference"),
                ((logratio + target) ** 2, "the target's sign: a sample that wins (P > 1/2) gets a POSITIVE target log-ratio"),
                (logratio - target, "not squared: the loss is (log-ratio - target)^2"),
                ((logratio - target).abs(), "an absolute value: the loss is the square (log-ratio - target)^2"),
                ((logratio - target) ** 2 / 2, "halved: [SPPO-6] is the plain square, no factor 1/2"),
                ((policy.detach() - target) ** 2, "the reference is not subtracted: the log-ratio is log pi_theta(y|x) - log pi_ref(y|x)")]

    def test_hand_worked_values(self):
        policy, ref = t(-5.0, -3.0, -10.0, -7.0), t(-6.0, -3.0, -8.0, -7.5)
        win = t(0.9, 0.5, 0.2, 0.0)
        eta = 4.0
        losses = attempt(self, sppo.sppo_loss, policy, ref, win, eta)
        # log-ratios 1, 0, -2, 0.5; targets eta (P - 1/2) = 1.6, 0, -1.2, -2
        # losses (1 - 1.6)^2, 0, (-2 + 1.2)^2, (0.5 + 2)^2
        expect_close(self, losses, t(0.36, 0.0, 0.64, 6.25),
                     "losses for log-ratios (1, 0, -2, 0.5), win rates (0.9, 0.5, 0.2, 0), eta 4: targets (1.6, 0, -1.2, -2)",
                     self.mistakes(policy, ref, win, eta))

    def test_minimiser_is_eta_times_p_minus_half(self):
        ref = t(-4.0, -9.0, -2.5, -20.0)
        win = t(0.0, 0.3, 0.5, 0.95)
        for eta in (0.5, 10.0, 1000.0):
            with self.subTest(eta=eta):
                best = [r + eta * (p - 0.5) for r, p in zip(ref.tolist(), win.tolist())]
                # the losses first, at the minimiser and half a nat either side of it; then the gradients
                points = [(delta, torch.tensor([b + delta for b in best], requires_grad=True)) for delta in (0.0, -0.5, 0.5)]
                for delta, at in points:
                    losses = attempt(self, sppo.sppo_loss, at, ref, win, eta)
                    expect_close(self, losses, torch.full((4,), delta ** 2),
                                 f"losses at log-ratio = eta (P - 1/2) {delta:+} (eta {eta}): {delta ** 2}",
                                 self.mistakes(at, ref, win, eta), atol=1e-3)
                    losses.sum().backward()
                for delta, at in points:   # the gradient is 2 (log-ratio - target)
                    expect_grad(self, at, torch.full((4,), 2 * delta),
                                f"d loss / d log pi_theta at log-ratio = eta (P - 1/2) {delta:+} (eta {eta}): 2 x {delta}",
                                [(torch.full((4,), -2 * delta), "the log-ratio is reversed: policy minus reference"),
                                 (torch.full((4,), delta), "halved: [SPPO-6] is the plain square, whose gradient is 2 (log-ratio - target)")])

    def test_win_prob_may_be_a_number(self):
        """sppo_hard_loss passes P = 1 and P = 0 as plain numbers: the function must take a float too."""
        policy, ref = t(-5.0, -3.0), t(-6.0, -3.0)
        eta = 4.0
        try:
            losses = sppo.sppo_loss(policy, ref, 1.0, eta)
        except NotImplementedError:
            return self.fail("sppo_loss is not written yet (it raises NotImplementedError): write its body from "
                             "the derivation above it in sppo.py")
        except Exception as e:   # the student's code meets a float where it expected a tensor
            return self.fail(f"sppo_loss(policy, ref, 1.0, eta) raised {type(e).__name__}: {e}: win_prob may be a "
                             f"number; torch.as_tensor(win_prob) turns it into a tensor")
        # log-ratios 1, 0; target eta (1 - 1/2) = 2
        expect_close(self, losses, t(1.0, 4.0), "losses with P = 1 (a plain number), log-ratios (1, 0), eta 4: (1 - 2)^2, (0 - 2)^2",
                     self.mistakes(policy, ref, torch.ones(2), eta))

    def test_finite_at_extreme_inputs(self):
        policy = t(1000.0, -1000.0, 0.0, -1000.0, grad=True)
        ref = t(-1000.0, 1000.0, 0.0, -1000.0)
        win = t(0.0, 1.0, 1.0, 0.5)
        losses = attempt(self, sppo.sppo_loss, policy, ref, win, 1.0)
        # log-ratios 2000, -2000, 0, 0; targets -0.5, 0.5, 0.5, 0
        expect_close(self, losses, t(2000.5 ** 2, 2000.5 ** 2, 0.25, 0.0),
                     "losses at log-ratios (2000, -2000, 0, 0), targets (-0.5, 0.5, 0.5, 0): finite",
                     self.mistakes(policy, ref, win, 1.0))
        losses.sum().backward()
        expect_grad(self, policy, t(4001.0, -4001.0, -1.0, 0.0),
                    "d loss / d log pi_theta = 2 (log-ratio - target) at log-ratios (2000, -2000, 0, 0)")


class TestWinRates(unittest.TestCase):
    """sppo.estimate_win_rates alone: P_hat(y_i > pi_t|x) = (1/K) sum_j P(y_i > y_j|x), j = i included [SPPO-5]."""

    def mistakes(self, scores, tau):
        """What the usual wrong versions return for `scores` [N, K], each with its hint."""
        p = torch.sigmoid((scores[:, :, None] - scores[:, None, :]) / tau).double()   # [N, K, K]: P(y_i > y_j)
        K = scores.shape[1]
        eye = torch.eye(K, dtype=torch.bool)
        zero_diag = p.masked_fill(eye, 0.0)
        right = p.masked_fill(eye, 0.5).mean(-1)
        return [(zero_diag.sum(-1) / (K - 1), "the tie with itself is left out: average over all K samples, the "
                                              "sample itself included (P(y_i > y_i) = 1/2), as the official code does"),
                (zero_diag.sum(-1) / K, "the diagonal counts 0: a sample ties with itself, P(y_i > y_i) = 1/2"),
                (1 - right, "the matrix is transposed (or averaged over the wrong axis): row i must hold "
                            "P(y_i > y_j) = preference_prob(s_i, s_j, tau), averaged over j"),
                (torch.sigmoid((scores[:, :, None] - scores[:, None, :]) * tau).mean(-1),
                 "tau multiplies the score difference: P = sigmoid((s_i - s_j) / tau)")]

    def test_constructed_case(self):
        # three responses scored 0, 0.2, -0.2 with tau 0.2: P(i > j) = sigmoid((s_i - s_j) / 0.2)
        scores = torch.tensor([[0.0, 0.2, -0.2]])
        p = attempt(self, sppo.estimate_win_rates, scores, 0.2)
        want = [[(0.5 + sig(-1) + sig(1)) / 3,      # y_0: ties itself, loses to y_1, beats y_2
                 (sig(1) + 0.5 + sig(2)) / 3,
                 (sig(-1) + sig(-2) + 0.5) / 3]]
        expect_close(self, p, want, "win rates of three samples scored (0, 0.2, -0.2), tau 0.2", self.mistakes(scores, 0.2))

    def test_self_tie_counts_one_half(self):
        # a certain winner and a certain loser: with the self-tie 0.5 in the mean, (1 + 0.5)/2 and (0 + 0.5)/2
        # (without it they would be 1 and 0)
        scores = torch.tensor([[1.0, -1.0]])
        p = attempt(self, sppo.estimate_win_rates, scores, 1e-3)
        expect_close(self, p, torch.tensor([[0.75, 0.25]]),
                     "a certain winner and a certain loser (K = 2): (1 + 1/2)/2 and (0 + 1/2)/2", self.mistakes(scores, 1e-3))

    def test_loop_over_pairs_and_mean_one_half(self):
        g = torch.Generator().manual_seed(1)
        scores = torch.rand(5, 4, generator=g) * 2 - 1
        tau = 0.3
        p = attempt(self, sppo.estimate_win_rates, scores, tau)
        want = [[sum(0.5 if i == j else sig((scores[n, i] - scores[n, j]).item() / tau) for j in range(4)) / 4
                 for i in range(4)] for n in range(5)]
        expect_close(self, p, want, "win rates [5 prompts, K = 4] against a loop over every pair", self.mistakes(scores, tau))
        expect_close(self, p.mean(-1), torch.full((5,), 0.5),
                     "each prompt's K win rates average to exactly 1/2 (the 1/2 that replaces log Z / eta)")
        expect_close(self, attempt(self, sppo.estimate_win_rates, torch.zeros(2, 3), tau), torch.full((2, 3), 0.5),
                     "equal scores: every win rate 1/2")


class TestSelfPlayIteration(unittest.TestCase):
    def test_pi_t_frozen_while_policy_moves(self):
        task = data.Task(data.TaskConfig(n_demos=16, n_pairs=8, n_heldout=8), seed=0)
        torch.manual_seed(0)
        policy = model.GPT(model.GPTConfig())
        before = {k: v.clone() for k, v in policy.state_dict().items()}
        log_rows = []
        with contextlib.redirect_stderr(io.StringIO()):
            pi_t, stats = sppo.self_play_iteration(
                policy, task.train_prompts[:6], iteration=1, k=3, eta=10.0, tau=0.2, steps=3, batch_size=8,
                lr=1e-2, device=CPU, sampler=model.make_generator(CPU, 0),
                batch_order=torch.Generator().manual_seed(0), log_rows=log_rows, quiet=True)
        self.assertIsNot(pi_t, policy)
        self.assertFalse(any(p.requires_grad for p in pi_t.parameters()))
        self.assertFalse(pi_t.training)
        for k, v in pi_t.state_dict().items():                   # pi_t is the policy as it was, untouched
            self.assertTrue(torch.equal(v, before[k]), k)
        moved = [k for k, v in policy.state_dict().items() if not torch.equal(v, before[k])]
        self.assertTrue(moved)                                   # pi_theta moved
        self.assertEqual(len(log_rows), 3)
        self.assertEqual([r["step"] for r in log_rows], [0, 1, 2])
        self.assertTrue(all(r["iteration"] == 1 and math.isfinite(r["loss"]) for r in log_rows))
        self.assertEqual(stats["samples"], 18)
        self.assertAlmostEqual(stats["win_prob_mean"], 0.5, places=5)
        # the first step fits a policy still equal to pi_t: its log-ratios are exactly 0
        self.assertEqual(log_rows[0]["logratios/mean"], 0.0)

    def test_fit_lowers_the_regression_loss(self):
        task = data.Task(data.TaskConfig(n_demos=16, n_pairs=8, n_heldout=8), seed=0)
        torch.manual_seed(0)
        policy = model.GPT(model.GPTConfig())
        pi_t, stats = sppo.self_play_iteration(
            policy, task.train_prompts[:8], iteration=1, k=2, eta=10.0, tau=0.2, steps=30, batch_size=16,
            lr=3e-3, device=CPU, sampler=model.make_generator(CPU, 0),
            batch_order=torch.Generator().manual_seed(0), log_rows=[], quiet=True)
        # loss_before is (eta (P - 1/2))^2 averaged: the loss at pi_theta = pi_t
        self.assertGreater(stats["loss_before"], 0.5)
        self.assertLess(stats["loss_after"], 0.5 * stats["loss_before"])


class TestSPPOScript(unittest.TestCase):
    """Few-step subprocess runs of sppo.py: self-play twice with one seed, the hard variant once."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        d = cls.tmp.name
        cls.sft_dir = os.path.join(d, "sft")
        with contextlib.redirect_stderr(io.StringIO()):
            model.sft_model(data.Task(data.TaskConfig(), seed=0), CPU, cls.sft_dir, 0, 5, quiet=True)
        cls.out = {k: os.path.join(d, k) for k in ("a", "b", "hard")}
        runs = {"a": ["--iterations", "2"], "b": ["--iterations", "2"], "hard": ["--variant", "hard"]}
        procs = [(k, script("sppo.py", *SPPO_TINY, *extra, "--out", cls.out[k], "--sft-dir", cls.sft_dir)) for k, extra in runs.items()]
        bad = [["--eta", "0"], ["--k", "1"], ["--iterations", "abc"]]
        procs += [(("bad", i), script("sppo.py", "--out", os.path.join(d, "bad"), "--sft-dir", os.path.join(d, "bad_sft"),
                                      "--device", "cpu", *args)) for i, args in enumerate(bad)]
        cls.results = {}
        for k, p in procs:
            out, err = p.communicate(timeout=300)
            cls.results[k] = (p.returncode, out, err)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_runs_succeed(self):
        for k in ("a", "b", "hard"):
            rc, out, err = self.results[k]
            with self.subTest(run=k):
                self.assertEqual(rc, 0, err[-2000:])
                self.assertIn("loaded from", out)
                self.assertEqual(sorted(os.listdir(self.out[k])), ["log.jsonl", "metrics.json", "model.pt"])

    def test_metrics_json_has_every_key(self):
        m = read_json(os.path.join(self.out["a"], "metrics.json"))
        for key in SPPO_METRIC_KEYS:
            self.assertIn(key, m)
        self.assertEqual((m["method"], m["seed"], m["device"], m["variant"]), ("sppo", 0, "cpu", "selfplay"))
        self.assertEqual((m["steps"], m["iterations"], m["k"], m["eta"]), (4, 2, 2, 20.0))   # steps: in all
        for key in ("win_rate_vs_sft", "reward_accuracy", "ranking_agreement"):
            self.assertTrue(0.0 <= m[key] <= 1.0, (key, m[key]))
        for key in SPPO_METRIC_KEYS[4:15]:
            self.assertTrue(math.isfinite(m[key]), key)
        self.assertEqual(len(m["win_rate_vs_sft_per_iteration"]), 2)
        self.assertEqual(m["win_rate_vs_sft_per_iteration"][-1], m["win_rate_vs_sft"])
        self.assertEqual(len(m["win_rate_vs_prev_per_iteration"]), 2)
        self.assertTrue(all(0.0 <= w <= 1.0 for w in m["win_rate_vs_prev_per_iteration"]))
        h = read_json(os.path.join(self.out["hard"], "metrics.json"))
        self.assertEqual((h["variant"], h["steps"], h["iterations"]), ("hard", 2, 1))

    def test_log_jsonl_one_line_per_step(self):
        rows = read_jsonl(os.path.join(self.out["a"], "log.jsonl"))
        self.assertEqual([r["step"] for r in rows], [0, 1, 2, 3])
        self.assertEqual([r["iteration"] for r in rows], [1, 1, 2, 2])
        for r in rows:
            self.assertTrue(math.isfinite(r["loss"]) and 0.0 <= r["rewards/accuracies"] <= 1.0)
        hard = read_jsonl(os.path.join(self.out["hard"], "log.jsonl"))
        self.assertEqual(len(hard), 2)
        # TRL's names; first step: policy = pi_ref, so rewards 0 and loss (0 - eta/2)^2 + (0 + eta/2)^2 = eta^2/2
        for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                    "logps/chosen", "logps/rejected"):
            self.assertIn(key, hard[0])
        self.assertEqual((hard[0]["rewards/chosen"], hard[0]["rewards/rejected"]), (0.0, 0.0))
        self.assertAlmostEqual(hard[0]["loss"], 20.0 ** 2 / 2, places=3)

    def test_model_pt_loads(self):
        ckpt = torch.load(os.path.join(self.out["a"], "model.pt"), weights_only=True)
        self.assertEqual(set(ckpt), {"model", "config", "args"})
        self.assertEqual((ckpt["args"]["steps"], ckpt["args"]["variant"]), (2, "selfplay"))

    def test_same_seed_same_numbers(self):
        a, b = (read_json(os.path.join(self.out[k], "metrics.json")) for k in ("a", "b"))
        self.assertEqual({k: v for k, v in a.items() if k not in SPPO_TIMING_KEYS},
                         {k: v for k, v in b.items() if k not in SPPO_TIMING_KEYS})
        self.assertEqual(read_jsonl(os.path.join(self.out["a"], "log.jsonl")),
                         read_jsonl(os.path.join(self.out["b"], "log.jsonl")))

    def test_bad_arguments_exit_2_without_traceback(self):
        for k, (rc, out, err) in self.results.items():
            if k[0] != "bad":
                continue
            with self.subTest(case=k):
                self.assertEqual(rc, 2, err)
                self.assertNotIn("Traceback", err)
                self.assertIn("error", err.lower())
        self.assertFalse(os.path.exists(os.path.join(self.tmp.name, "bad_sft")))




# ====================================================================================================
# README.md: the line ranges it cites still hold the functions it names
# ====================================================================================================

# What README.md cites by line number, in the order it cites them: (file, what). `what` is a function
# ("def NAME"), the comment block above one ("comment NAME"), or the lines from the first match of a
# pattern to the first match of a second one at or after it ("lines START .. END"), searched inside a
# function when one is named (NAME: START .. END). README_CITATIONS below turns each into "lines A-B".
README_CITED = [
    ("model.py", "def sequence_logps"),
    ("dpo.py", "comment dpo_loss"),
    ("dpo.py", "dpo_loss: chosen_rewards = beta .. rejected_rewards = beta"),
    ("dpo.py", "dpo_loss: logits = beta .. logits = beta"),
    ("dpo.py", "dpo_loss: losses = -F.logsigmoid .. losses = -F.logsigmoid"),
    ("dpo.py", "def dpo_loss"),
    ("dpo.py", "main: # the reference forward .. pair_logps(ref, **batch)"),
    ("data.py", "def ranking_metrics"),
    ("simpo.py", "simpo_loss: chosen_rewards = beta .. rejected_rewards = beta"),
    ("simpo.py", "simpo_loss: logits = chosen_rewards .. logits = chosen_rewards"),
    ("simpo.py", "simpo_loss: losses = -F.logsigmoid .. losses = -F.logsigmoid"),
    ("simpo.py", "def simpo_loss"),
    ("simpo.py", "comment simpo_loss"),
    ("sppo.py", "comment sppo_loss"),
    ("sppo.py", "main: for t in range(1, iterations + 1) .. tqdm.write(msg)"),
    ("sppo.py", "def estimate_win_rates"),
    ("sppo.py", "def sppo_loss"),
    ("sppo.py", "def self_play_iteration"),
    ("sppo.py", "def sppo_hard_loss"),
]


def readme_citation(file, what):
    """The "`file` lines A-B" (or "line A") that README.md should print for one entry of README_CITED."""
    import inspect
    module = {"model.py": model, "data.py": data, "dpo.py": dpo, "simpo.py": simpo, "sppo.py": sppo}[file]
    with open(os.path.join(REPO, file)) as f:
        lines = f.read().split("\n")
    kind, _, rest = what.partition(" ")
    if kind in ("def", "comment"):
        body, start = inspect.getsourcelines(getattr(module, rest))
        a, b = start, start + len(body) - 1
        if kind == "comment":                      # the contiguous '#' block that ends just above the def
            b = start - 1
            while not lines[b - 1].startswith("#"):
                b -= 1
            a = b
            while a > 1 and lines[a - 2].startswith("#") and not lines[a - 2].startswith("# ---"):
                a -= 1
    else:
        function, _, patterns = what.partition(": ")
        first, _, last = patterns.partition(" .. ")
        body, start = inspect.getsourcelines(getattr(module, function))
        span = range(start, start + len(body))
        a = next(n for n in span if first in lines[n - 1])
        b = next(n for n in span if n >= a and last in lines[n - 1])
    return f"`{file}` line {a}" if a == b else f"`{file}` lines {a}-{b}"


class TestReadmeCitations(unittest.TestCase):
    def test_cited_line_ranges_match_the_code(self):
        """Every line number README.md quotes still points at what it says (README_CITED, in order)."""
        import re
        with open(os.path.join(REPO, "README.md")) as f:
            found = re.findall(r"`[a-z_]+\.py` lines? \d+(?:-\d+)?", f.read())
        expected = [readme_citation(file, what) for file, what in README_CITED]
        wrong = [f"{what} in {file}: README says {got}, the code is at {want}"
                 for (file, what), got, want in zip(README_CITED, found, expected) if got != want]
        self.assertEqual(len(found), len(expected), f"README cites {len(found)} line ranges, README_CITED lists "
                                                     f"{len(expected)}: add the new ones to README_CITED, in order")
        self.assertTrue(not wrong, "stale line numbers in README.md:\n" + "\n".join(wrong))


# ====================================================================================================
# Every machine, every fault (issue 8): devices, memory, faults, the run saved whole, the shared SFT cache
# ====================================================================================================

def run_guarded(module, argv, stdout=None):
    """model.run(module.main) in this process, as `python module.py argv` runs it: (exit code, stderr)."""
    err = io.StringIO()
    code = 0
    with mock.patch.object(sys, "argv", [module.__name__ + ".py", *argv]), \
            contextlib.redirect_stdout(stdout if stdout is not None else io.StringIO()), \
            contextlib.redirect_stderr(err):
        try:
            model.run(module.main)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def dead_pid():
    """A process id that no process has now."""
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except OSError:
            pass
        pid += 1


def write_previous_run(folder):
    """A previous run's three files with recognisable bytes; returns {name: bytes}."""
    os.makedirs(folder, exist_ok=True)
    files = {"metrics.json": b'{"previous": true}\n', "log.jsonl": b'{"step": 0}\n', "model.pt": b"previous weights"}
    for name, content in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(content)
    return files


def folder_bytes(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[name] = f.read()
        else:
            out[name] = "<folder>"
    return out


class FakeCudaMemory:
    """torch.cuda's memory counters, driven by hand: allocated now, and the peak since the last reset."""

    def __init__(self):
        self.allocated, self.peak = 0, 0

    def set(self, allocated):
        self.allocated = allocated
        self.peak = max(self.peak, allocated)

    def patches(self):
        return [mock.patch.object(torch.cuda, "memory_allocated", lambda device=None: self.allocated),
                mock.patch.object(torch.cuda, "max_memory_allocated", lambda device=None: self.peak),
                mock.patch.object(torch.cuda, "reset_peak_memory_stats", lambda device=None: self.set(self.allocated) or setattr(self, "peak", self.allocated)),
                mock.patch.object(torch.cuda, "synchronize", lambda device=None: None)]


class TestDevices(unittest.TestCase):
    def test_sft_ce_sums_in_float64_on_the_cpu_only(self):
        """MPS has no float64: sft_ce must move log-probs to the CPU before .double()."""
        class DeviceTensor:   # a tensor on a device without float64
            def __init__(self, t):
                self.t = t

            def double(self):
                raise AssertionError("float64 on the device: MPS has none (move to the CPU first)")

            def cpu(self):
                return self.t

        logps, lengths = torch.tensor([-3.0, -5.0]), torch.tensor([2.0, 2.0])
        with mock.patch.object(model, "sequence_logps_all", return_value=(DeviceTensor(logps), lengths)):
            self.assertAlmostEqual(model.sft_ce(None, None, None), 8.0 / 4.0)

    def test_peak_rss_is_bytes_on_macos_kilobytes_on_linux(self):
        import resource
        usage = mock.Mock(ru_maxrss=1000)
        meter = model.MemoryMeter(torch.device("mps"))     # no mallinfo2 off the CPU: ru_maxrss
        with mock.patch.object(resource, "getrusage", return_value=usage):
            with mock.patch.object(sys, "platform", "darwin"):
                self.assertEqual(meter._now(), 1000)
            with mock.patch.object(sys, "platform", "linux"):
                self.assertEqual(meter._now(), 1000 * 1024)

    def test_cuda_peak_covers_training_only(self):
        """max_memory_allocated is read at pause(): the evaluation's sampling after it never counts, and
        an evaluation between two self-play iterations is skipped by pause() and resume()."""
        fake = FakeCudaMemory()
        patches = fake.patches()
        for p in patches:
            p.start()
        try:
            meter = model.MemoryMeter(torch.device("cuda"))
            fake.set(100 * 2**20)                          # the SFT model
            meter.start()
            fake.set(130 * 2**20); meter.sample()         # a training step: +30 MB
            fake.set(100 * 2**20)
            meter.pause()
            fake.set(900 * 2**20)                          # evaluation: sampling 800 MB
            fake.set(100 * 2**20)
            self.assertAlmostEqual(meter.peak_mb(), 30.0)
            meter.resume()                                 # next iteration trains again
            fake.set(140 * 2**20); meter.sample()
            meter.pause()
            self.assertAlmostEqual(meter.peak_mb(), 40.0)
        finally:
            for p in patches:
                p.stop()

    def test_cpu_meter_ignores_what_happens_after_pause(self):
        meter = model.MemoryMeter(CPU).start()
        meter.pause()
        big = torch.ones(8 * 2**20)                        # 32 MB allocated during "evaluation"
        meter.sample()
        self.assertLess(meter.peak_mb(), 16.0)
        del big

    def test_warm_up_touches_neither_weights_nor_random_numbers(self):
        m = sharp_model()
        before = {k: v.clone() for k, v in m.state_dict().items()}
        torch.manual_seed(5)
        expected = torch.rand(3)
        torch.manual_seed(5)
        model.MemoryMeter(CPU).start(warm_up=m)
        self.assertTrue(torch.equal(torch.rand(3), expected))
        self.assertTrue(state_equal(before, m.state_dict()))
        self.assertTrue(all(p.grad is None for p in m.parameters()))

    def test_every_script_meters_from_the_sft_model_to_the_end_of_training(self):
        """The same window for every method: the meter starts before the method builds anything (DPO's
        reference, SPPO's frozen copies, any optimiser) and pauses before the first evaluation."""
        with tempfile.TemporaryDirectory() as d:
            for module, extra in ((dpo, []), (simpo, []), (sppo, ["--k", "2", "--iterations", "1"])):
                with self.subTest(script=module.__name__):
                    events = []
                    real_start, real_pause = model.MemoryMeter.start, model.MemoryMeter.pause
                    real_adam, real_evaluate = torch.optim.Adam, data.evaluate
                    real_copy = model.frozen_copy

                    def start(meter, *a, **k):
                        events.append("start")
                        return real_start(meter, *a, **k)

                    def pause(meter):
                        events.append("pause")
                        return real_pause(meter)

                    def adam(*a, **k):
                        events.append("optimiser")
                        return real_adam(*a, **k)

                    def evaluate(*a, **k):
                        events.append("evaluate")
                        return real_evaluate(*a, **k)

                    def copy(m):
                        events.append("copy")
                        return real_copy(m)

                    patches = [mock.patch.object(model.MemoryMeter, "start", start),
                               mock.patch.object(model.MemoryMeter, "pause", pause),
                               mock.patch.object(torch.optim, "Adam", adam),
                               mock.patch.object(data, "evaluate", evaluate)]
                    if hasattr(module, "frozen_copy"):
                        patches.append(mock.patch.object(module, "frozen_copy", copy))
                    with contextlib.ExitStack() as stack:
                        for p in patches:
                            stack.enter_context(p)
                        run_main(module, TINY_RUN + extra + ["--out", os.path.join(d, module.__name__),
                                                             "--sft-dir", os.path.join(d, "sft")])
                    first_eval = events.index("evaluate")
                    self.assertEqual(events[0], "start", events)
                    self.assertIn("pause", events[:first_eval], events)
                    self.assertIn("optimiser", events[:first_eval], events)
                    self.assertNotIn("copy", events[:events.index("start")], events)

    def test_cuda_is_made_deterministic_and_the_gpu_model_keys_the_cache(self):
        calls = []
        with mock.patch.object(torch.cuda, "is_available", return_value=True), \
                mock.patch.object(torch.cuda, "get_device_name", return_value="Fake GPU 80GB"), \
                mock.patch.object(torch, "use_deterministic_algorithms", lambda *a, **k: calls.append(("det", a, k))), \
                mock.patch.object(torch.backends.cuda, "enable_flash_sdp", lambda on: calls.append(("flash", on))), \
                mock.patch.object(torch.backends.cuda, "enable_mem_efficient_sdp", lambda on: calls.append(("mem", on))), \
                mock.patch.object(torch.backends.cuda, "enable_cudnn_sdp", lambda on: calls.append(("cudnn", on))), \
                mock.patch.dict(os.environ, {}, clear=False), contextlib.redirect_stdout(io.StringIO()) as out:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
            device = model.pick_device("cuda")
            self.assertEqual(os.environ.get("CUBLAS_WORKSPACE_CONFIG"), ":4096:8")
            self.assertEqual(model.device_name(device), "cuda:Fake GPU 80GB")
            task = small_task()
            path_a, key_a = model.sft_cache_path(task, device, "d", 0, 5, model.GPTConfig())
        self.assertIn(("det", (True,), {"warn_only": True}), calls)
        self.assertIn(("flash", False), calls)
        self.assertIn(("mem", False), calls)
        self.assertIn("Fake GPU 80GB", out.getvalue())
        with mock.patch.object(torch.cuda, "get_device_name", return_value="Other GPU"):
            path_b, key_b = model.sft_cache_path(small_task(), torch.device("cuda"), "d", 0, 5, model.GPTConfig())
        self.assertNotEqual(path_a, path_b)
        self.assertEqual(model.device_name(CPU), "cpu")

    def test_model_size_flags(self):
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "out")
            code, err = run_guarded(simpo, TINY_RUN + ["--out", out, "--sft-dir", os.path.join(d, "sft"),
                                                       "--n-layer", "1", "--n-head", "4", "--n-embd", "32"])
            self.assertEqual(code, 0, err)
            ckpt = torch.load(os.path.join(out, "model.pt"), weights_only=True)
            self.assertEqual((ckpt["config"]["n_layer"], ckpt["config"]["n_head"], ckpt["config"]["n_embd"]), (1, 4, 32))
            loaded, _ = model.load_checkpoint(os.path.join(out, "model.pt"))
            self.assertEqual(loaded.config.n_embd, 32)
            self.assertEqual(len(loaded.blocks), 1)
            # the default is unchanged, and another size is another SFT cache file
            args = simpo.parser.parse_args([])
            self.assertEqual(model.model_config(args), model.GPTConfig())
            task = small_task()
            self.assertNotEqual(model.sft_cache_path(task, CPU, d, 0, 5, model.GPTConfig())[0],
                                model.sft_cache_path(task, CPU, d, 0, 5, model.GPTConfig(n_embd=32, n_head=4))[0])
            code, err = run_guarded(simpo, TINY_RUN + ["--out", out, "--n-embd", "30", "--n-head", "4"])
            self.assertEqual(code, 2)
            self.assertIn("--n-embd", err)


class TestSizeBounds(unittest.TestCase):
    def test_sizes_seeds_and_tau_refused_up_front(self):
        with tempfile.TemporaryDirectory() as d:
            safe = ["--out", os.path.join(d, "out"), "--sft-dir", os.path.join(d, "sft"), "--device", "cpu"]
            cases = [(simpo, ["--batch-size", "1000000000"], "4096"), (dpo, ["--eval-samples", "1000000000"], "65536"),
                     (sppo, ["--k", "1000000000"], "64"), (simpo, ["--seed", str(2**64)], str(2**32 - 1)),
                     (dpo, ["--seed", str(2**64 - 1)], "--seed"), (simpo, ["--seed", str(2**32)], "--seed"),
                     (dpo, ["--tau", "inf"], "--tau"), (simpo, ["--n-layer", "1000"], "--n-layer"),
                     (simpo, ["--n-embd", "100000"], "--n-embd")]
            for module, args, expect in cases:
                with self.subTest(args=args):
                    code, err = run_guarded(module, safe + args)
                    self.assertEqual(code, 2, err)
                    self.assertIn(expect, err.strip().splitlines()[-1])   # the last line says what is wrong
                    self.assertNotIn("Traceback", err)
            self.assertEqual(os.listdir(d), [])
        self.assertEqual(simpo.parser.parse_args(["--seed", str(2**32 - 1)]).seed, 2**32 - 1)


class TestFaults(unittest.TestCase):
    """Each fault ends in one line on stderr and a non-zero exit, and the previous run stays whole."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.sft_dir = os.path.join(cls.tmp.name, "sft")
        with contextlib.redirect_stderr(io.StringIO()):
            model.sft_model(data.Task(data.TaskConfig(), seed=0), CPU, cls.sft_dir, 0, 5, quiet=True)
        cls.count = 0

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def fresh_out(self):
        TestFaults.count += 1
        out = os.path.join(self.tmp.name, f"out{self.count}")
        return out, write_previous_run(out)

    def args(self, out):
        return TINY_RUN + ["--out", out, "--sft-dir", self.sft_dir]

    def assert_one_line(self, err):
        self.assertNotIn("Traceback", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)

    def test_disk_full_while_saving(self):
        out, previous = self.fresh_out()
        real = model._write_durably

        def write(path, content):
            if path.endswith("model.pt"):              # metrics.json and log.jsonl are written by now
                raise OSError(errno.ENOSPC, "No space left on device", path)
            return real(path, content)

        with mock.patch.object(model, "_write_durably", write):
            code, err = run_guarded(simpo, self.args(out))
        self.assertEqual(code, 1)
        last = err.strip().splitlines()[-1]
        self.assertIn("no space left on device writing", last)
        self.assertIn("untouched", last)
        self.assertNotIn("Traceback", err)
        self.assertEqual(folder_bytes(out), previous)   # no .incoming, nothing new, nothing lost

    def test_ctrl_c_during_training(self):
        out, previous = self.fresh_out()
        real, calls = data.pair_batch, []

        def pair_batch(*a, **k):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return real(*a, **k)

        with mock.patch.object(data, "pair_batch", pair_batch):
            code, err = run_guarded(dpo, self.args(out))
        self.assertEqual(code, 130)
        self.assertEqual(err.strip().splitlines()[-1],
                         f"interrupted at step 1 of 3 (training); previous results in {out} untouched")
        self.assertNotIn("Traceback", err)
        self.assertEqual(folder_bytes(out), previous)

    def test_ctrl_c_during_the_save_waits_for_it(self):
        """SIGINT while the files are moved into place: the move completes, then the run stops."""
        out, previous = self.fresh_out()
        real = model._finish_commit

        def finish(folder):
            os.kill(os.getpid(), signal.SIGINT)         # Ctrl-C arrives in the middle of the commit
            return real(folder)

        with mock.patch.object(model, "_finish_commit", finish):
            code, err = run_guarded(simpo, self.args(out))
        self.assertEqual(code, 130)
        self.assertIn(f"the run was saved in {out}", err)
        self.assert_one_line(err.split("\n", err.count("\n") - 1)[-1])
        self.assertEqual(sorted(os.listdir(out)), ["log.jsonl", "metrics.json", "model.pt"])
        self.assertEqual(read_json(os.path.join(out, "metrics.json"))["method"], "simpo")   # the new run, whole

    def test_divergence_stops_with_one_line(self):
        out, previous = self.fresh_out()
        real = simpo.simpo_loss

        def nan_at_step_one(*a, **k):
            losses, c, r = real(*a, **k)
            if losses.requires_grad:                       # a training step (not the SFT model's evaluation)
                nan_at_step_one.steps += 1
                if nan_at_step_one.steps == 2:
                    losses = losses * float("nan")
            return losses, c, r
        nan_at_step_one.steps = 0

        with mock.patch.object(simpo, "simpo_loss", nan_at_step_one):
            code, err = run_guarded(simpo, self.args(out))
        self.assertEqual(code, 1)
        last = err.strip().splitlines()[-1]
        self.assertIn("nan at step 1", last)
        self.assertIn("--lr", last)
        self.assertNotIn("Traceback", err)
        self.assertEqual(folder_bytes(out), previous)

    def test_non_finite_weights_after_the_last_step(self):
        m = sharp_model()
        model.check_weights(m)
        with torch.no_grad():
            m.lm_head.weight[0, 0] = float("inf")
        with self.assertRaises(model.Diverged):
            model.check_weights(m)
        with self.assertRaises(model.Diverged):
            model.check_loss(torch.tensor(float("nan")), 4, 10)

    def test_out_of_memory_is_one_line(self):
        out, previous = self.fresh_out()
        with mock.patch.object(simpo, "pair_logps", side_effect=RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried to allocate 999 bytes")):
            code, err = run_guarded(simpo, self.args(out))
        self.assertEqual(code, 1)
        self.assertIn("out of memory", err.strip().splitlines()[-1])
        self.assertIn("--batch-size", err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(folder_bytes(out), previous)

    def test_closed_pipe_and_an_ascii_terminal(self):
        out, _ = self.fresh_out()

        class ClosedPipe(io.StringIO):
            def write(self, text):
                if self.tell() > 40:                        # `| head -1`: the reader has gone
                    raise BrokenPipeError(errno.EPIPE, "Broken pipe")
                return super().write(text)

            def fileno(self):
                raise io.UnsupportedOperation("no file descriptor")

        code, err = run_guarded(simpo, self.args(out), stdout=ClosedPipe())
        self.assertEqual(code, 0, err)                       # the run goes on to the end, silently
        self.assertNotIn("Traceback", err)
        self.assertEqual(read_json(os.path.join(out, "metrics.json"))["method"], "simpo")

        out, _ = self.fresh_out()
        raw = io.BytesIO()
        ascii_stdout = io.TextIOWrapper(raw, encoding="ascii")
        code, err = run_guarded(dpo, self.args(out), stdout=ascii_stdout)
        ascii_stdout.flush()
        self.assertEqual(code, 0, err)
        text = raw.getvalue().decode("ascii")              # every byte is ASCII
        self.assertIn("|", text)                             # the charts' ASCII axis
        self.assertEqual(data.chart_glyphs(ascii_stdout)[1], "|")
        self.assertEqual(data.chart_glyphs(io.TextIOWrapper(io.BytesIO(), encoding="utf-8"))[1], "│")


class TestRunSavedWhole(unittest.TestCase):
    """model.save_files: the previous run's files or the new run's, never a mix, never a temporary file."""

    NEW = {"metrics.json": b"new metrics", "log.jsonl": b"new log", "model.pt": b"new weights"}

    def test_save_replaces_the_set(self):
        with tempfile.TemporaryDirectory() as d:
            write_previous_run(d)
            model.save_files(d, self.NEW)
            self.assertEqual(folder_bytes(d), self.NEW)
            # a run with no model.pt (nothing to save) removes the previous run's, with the rest
            model.save_files(d, {"metrics.json": b"m2", "log.jsonl": b"l2"})
            self.assertEqual(folder_bytes(d), {"log.jsonl": b"l2", "metrics.json": b"m2"})

    def test_killed_while_writing_leaves_the_previous_run(self):
        class Killed(BaseException):
            pass

        with tempfile.TemporaryDirectory() as d:
            previous = write_previous_run(d)
            real = model._write_durably
            with mock.patch.object(model, "_write_durably",
                                   lambda p, c: (_ for _ in ()).throw(Killed()) if p.endswith("log.jsonl") else real(p, c)), \
                    mock.patch("shutil.rmtree"):               # a killed process cleans nothing up
                with self.assertRaises(Killed):
                    model.save_files(d, self.NEW)
            self.assertTrue(os.path.isdir(os.path.join(d, model.STAGING)))
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                model.prepare_out_dir(d)                     # the next run into this folder
            self.assertEqual(folder_bytes(d), previous)
            self.assertIn("unfinished save", err.getvalue())

    def test_killed_while_moving_is_finished_by_the_next_run(self):
        class Killed(BaseException):
            pass

        with tempfile.TemporaryDirectory() as d:
            write_previous_run(d)
            real, moved = os.replace, []

            def replace(src, dst):
                if os.path.basename(os.path.dirname(src)) == model.STAGING and moved:
                    raise Killed()                            # dies after moving one file
                moved.append(dst)
                return real(src, dst)

            with mock.patch.object(os, "replace", replace):
                with self.assertRaises(Killed):
                    model.save_files(d, self.NEW)
            mixed = folder_bytes(d)
            self.assertIn(model.STAGING, mixed)              # a mix on disk, with its COMMIT beside it
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                model.prepare_out_dir(d)
            self.assertEqual(folder_bytes(d), self.NEW)
            self.assertIn("finished saving", err.getvalue())

    def test_stale_temporaries_of_dead_processes_are_removed(self):
        with tempfile.TemporaryDirectory() as d:
            dead, alive = dead_pid(), os.getpid()
            for name in (f"model.pt.tmp-{dead}", f".sft-abc.pt.tmp-{dead}", f"model.pt.tmp-{alive}"):
                open(os.path.join(d, name), "w").close()
            model.prepare_out_dir(d)
            self.assertEqual(os.listdir(d), [f"model.pt.tmp-{alive}"])   # a live writer's file is left alone


class TestSFTCacheClassroom(unittest.TestCase):
    def sft(self, task, d, steps=3):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            m, info = model.sft_model(task, CPU, d, seed=0, steps=steps, quiet=True)
        return m, info, err.getvalue()

    def test_runs_starting_together_train_once(self):
        import threading
        import time
        task = small_task(seed=21)
        real, trained = model._train_sft, []

        def slow_train(*a, **k):
            trained.append(1)
            time.sleep(0.5)                                   # long enough for the others to arrive
            return real(*a, **k)

        with tempfile.TemporaryDirectory() as d, mock.patch.object(model, "_train_sft", slow_train):
            results, errors = [], io.StringIO()

            def student():
                results.append(model.sft_model(task, CPU, d, seed=0, steps=3, quiet=True))

            with contextlib.redirect_stderr(errors):
                threads = [threading.Thread(target=student) for _ in range(3)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            self.assertEqual(len(trained), 1, errors.getvalue())
            self.assertEqual(len(results), 3)
            self.assertEqual(sorted(info["cached"] for _, info in results), [False, True, True])
            self.assertIn("waiting", errors.getvalue())
            for m, _ in results[1:]:
                self.assertTrue(state_equal(results[0][0].state_dict(), m.state_dict()))
            self.assertEqual([f for f in os.listdir(d) if not f.endswith(".pt")], [])   # no lock file left

    def test_read_only_folder_is_read_and_a_failed_write_keeps_the_model(self):
        task = small_task(seed=22)
        denied = OSError(errno.EACCES, "Permission denied")
        with tempfile.TemporaryDirectory() as d:
            with mock.patch.object(model, "_write_durably", side_effect=denied), \
                    mock.patch.object(os, "open", side_effect=denied):
                m, info, err = self.sft(task, d)                 # nothing can be written: trains, goes on
            self.assertFalse(info["cached"])
            self.assertIn("could not write the SFT cache", err)
            self.assertIn("going on", err)
            self.assertEqual(os.listdir(d), [])
            self.sft(task, d)                                    # now a writable folder: the cache is made
            with mock.patch.object(model, "_write_durably", side_effect=denied), \
                    mock.patch.object(os, "open", side_effect=denied), \
                    mock.patch.object(model, "_train_sft", side_effect=AssertionError("retrained")):
                m2, info2, err2 = self.sft(task, d)              # read-only with a valid cache: read it
            self.assertTrue(info2["cached"])
            self.assertTrue(state_equal(m.state_dict(), m2.state_dict()))
            with mock.patch.object(model, "_write_durably", side_effect=OSError(errno.ENOSPC, "No space left on device")):
                _, info3, err3 = self.sft(task, d, steps=2)
            self.assertIn("no space left on device", err3)
            self.assertFalse(info3["cached"])

    def test_a_folder_at_the_cache_path_is_a_clear_error(self):
        task = small_task(seed=23)
        with tempfile.TemporaryDirectory() as d:
            path, _ = model.sft_cache_path(task, CPU, d, 0, 3, model.GPTConfig())
            os.makedirs(path)
            with self.assertRaises(SystemExit) as cm:
                self.sft(task, d)
            self.assertEqual(cm.exception.code, 2)

    def test_corrupt_cache_notes_say_what_is_wrong(self):
        task = small_task(seed=24)
        with tempfile.TemporaryDirectory() as d:
            _, info, _ = self.sft(task, d)
            with open(info["path"], "rb") as f:
                good = f.read()
            foreign = io.BytesIO()
            torch.save(nn.Linear(2, 2), foreign)
            for content, words in [(b"", "empty"), (good[:len(good) // 2], "truncated"),
                                   (b"\x80\x04not a torch file at all", "not a PyTorch file"),
                                   (foreign.getvalue(), "not a file of this project")]:
                with self.subTest(words=words):
                    with open(info["path"], "wb") as f:
                        f.write(content)
                    _, again, err = self.sft(task, d)
                    self.assertFalse(again["cached"])
                    self.assertEqual(len(err.strip().splitlines()), 1, err)
                    self.assertIn(words, err)
                    self.assertIn("rebuilding", err)
                    self.assertNotIn("weights_only", err)



# ====================================================================================================
# Wiring: every line that connects one piece to another (which model, which data, which way round),
# checked by a test that fails when the connection is wrong, not only the formula at its end
# ====================================================================================================

class Spy:
    """with Spy(module, "name") as spy: module.name still runs; spy.calls lists one Call per call, with
    its arguments by name (`a`), its result, `before(a)` taken at call time (e.g. a copy of weights) and
    the name of the calling function (`caller`). spy.by(name): the calls made from that function."""

    class Call:
        def __init__(self, a, result, before, caller):
            self.a, self.result, self.before, self.caller = a, result, before, caller

    def __init__(self, obj, name, before=None):
        self.obj, self.name, self.before, self.calls = obj, name, before, []
        self.original = getattr(obj, name)
        self.signature = inspect.signature(self.original)

    def __enter__(self):
        def wrapper(*args, **kwargs):
            bound = self.signature.bind(*args, **kwargs)
            bound.apply_defaults()
            a = dict(bound.arguments)
            before = self.before(a) if self.before else None
            caller = sys._getframe(1).f_code.co_name
            result = self.original(*args, **kwargs)
            self.calls.append(Spy.Call(a, result, before, caller))
            return result
        self.patch = mock.patch.object(self.obj, self.name, wrapper)
        self.patch.start()
        return self

    def __exit__(self, *exc):
        self.patch.stop()
        return False

    def by(self, caller):
        return [c for c in self.calls if c.caller == caller]


def run_spied(module, argv, spies):
    """run_main(module, argv) with every Spy in `spies` active."""
    with contextlib.ExitStack() as stack:
        for spy in spies:
            stack.enter_context(spy)
        return run_main(module, argv)


WIRING_SEED = 1      # not 0, the default, so that a seed that is dropped on the way shows
WIRING_RUN = ["--sft-steps", "5", "--eval-samples", "16", "--batch-size", "8", "--device", "cpu",
              "--seed", str(WIRING_SEED)]
_wiring_sft = {}


def wiring_sft():
    """(folder, SFT model): the SFT cache that WIRING_RUN's runs load (the default task, 5 steps), built
    once per test process, and the SFT model read back from it independently of any script."""
    if not _wiring_sft:
        _wiring_sft["tmp"] = tempfile.TemporaryDirectory()
        with contextlib.redirect_stderr(io.StringIO()):
            sft, _ = model.sft_model(data.Task(data.TaskConfig(), seed=WIRING_SEED), CPU, _wiring_sft["tmp"].name,
                                     WIRING_SEED, 5, quiet=True)
        _wiring_sft["model"] = sft
    return _wiring_sft["tmp"].name, _wiring_sft["model"]


def rows_of(ids):
    """The rows of a token tensor as tuples, trailing padding removed (so trimmed and full rows compare)."""
    out = []
    for row in ids.tolist():
        while row and row[-1] == data.PAD_ID:
            row.pop()
        out.append(tuple(row))
    return out


def logps_of(m, ids, mask):
    """log pi(y|x) of each row under m, one row set at a time (no stacking, no batching): [B]."""
    with torch.no_grad():
        return model.sequence_logps(m, ids, mask)[0]


def pair_logps_of(policy, ref, batch):
    """What a pairwise loss should receive for one batch: the policy's and the reference's log-probs of y_w
    and y_l, each computed alone (logps_of), under the argument names of dpo_loss and sppo_hard_loss."""
    return {"policy_chosen_logps": logps_of(policy, batch["chosen_ids"], batch["chosen_mask"]),
            "policy_rejected_logps": logps_of(policy, batch["rejected_ids"], batch["rejected_mask"]),
            "ref_chosen_logps": logps_of(ref, batch["chosen_ids"], batch["chosen_mask"]),
            "ref_rejected_logps": logps_of(ref, batch["rejected_ids"], batch["rejected_mask"])}


def with_weights(state):
    """A GPT holding a copy of `state` (a state_dict), in eval mode."""
    m = model.GPT(model.GPTConfig())
    m.load_state_dict(state)
    m.eval()
    return m


def heldout_rewards_check(test, metrics, chosen_rewards, rejected_rewards, policy_logps):
    """reward_accuracy and ranking_agreement in metrics.json against a recomputation written out here:
    the fraction of held-out pairs whose reward puts y_w first, and the fraction on which the reward's
    order (+1, 0, -1) equals the average log-likelihood's."""
    pc, pr, lc, lr = policy_logps
    accuracy = (chosen_rewards > rejected_rewards).double().mean().item()
    agreement = (torch.sign(chosen_rewards - rejected_rewards) == torch.sign(pc / lc - pr / lr)).double().mean().item()
    test.assertAlmostEqual(metrics["reward_accuracy"], accuracy, places=6, msg="reward accuracy on held-out pairs")
    test.assertAlmostEqual(metrics["ranking_agreement"], agreement, places=6, msg="ranking agreement on held-out pairs")


EVALUATION_KEYS = ["win_rate_vs_sft", "score", "sft_score", "length", "sft_length", "kl_to_sft", "sft_win_rate_vs_sft"]


class BigramStub(nn.Module):
    """A language model whose next-token logits depend only on the current token: `first` after SEP (the
    first response token), `rest` after any other token. Its sequence log-probs are known in closed form."""

    def __init__(self, first, rest):
        super().__init__()
        self.first, self.rest = first, rest
        self.blocks = nn.ModuleList()          # model.sample builds one cache per block: none

    def forward(self, idx, caches=None):
        return torch.where((idx == data.SEP_ID)[..., None], self.first, self.rest)


IMPOSSIBLE = -1e9     # a logit that makes a token's probability exactly 0 while its log-prob stays finite


def logits_row(words=(), eos=0.0):
    """Next-token logits: the `words` (a list of ids) share probability 1 - eos equally, EOS gets eos."""
    row = torch.full((len(data.VOCAB),), IMPOSSIBLE)
    if len(words) and eos < 1:
        row[torch.as_tensor(list(words))] = math.log((1 - eos) / len(words))
    if eos > 0:
        row[data.EOS_ID] = math.log(eos)
    return row


POS, NEG = data.POS_IDS.tolist(), data.NEG_IDS.tolist()
POSITIVE_WRITER = BigramStub(logits_row(POS), logits_row(POS, eos=1.0))                # one positive word, EOS
NEGATIVE_WRITER = BigramStub(logits_row(NEG), logits_row(NEG, eos=0.25))               # negative words, ~4 of them
EITHER_WRITER = BigramStub(logits_row(POS + NEG), logits_row(POS, eos=1.0))            # one word of either kind, EOS


class TestWiringEvaluation(unittest.TestCase):
    """data.head_to_head and data.evaluate with models whose answers are known: which way round the win
    rate is, the sign of the KL, which samples are whose, which prompts are used."""

    def test_writer_of_positive_words_beats_writer_of_negative_ones(self):
        """Every policy review scores +1 and every baseline review -1, so each comparison is
        sigmoid((1 - (-1)) / tau): near 1 one way round, near 0 the other, with the task's own tau."""
        for tau in (0.2, 1.0):
            task = small_task(seed=20, tau=tau)
            with self.subTest(tau=tau):
                r = data.head_to_head(POSITIVE_WRITER, NEGATIVE_WRITER, task, CPU, 64, seed=3)
                self.assertAlmostEqual(r["win_rate"], sig(2 / tau), places=5,
                                       msg="win rate must be P(policy sample > baseline sample), with the task's tau")
                self.assertEqual((r["score"], r["baseline_score"]), (1.0, -1.0))
                self.assertEqual(r["length"], 1.0)                        # the policy's reviews: one word
                self.assertGreater(r["baseline_length"], 2.0)             # the baseline's: about 4
                self.assertGreater(r["kl"], 100.0)                        # the baseline cannot write positive words
                back = data.head_to_head(NEGATIVE_WRITER, POSITIVE_WRITER, task, CPU, 64, seed=3)
                self.assertAlmostEqual(back["win_rate"], sig(-2 / tau), places=5)
        self.assertGreater(sig(2 / 0.2), 0.9999)

    def test_kl_of_constructed_models_in_closed_form(self):
        """The policy writes one positive word (16 to choose from) and stops; the baseline one word of 32 and
        stops. Every policy review y has log pi(y|x) - log base(y|x) = log(1/16) - log(1/32) = log 2, so the
        estimate of KL(policy || baseline) is log 2 exactly, sample by sample."""
        task = small_task(seed=21)
        r = data.head_to_head(POSITIVE_WRITER, EITHER_WRITER, task, CPU, 64, seed=4)
        self.assertAlmostEqual(r["kl"], math.log(2), places=5,
                               msg="KL must be E_{y~policy}[log policy(y|x) - log baseline(y|x)] on the policy's samples")
        # the other way round the policy writes negative words half of the time, which the baseline never
        # does: log-ratios of about 1e9 on those, so a huge positive KL (never a negative one)
        self.assertGreater(data.head_to_head(EITHER_WRITER, POSITIVE_WRITER, task, CPU, 64, seed=4)["kl"], 1e6)

    def test_kl_between_two_different_models_is_positive(self):
        """Two random models that sample what they score (no mass on the tokens the sampler bans): the
        estimate of KL(a || b) is positive both ways round, and 0 from a model to itself."""
        task = small_task(seed=22)
        g = torch.Generator().manual_seed(0)
        allowed = [i for i in range(len(data.VOCAB)) if i not in data.BANNED_IN_RESPONSE]

        def random_writer():
            first, rest = (torch.full((len(data.VOCAB),), IMPOSSIBLE) for _ in range(2))
            first[allowed] = torch.randn(len(allowed), generator=g) * 2
            first[data.EOS_ID] = IMPOSSIBLE
            rest[allowed] = torch.randn(len(allowed), generator=g) * 2
            rest[data.EOS_ID] = 3.0                  # stop after a few words
            return BigramStub(first, rest)

        a, b = random_writer(), random_writer()
        for policy, baseline in ((a, b), (b, a)):
            self.assertGreater(data.head_to_head(policy, baseline, task, CPU, 128, seed=5)["kl"], 1.0)
        self.assertEqual(data.head_to_head(a, a, task, CPU, 64, seed=5)["kl"], 0.0)

    def test_evaluate_names_each_number_after_its_model(self):
        """evaluate(policy, sft): the policy's numbers under the policy's names, the SFT model's under sft_*,
        samples from each, on held-out prompts."""
        task = small_task(seed=23)
        e = data.evaluate(POSITIVE_WRITER, NEGATIVE_WRITER, task, CPU, 48, seed=2)
        self.assertAlmostEqual(e["win_rate_vs_sft"], sig(2 / task.config.tau), places=6)
        self.assertEqual((e["score"], e["sft_score"], e["length"]), (1.0, -1.0, 1.0))
        self.assertGreater(e["sft_length"], 2.0)
        self.assertGreater(e["kl_to_sft"], 100.0)
        self.assertEqual(e["sft_win_rate_vs_sft"], 0.5)          # the SFT model's reviews all score -1: ties
        words = lambda samples: {w for row in samples for w in data.decode(row).split()}
        self.assertLessEqual(words(e["samples"]), set(data.POSITIVE))
        self.assertLessEqual(words(e["sft_samples"]), set(data.NEGATIVE))
        self.assertTrue(torch.equal(e["prompts"], task.eval_prompts(48)))

    def test_evaluation_samples_heldout_prompts_only(self):
        task = small_task(seed=24)
        held = set(rows_of(task.heldout_prompts))
        with Spy(data, "sample") as spy:
            e = data.evaluate(sharp_model(32), sharp_model(33).state_dict(), task, CPU, 40, seed=1)
        self.assertEqual(len(spy.calls), 3)                      # the policy, the SFT model, the SFT model again
        for call in spy.calls:
            self.assertLessEqual(set(rows_of(call.a["prompts"])), held, "evaluation must sample held-out prompts")
        self.assertLessEqual(set(rows_of(e["prompts"])), held)
        self.assertEqual(len(set(rows_of(e["prompts"]))), min(40, len(held)))   # cycling through all of them

    def test_sft_win_rate_is_the_sft_model_scored_as_a_policy(self):
        """sft_win_rate_vs_sft is what win_rate_vs_sft would be if the policy were the SFT model: the same
        number for any policy, for a model or a state_dict baseline, and measured (not 1/2 by fiat)."""
        task = small_task(seed=25)
        sft = EITHER_WRITER          # its reviews score +1 or -1: comparisons are not all ties
        itself = data.evaluate(sft, sft, task, CPU, 64, seed=3)["win_rate_vs_sft"]
        for policy in (POSITIVE_WRITER, NEGATIVE_WRITER):
            self.assertEqual(data.evaluate(policy, sft, task, CPU, 64, seed=3)["sft_win_rate_vs_sft"], itself)
        self.assertNotEqual(itself, 0.5)
        self.assertLess(abs(itself - 0.5), 0.15)
        gpt_sft, policy = sharp_model(34), sharp_model(35)
        itself = data.evaluate(gpt_sft, gpt_sft, task, CPU, 32, seed=0)["win_rate_vs_sft"]
        as_state = data.evaluate(policy, gpt_sft.state_dict(), task, CPU, 32, seed=0)
        self.assertAlmostEqual(as_state["sft_win_rate_vs_sft"], itself, places=6)


class TestWiringData(unittest.TestCase):
    """data.py's connectors: start_run, pair_logps_all, pair_log_row; model.py's SFT start."""

    def test_start_run_builds_the_task_and_sft_model_the_flags_ask_for(self):
        with tempfile.TemporaryDirectory() as d:
            args = dpo.parser.parse_args(["--device", "cpu", "--tau", "0.3", "--length-bias", "0.2", "--pair-style",
                                          "0.5", "--seed", "3", "--sft-steps", "2", "--out", os.path.join(d, "out"),
                                          "--sft-dir", os.path.join(d, "sft"), "--n-layer", "1", "--n-embd", "16"])
            small = model.GPTConfig(n_layer=1, n_head=2, n_embd=16)   # the size flags reach the SFT model
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                device, task, policy, info = data.start_run(args)
                want = data.Task(data.TaskConfig(tau=0.3, length_bias=0.2, pair_style=0.5), seed=3)
                # the same settings again, straight to the SFT cache: a hit, so the same weights, if and only if
                # start_run trained with this seed, these steps and these demonstrations
                with mock.patch.object(torch.optim, "AdamW", side_effect=AssertionError("not the cached SFT model")):
                    again, again_info = model.sft_model(want, CPU, args.sft_dir, 3, 2, small)
            self.assertTrue(os.path.isdir(args.out))
        self.assertEqual(device, CPU)
        self.assertEqual(task.config, want.config)
        for key in ("chosen_ids", "rejected_ids"):
            self.assertTrue(torch.equal(task.pairs[key], want.pairs[key]), key)
        self.assertTrue(torch.equal(task.sft_ids, want.sft_ids))
        self.assertEqual((info["steps"], info["path"]), (2, again_info["path"]))
        self.assertTrue(state_equal(policy.state_dict(), again.state_dict()))

    def test_sft_trains_on_demonstrations_and_measures_on_heldout_ones(self):
        task = small_task(seed=26)
        demos, held = set(rows_of(task.sft_ids)), set(rows_of(task.sft_heldout_ids))
        pairs = set(rows_of(task.pairs["chosen_ids"])) | set(rows_of(task.pairs["rejected_ids"]))
        before = lambda a: torch.is_grad_enabled()
        with tempfile.TemporaryDirectory() as d, Spy(model, "sequence_logps", before) as spy, \
                contextlib.redirect_stderr(io.StringIO()):
            model.sft_model(task, CPU, d, seed=0, steps=3, quiet=True)
        training = [c for c in spy.calls if c.before]
        measuring = [c for c in spy.calls if not c.before]
        self.assertEqual(len(training), 3)
        for c in training:
            rows = set(rows_of(c.a["input_ids"]))
            self.assertLessEqual(rows, demos, "SFT must train on the demonstrations (task.sft_ids)")
            self.assertFalse(rows & pairs)
        self.assertEqual(len(measuring), 2)                      # cross-entropy before and after
        for c in measuring:
            self.assertEqual(set(rows_of(c.a["input_ids"])), held, "SFT cross-entropy is measured on held-out demonstrations")

    def test_sft_ce_is_per_response_token_and_batching_changes_nothing(self):
        m, task = sharp_model(36), small_task(seed=27)
        ids, mask = task.sft_heldout_ids, task.sft_heldout_mask
        logps, lengths = logps_of(m, ids, mask), mask[:, 1:].sum(1).float()
        batched = model.sequence_logps_all(m, ids, mask, batch_size=5)           # 16 rows: batches of 5, 5, 5, 1
        torch.testing.assert_close(batched[0], logps, rtol=0, atol=1e-4)
        self.assertTrue(torch.equal(batched[1], lengths))
        self.assertAlmostEqual(model.sft_ce(m, ids, mask), -logps.double().sum().item() / lengths.sum().item(), places=4)

    def test_pair_logps_all_keeps_pairs_sides_and_order(self):
        m, pairs = sharp_model(37), small_task(seed=28).pairs                     # 16 pairs
        got = data.pair_logps_all(m, pairs, CPU, batch_size=5)
        want = (logps_of(m, pairs["chosen_ids"], pairs["chosen_mask"]),
                logps_of(m, pairs["rejected_ids"], pairs["rejected_mask"]),
                pairs["chosen_mask"][:, 1:].sum(1).float(), pairs["rejected_mask"][:, 1:].sum(1).float())
        self.assertEqual(len(got), 4)
        for name, g, w in zip(("chosen logps", "rejected logps", "chosen lengths", "rejected lengths"), got, want):
            self.assertEqual(g.shape, (16,), name)
            torch.testing.assert_close(g, w, rtol=0, atol=1e-4, msg=name)

    def test_pair_log_row_puts_each_number_under_its_name(self):
        chosen_rewards, rejected_rewards = t(1.0, -2.0, 3.0, 0.5), t(0.0, -1.0, 1.0, 0.5)
        row = data.pair_log_row(7, t(0.25), chosen_rewards, rejected_rewards, t(-3.0, -5.0), t(-8.0, -10.0))
        self.assertEqual(row["step"], 7)
        self.assertEqual(row["loss"], 0.25)
        self.assertAlmostEqual(row["rewards/chosen"], 2.5 / 4)
        self.assertAlmostEqual(row["rewards/rejected"], 0.5 / 4)
        self.assertAlmostEqual(row["rewards/accuracies"], 2 / 4)      # 1 > 0, 3 > 1; -2 < -1; a tie is not
        self.assertAlmostEqual(row["rewards/margins"], 2.0 / 4)
        self.assertEqual((row["logps/chosen"], row["logps/rejected"]), (-4.0, -9.0))


def policy_snapshot(start_run_spy):
    """A Spy `before` hook: a copy of the weights of the policy that start_run returned, as they are now."""
    return lambda a: {k: v.detach().clone() for k, v in start_run_spy.calls[0].result[2].state_dict().items()}


class ScriptWiring:
    """A method script's main(), run once in this process (setUpClass) with its connections spied on;
    the mixin's tests are the checks every method shares."""
    module = None
    extra = []

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.out = os.path.join(cls.tmp.name, "run")
        sft_dir, cls.sft = wiring_sft()
        start = Spy(data, "start_run")
        cls.spy = {"start_run": start, "pair_batch": Spy(data, "pair_batch", policy_snapshot(start)),
                   "evaluate": Spy(data, "evaluate"), "head_to_head": Spy(data, "head_to_head"),
                   "pair_logps_all": Spy(data, "pair_logps_all"), "eval_sample": Spy(data, "sample"),
                   "table": Spy(data, "print_sft_vs_policy"), **cls.more_spies()}
        run_spied(cls.module, WIRING_RUN + cls.extra + ["--out", cls.out, "--sft-dir", sft_dir], cls.spy.values())
        _, cls.task, cls.policy, _ = start.calls[0].result
        cls.metrics = read_json(os.path.join(cls.out, "metrics.json"))
        cls.log = read_jsonl(os.path.join(cls.out, "log.jsonl"))
        cls.trained, _ = model.load_checkpoint(os.path.join(cls.out, "model.pt"))

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    @classmethod
    def more_spies(cls):
        return {}

    def test_evaluation_compares_the_trained_policy_with_the_sft_model(self):
        call = self.spy["evaluate"].calls[-1]                   # (SPPO evaluates after every iteration)
        self.assertIs(call.a["policy"], self.policy, "evaluate(policy, sft, ...): the trained policy first")
        self.assertTrue(state_equal(call.a["policy"].state_dict(), self.trained.state_dict()))
        sft = call.a["sft"]
        sft_state = sft if isinstance(sft, dict) else sft.state_dict()
        self.assertTrue(state_equal(sft_state, self.sft.state_dict()), "the baseline must be the SFT model")
        self.assertEqual((call.a["n_samples"], call.a["seed"]), (16, WIRING_SEED))

    def test_evaluation_sees_heldout_prompts_and_pairs_only(self):
        held = set(rows_of(self.task.heldout_prompts))
        self.assertTrue(self.spy["eval_sample"].calls)
        for call in self.spy["eval_sample"].calls:
            self.assertLessEqual(set(rows_of(call.a["prompts"])), held)
        self.assertTrue(self.spy["pair_logps_all"].calls)
        for call in self.spy["pair_logps_all"].calls:
            self.assertIs(call.a["pairs"], self.task.heldout_pairs, "held-out metrics must use task.heldout_pairs")

    def test_training_sees_training_pairs_only(self):
        calls = self.spy["pair_batch"].by("main")
        self.assertEqual(len(calls), self.steps)
        g = torch.Generator().manual_seed(WIRING_SEED)       # the batches are the seeded draws, in order
        for call in calls:
            self.assertIs(call.a["pairs"], self.task.pairs, "training batches must come from task.pairs")
            want = torch.randint(0, self.task.pairs["chosen_ids"].shape[0], (8,), generator=g)
            self.assertTrue(torch.equal(call.a["idx"].cpu(), want))

    def test_evaluation_numbers_match_a_recomputation(self):
        """metrics.json's evaluation, recomputed from model.pt and the SFT cache alone."""
        e = data.evaluate(self.trained, self.sft, self.task, CPU, 16, seed=WIRING_SEED)
        for key in EVALUATION_KEYS:
            self.assertAlmostEqual(self.metrics[key], e[key], places=5, msg=key)
        self.assertAlmostEqual(e["sft_win_rate_vs_sft"],
                               data.head_to_head(self.sft, self.sft, self.task, CPU, 16, 10_000 + WIRING_SEED)["win_rate"])

    def test_end_of_run_table_gets_this_runs_numbers(self):
        (call,) = self.spy["table"].calls
        self.assertAlmostEqual(call.a["metrics"]["win_rate_vs_sft"], self.metrics["win_rate_vs_sft"])
        self.assertAlmostEqual(call.a["result"]["sft_win_rate_vs_sft"], self.metrics["sft_win_rate_vs_sft"])
        self.assertEqual(call.a["sft_metrics"], self.sft_column())
        # DPO's and SPPO's SFT column is 0 by definition (a reward that ties every pair): said under the table
        self.assertEqual(call.a["note"] is not None, self.sft_column() == {"reward_accuracy": 0.0, "ranking_agreement": 0.0})


def heldout_logps(m, task):
    return data.pair_logps_all(m, task.heldout_pairs, CPU)


class TestWiringDPO(ScriptWiring, unittest.TestCase):
    """dpo.py: 3 steps with beta 0.5 and a learning rate high enough that the policy moves at every step."""
    module, steps = dpo, 3
    extra = ["--steps", "3", "--beta", "0.5", "--lr", "1e-2"]

    @classmethod
    def more_spies(cls):
        return {"dpo_loss": Spy(dpo, "dpo_loss")}

    def test_reference_changes_the_loss_after_step_0(self):
        """With the reference = the policy itself, every step's rewards are 0 and its loss ln 2."""
        self.assertAlmostEqual(self.log[0]["loss"], math.log(2), places=6)     # step 0: pi_theta = pi_ref
        for row in self.log[1:]:
            self.assertGreater(abs(row["loss"] - math.log(2)), 1e-3, f"step {row['step']}: loss still ln 2")
            self.assertNotEqual(row["rewards/chosen"], 0.0)
            self.assertNotEqual(row["rewards/margins"], 0.0)

    def test_every_step_is_the_dpo_loss_of_its_batch(self):
        """Step by step: the policy's log-probs of the batch (its weights at that step), the SFT model's as
        the reference, --beta, chosen and rejected in their places, and the logged loss [DPO-1] of those."""
        losses = [c for c in self.spy["dpo_loss"].calls if len(c.a["policy_chosen_logps"]) == 8]   # not held-out
        self.assertEqual(len(losses), self.steps)
        for step, (batch_call, loss_call) in enumerate(zip(self.spy["pair_batch"].by("main"), losses)):
            with self.subTest(step=step):
                b, a = batch_call.result, loss_call.a
                current = with_weights(batch_call.before)
                want = pair_logps_of(current, self.sft, b)
                for name, value in want.items():
                    torch.testing.assert_close(a[name].detach(), value, rtol=0, atol=1e-3, msg=name)
                self.assertTrue(a["policy_chosen_logps"].requires_grad)
                self.assertFalse(a["ref_chosen_logps"].requires_grad)
                self.assertEqual(a["beta"], 0.5)
                margin = (want["policy_chosen_logps"] - want["ref_chosen_logps"]) - (
                    want["policy_rejected_logps"] - want["ref_rejected_logps"])
                self.assertAlmostEqual(self.log[step]["loss"], (-F.logsigmoid(0.5 * margin)).mean().item(), places=4)

    def test_heldout_rewards_match_a_recomputation(self):
        policy, sft = heldout_logps(self.trained, self.task), heldout_logps(self.sft, self.task)
        heldout_rewards_check(self, self.metrics, 0.5 * (policy[0] - sft[0]), 0.5 * (policy[1] - sft[1]), policy)

    def sft_column(self):
        return {"reward_accuracy": 0.0, "ranking_agreement": 0.0}    # the SFT model's DPO reward: 0, all ties


class TestWiringSimPO(ScriptWiring, unittest.TestCase):
    """simpo.py: 3 steps with beta 3 and gamma 0.6 (not the defaults, so a swap or a default shows)."""
    module, steps = simpo, 3
    extra = ["--steps", "3", "--beta", "3", "--gamma", "0.6", "--lr", "1e-2"]

    @classmethod
    def more_spies(cls):
        return {"simpo_loss": Spy(simpo, "simpo_loss")}

    def simpo_losses(self, m, b, beta, gamma, length_norm=True):
        pc, pr = logps_of(m, b["chosen_ids"], b["chosen_mask"]), logps_of(m, b["rejected_ids"], b["rejected_mask"])
        lc, lr = (b["chosen_mask"][:, 1:].sum(1).float(), b["rejected_mask"][:, 1:].sum(1).float()) if length_norm \
            else (1.0, 1.0)
        return -F.logsigmoid(beta * pc / lc - beta * pr / lr - gamma)

    def test_every_step_is_the_simpo_loss_of_its_batch(self):
        """Step by step: the policy's summed log-probs and |y| of the batch, --beta and --gamma in their
        places, and the logged loss [SimPO-4] of those."""
        losses = [c for c in self.spy["simpo_loss"].calls if len(c.a["policy_chosen_logps"]) == 8]  # not held-out
        self.assertEqual(len(losses), self.steps)
        for step, (batch_call, loss_call) in enumerate(zip(self.spy["pair_batch"].by("main"), losses)):
            with self.subTest(step=step):
                b, a = batch_call.result, loss_call.a
                current = with_weights(batch_call.before)
                self.assertEqual((a["beta"], a["gamma"]), (3.0, 0.6))
                self.assertTrue(torch.equal(a["chosen_lengths"], b["chosen_mask"][:, 1:].sum(1).float()))
                self.assertTrue(torch.equal(a["rejected_lengths"], b["rejected_mask"][:, 1:].sum(1).float()))
                torch.testing.assert_close(a["policy_chosen_logps"].detach(),
                                           logps_of(current, b["chosen_ids"], b["chosen_mask"]), rtol=0, atol=1e-3)
                self.assertAlmostEqual(self.log[step]["loss"], self.simpo_losses(current, b, 3.0, 0.6).mean().item(),
                                       places=4)

    def test_no_length_norm_sums_the_log_probs(self):
        """--no-length-norm: the first step's loss is [SimPO-4] with |y| = 1 (and not the normalised one)."""
        with tempfile.TemporaryDirectory() as d:
            run_main(simpo, WIRING_RUN + ["--steps", "1", "--beta", "3", "--gamma", "0.6", "--no-length-norm",
                                          "--out", d, "--sft-dir", wiring_sft()[0]])
            loss = read_jsonl(os.path.join(d, "log.jsonl"))[0]["loss"]
        b = self.spy["pair_batch"].by("main")[0].result             # the same seed: the same first batch
        self.assertAlmostEqual(loss, self.simpo_losses(self.sft, b, 3.0, 0.6, length_norm=False).mean().item(), places=3)
        self.assertNotAlmostEqual(loss, self.simpo_losses(self.sft, b, 3.0, 0.6).mean().item(), places=2)

    def test_heldout_rewards_match_a_recomputation(self):
        policy = heldout_logps(self.trained, self.task)
        heldout_rewards_check(self, self.metrics, 3.0 * policy[0] / policy[2], 3.0 * policy[1] / policy[3], policy)

    def sft_column(self):
        """The SFT model's own SimPO reward, (beta/|y|) log pi_sft(y|x): accurate where its average
        log-likelihood puts y_w first, and in agreement with it everywhere."""
        pc, pr, lc, lr = heldout_logps(self.sft, self.task)
        return {"reward_accuracy": (pc / lc > pr / lr).float().mean().item(), "ranking_agreement": 1.0}


class TestWiringSPPO(ScriptWiring, unittest.TestCase):
    """sppo.py: two self-play iterations of 2 steps (K = 2, eta 10, tau 0.5: not the defaults), and the hard
    variant once, each with its connections spied on."""
    module, steps = sppo, 0            # self-play draws no preference pairs at all
    extra = ["--steps", "2", "--k", "2", "--iterations", "2", "--eta", "10", "--tau", "0.5"]

    @classmethod
    def more_spies(cls):
        return {"iteration": Spy(sppo, "self_play_iteration"), "play_sample": Spy(sppo, "sample")}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        start = Spy(data, "start_run")
        cls.hard_spy = {"start_run": start, "hard_fit": Spy(sppo, "hard_fit"),
                        "pair_batch": Spy(data, "pair_batch", policy_snapshot(start)),
                        "hard_loss": Spy(sppo, "sppo_hard_loss")}
        cls.hard_out = os.path.join(cls.tmp.name, "hard")
        run_spied(sppo, WIRING_RUN + ["--variant", "hard", "--steps", "2", "--eta", "10", "--out", cls.hard_out,
                                      "--sft-dir", wiring_sft()[0]], cls.hard_spy.values())

    def test_self_play_runs_on_the_training_prompts(self):
        """Each iteration samples from pi_t on task.train_prompts, never on the held-out prompts, with
        --k, --eta and the task's tau."""
        calls = self.spy["iteration"].calls
        self.assertEqual([c.a["iteration"] for c in calls], [1, 2])
        for c in calls:
            self.assertTrue(torch.equal(c.a["prompts"], self.task.train_prompts), "self-play must use task.train_prompts")
            self.assertIs(c.a["policy"], self.policy)
            self.assertEqual((c.a["k"], c.a["eta"], c.a["tau"]), (2, 10.0, 0.5))
        train = set(rows_of(self.task.train_prompts))
        self.assertTrue(self.spy["play_sample"].calls)
        for c in self.spy["play_sample"].calls:
            self.assertLessEqual(set(rows_of(c.a["prompts"])), train)
        # pi_1 is the SFT model, pi_2 the policy after iteration 1 (not the SFT model)
        pi_1, pi_2 = (c.result[0] for c in calls)
        self.assertTrue(state_equal(pi_1.state_dict(), self.sft.state_dict()))
        self.assertFalse(state_equal(pi_2.state_dict(), self.sft.state_dict()))

    def test_each_iteration_is_compared_with_the_one_before(self):
        """win_rate_vs_prev of iteration 2 is pi_3 (the final policy) against pi_2, that way round."""
        pi_2 = self.spy["iteration"].calls[1].result[0]
        vs_prev = [c for c in self.spy["head_to_head"].calls if c.a["baseline"] is pi_2]
        self.assertEqual(len(vs_prev), 1)
        self.assertIs(vs_prev[0].a["policy"], self.policy)
        again = data.head_to_head(self.trained, pi_2, self.task, CPU, 16, 10_000 + WIRING_SEED)["win_rate"]
        self.assertAlmostEqual(self.metrics["win_rate_vs_prev_per_iteration"][1], again, places=6)
        self.assertEqual(self.metrics["win_rate_vs_prev_per_iteration"][0], self.metrics["win_rate_vs_sft_per_iteration"][0])

    def test_training_sees_training_pairs_only(self):
        self.assertEqual(self.spy["pair_batch"].by("main"), [])  # self-play: prompts only, no pairs
        (fit,) = self.hard_spy["hard_fit"].calls
        _, task, policy, _ = self.hard_spy["start_run"].calls[0].result
        self.assertIs(fit.a["pairs"], task.pairs, "--variant hard must fit task.pairs")
        self.assertIs(fit.a["policy"], policy)
        self.assertIsNot(fit.a["ref"], policy)
        self.assertTrue(state_equal(fit.a["ref"].state_dict(), self.sft.state_dict()))
        self.assertEqual(len(self.hard_spy["pair_batch"].by("hard_fit")), 2)
        for c in self.hard_spy["pair_batch"].by("hard_fit"):
            self.assertIs(c.a["pairs"], task.pairs)

    def test_hard_variant_every_step_is_its_batch(self):
        """--variant hard, step by step: the reference log-probs are the SFT model's on that batch, y_w's
        and y_l's in their places, the policy's are those of its current weights, eta from --eta."""
        batches, losses = self.hard_spy["pair_batch"].by("hard_fit"), self.hard_spy["hard_loss"].calls
        self.assertEqual((len(batches), len(losses)), (2, 2))
        log = read_jsonl(os.path.join(self.hard_out, "log.jsonl"))
        for step, (bc, lc) in enumerate(zip(batches, losses)):
            with self.subTest(step=step):
                b, a = bc.result, lc.a
                current = with_weights(bc.before)
                want = pair_logps_of(current, self.sft, b)
                for name, value in want.items():
                    torch.testing.assert_close(a[name].detach(), value, rtol=0, atol=1e-3, msg=name)
                self.assertEqual(a["eta"], 10.0)
                a_w = want["policy_chosen_logps"] - want["ref_chosen_logps"]
                a_l = want["policy_rejected_logps"] - want["ref_rejected_logps"]
                self.assertAlmostEqual(log[step]["loss"], ((a_w - 5.0) ** 2 + (a_l + 5.0) ** 2).mean().item(), places=3)

    def test_heldout_rewards_match_a_recomputation(self):
        """The implicit reward (1/eta) log pi_theta/pi_sft on held-out pairs, and the per-iteration win rates."""
        policy, sft = heldout_logps(self.trained, self.task), heldout_logps(self.sft, self.task)
        heldout_rewards_check(self, self.metrics, (policy[0] - sft[0]) / 10.0, (policy[1] - sft[1]) / 10.0, policy)
        self.assertEqual(self.metrics["win_rate_vs_sft_per_iteration"][-1], self.metrics["win_rate_vs_sft"])

    def sft_column(self):
        return {"reward_accuracy": 0.0, "ranking_agreement": 0.0}    # (1/eta) log pi_1/pi_1 = 0: all ties


class TestWiringSelfPlay(unittest.TestCase):
    """sppo.self_play_iteration: each sample's win rate belongs to that sample, among its own prompt's K."""

    @classmethod
    def setUpClass(cls):
        task = small_task(seed=29)
        cls.prompts = task.train_prompts[:6]
        torch.manual_seed(1)
        policy = model.GPT(model.GPTConfig())      # untrained: reviews of every quality, so the win rates vary
        cls.spy = {"draws": Spy(sppo, "sample_responses"), "batch": Spy(sppo, "trim"), "loss": Spy(sppo, "sppo_loss")}
        with contextlib.ExitStack() as stack:
            for s in cls.spy.values():
                stack.enter_context(s)
            cls.pi_t, cls.stats = sppo.self_play_iteration(
                policy, cls.prompts, iteration=1, k=3, eta=8.0, tau=0.3, steps=3, batch_size=8, lr=1e-2, device=CPU,
                sampler=model.make_generator(CPU, 0), batch_order=torch.Generator().manual_seed(0), log_rows=[],
                quiet=True)
        (draw,) = cls.spy["draws"].calls
        rows, responses = draw.result
        cls.samples = rows_of(torch.cat([rows, responses], dim=1))       # prompt + response of each sample
        cls.scores = data.score_responses(responses)
        # the win rate of sample i, from its definition [SPPO-5]: the mean over the K samples OF THE SAME
        # PROMPT of P(y_i > y_j | x), its tie with itself (1/2) included
        prompt_of = [tuple(r) for r in rows.tolist()]
        cls.groups = {p: [j for j, q in enumerate(prompt_of) if q == p] for p in set(prompt_of)}
        cls.expected = torch.tensor([
            sum(0.5 if j == i else sig((cls.scores[i] - cls.scores[j]).item() / 0.3) for j in cls.groups[prompt_of[i]]) / 3
            for i in range(len(prompt_of))])
        cls.prompt_of = prompt_of

    def test_k_samples_for_every_prompt(self):
        self.assertEqual(len(self.groups), 6)
        self.assertEqual(sorted(len(g) for g in self.groups.values()), [3] * 6)
        self.assertEqual(set(self.groups), set(rows_of(self.prompts)))

    def test_win_rates_average_one_half_prompt_by_prompt(self):
        full = [c for c in self.spy["loss"].calls if len(c.a["win_prob"]) == 18]
        win_prob = full[0].a["win_prob"]                 # loss_before: every sample's win rate, in sample order
        for prompt, group in self.groups.items():
            self.assertAlmostEqual(win_prob[group].mean().item(), 0.5, places=5,
                                   msg="the K win rates of one prompt must average 1/2")
        self.assertGreater(win_prob.std().item(), 0.05)         # and they are not all 1/2

    def test_each_win_rate_is_attached_to_its_own_sample(self):
        full = [c for c in self.spy["loss"].calls if len(c.a["win_prob"]) == 18][0].a["win_prob"]
        torch.testing.assert_close(full, self.expected, rtol=0, atol=1e-5)
        # and in every training batch: the row fitted, its target's win rate, its reference log-prob
        steps = self.spy["loss"].calls[:3]
        self.assertEqual(len(self.spy["batch"].calls), 3)
        for batch_call, loss_call in zip(self.spy["batch"].calls, steps):
            ids, mask = batch_call.result
            for row, p, ref in zip(rows_of(ids), loss_call.a["win_prob"], loss_call.a["ref_logps"]):
                i = self.samples.index(row)
                self.assertAlmostEqual(p.item(), self.expected[i].item(), places=5)
            torch.testing.assert_close(loss_call.a["ref_logps"], logps_of(self.pi_t, ids, mask), rtol=0, atol=1e-4)
            self.assertEqual(loss_call.a["eta"], 8.0)


class TestEndOfRunTable(unittest.TestCase):
    def table(self, **kw):
        result = {"sft_score": -0.25, "sft_length": 9.5, "sft_win_rate_vs_sft": 0.486,
                  "prompts": torch.zeros(0, data.PROMPT_LEN, dtype=torch.long),
                  "samples": torch.zeros(0, 3, dtype=torch.long), "sft_samples": torch.zeros(0, 3, dtype=torch.long)}
        metrics = {"win_rate_vs_sft": 0.93, "score": 0.7, "length": 6.5, "kl_to_sft": 4.25, "reward_accuracy": 0.8,
                   "ranking_agreement": 0.85, "seconds_per_step": 0.05, "peak_memory_mb": 48.0}
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            data.print_sft_vs_policy("DPO", result, metrics, **kw)
        return {line.split("  ")[0]: line.split()[-2:] for line in out.getvalue().splitlines() if "  " in line}, out.getvalue()

    def test_sft_column_is_measured_not_assumed(self):
        rows, _ = self.table(sft_metrics={"reward_accuracy": 0.0, "ranking_agreement": 0.0})
        self.assertEqual(rows["win rate vs SFT"], ["0.486", "0.930"])        # the SFT model against itself
        self.assertEqual(rows["score (judge)"], ["-0.250", "+0.700"])
        self.assertEqual(rows["length (words)"], ["9.50", "6.50"])
        self.assertEqual(rows["KL to SFT (nats)"], ["0.00", "4.25"])
        self.assertEqual(rows["reward accuracy"], ["0.000", "0.800"])
        self.assertEqual(rows["ranking agreement"], ["0.000", "0.850"])
        self.assertEqual(rows["seconds per step"], ["-", "0.0500"])           # a cost the SFT model never paid

    def test_note_under_the_table(self):
        note = data.tied_reward_note("beta log pi_theta/pi_ref")
        _, text = self.table(sft_metrics={"reward_accuracy": 0.0, "ranking_agreement": 0.0}, note=note)
        self.assertIn(note, text)
        self.assertIn("0 for every response", " ".join(note.split()))
        self.assertTrue(all(len(line) <= 100 for line in note.splitlines()))
        _, text = self.table()
        self.assertNotIn("SFT column", text)

    def test_ties_order_nothing(self):
        """A reward that is the same for every response (DPO's and SPPO's at pi_theta = pi_ref) is right about
        no pair and agrees with the likelihood on none, whichever way the likelihood orders them."""
        zero = torch.zeros(4)
        m = data.ranking_metrics(zero, zero, t(-1.0, -5.0, -2.0, -3.0), t(-2.0, -1.0, -2.0, -9.0), torch.ones(4), torch.ones(4))
        self.assertEqual(m["reward_accuracy"], 0.0)
        self.assertEqual(m["ranking_agreement"], 1 / 4)       # only the third pair, where the likelihood ties too


# ====================================================================================================
# Moved out of the write-it-yourself classes, which test one function alone: what is built on it
# ====================================================================================================

class TestSPPOHardLoss(unittest.TestCase):
    def test_hard_variant_equals_the_two_squares(self):
        g = torch.Generator().manual_seed(0)
        pc, pr, rc, rr = (-torch.rand(6, generator=g) * 30 for _ in range(4))
        for eta in (0.1, 2.0, 20.0):
            with self.subTest(eta=eta):
                a_w, a_l = (pc - rc).tolist(), (pr - rr).tolist()
                want = [(w - eta / 2) ** 2 + (l + eta / 2) ** 2 for w, l in zip(a_w, a_l)]
                torch.testing.assert_close(sppo.sppo_hard_loss(pc, pr, rc, rr, eta), torch.tensor(want))
                # TRL's sppo_hard with beta = 1/eta: (a_w - 1/(2 beta))^2 + (a_l + 1/(2 beta))^2, the same sum;
                # the official SPPO trainer halves it, (loss_w + loss_l)/2 (Adam does not care)
                beta = 1 / eta
                trl = [(w - 1 / (2 * beta)) ** 2 + (l + 1 / (2 * beta)) ** 2 for w, l in zip(a_w, a_l)]
                torch.testing.assert_close(sppo.sppo_hard_loss(pc, pr, rc, rr, eta), torch.tensor(trl))


class TestPairLogps(unittest.TestCase):
    """What is built on sequence_logps: data.join's response mask, model.pair_logps, data.pair_batch."""

    @classmethod
    def setUpClass(cls):
        cls.m = sharp_model(4)
        task = small_task(seed=5)
        cls.ids, cls.mask = task.sft_ids[:5], task.sft_mask[:5]

    def test_join_masks_the_response_and_its_eos_only(self):
        prompt = torch.tensor([[data.BOS_ID] + data.encode("new horror film") + [data.SEP_ID]] * 2)
        r1 = data.encode("great acting") + [data.EOS_ID]                      # 2 words + EOS = 3 tokens
        r2 = data.encode("the plot was dull and boring") + [data.EOS_ID]      # 6 words + EOS = 7 tokens
        responses = torch.tensor([r1 + [data.PAD_ID] * 5, r2 + [data.PAD_ID] * 1])
        ids, mask = data.join(prompt, responses)
        self.assertEqual(mask[:, :data.PROMPT_LEN].sum().item(), 0)          # the prompt never counts
        self.assertEqual(mask[0].tolist(), [0] * 5 + [1] * 3 + [0] * 5)
        with torch.no_grad():
            _, lengths = model.sequence_logps(self.m, ids, mask)
        self.assertEqual(lengths.tolist(), [3.0, 7.0])                      # |y| includes EOS
        self.assertEqual(data.response_lengths(responses).tolist(), [2, 6])  # words only

    def test_pair_logps_equals_two_separate_calls(self):
        chosen_ids, chosen_mask = model.trim(self.ids[:3], self.mask[:3])
        rejected_ids, rejected_mask = F.pad(self.ids[2:5], (0, 3)), F.pad(self.mask[2:5], (0, 3))
        self.assertNotEqual(chosen_ids.shape[1], rejected_ids.shape[1])     # the padding path is exercised
        with torch.no_grad():
            pc, pr, lc, lr = model.pair_logps(self.m, chosen_ids, chosen_mask, rejected_ids, rejected_mask)
            sc, slc = model.sequence_logps(self.m, chosen_ids, chosen_mask)
            sr, slr = model.sequence_logps(self.m, rejected_ids, rejected_mask)
        torch.testing.assert_close(pc, sc, rtol=0, atol=1e-4)
        torch.testing.assert_close(pr, sr, rtol=0, atol=1e-4)
        self.assertTrue(torch.equal(lc, slc) and torch.equal(lr, slr))

    def test_pair_batch_trims_only_padding(self):
        task = small_task(seed=6)
        idx = torch.arange(6)
        batch = data.pair_batch(task.pairs, idx, CPU)
        full = task.pairs
        self.assertLessEqual(batch["chosen_ids"].shape[1], full["chosen_ids"].shape[1])
        for side in ("chosen", "rejected"):
            width = batch[f"{side}_ids"].shape[1]
            self.assertTrue((full[f"{side}_ids"][idx, width:] == data.PAD_ID).all())     # only PAD dropped
            self.assertTrue((batch[f"{side}_ids"][:, -1] != data.PAD_ID).any())          # and no more
        with torch.no_grad():
            a = model.pair_logps(self.m, **batch)
            b = model.pair_logps(self.m, full["chosen_ids"][idx], full["chosen_mask"][idx],
                                 full["rejected_ids"][idx], full["rejected_mask"][idx])
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-4)


# ====================================================================================================
# dpo.py --precompute-ref, the logps chart, and the run commands of data.py (sample, curves, logps, frontier)
# ====================================================================================================

_TINY_DPO = {}


def tiny_dpo_runs():
    """Two 4-step dpo.py runs made in this process once per test session, sharing a 5-step SFT cache: plain
    and --precompute-ref. Returns {"dir", "sft_dir", "plain", "pre"}; plain/pre hold the run folder, its
    stdout, and how often pi_ref ran a forward pass inside the training loop (dpo.pair_logps on a model
    with no trainable weights) or over the whole training set (data.pair_logps_all on 4000 pairs)."""
    if not _TINY_DPO:
        tmp = tempfile.TemporaryDirectory()
        unittest.addModuleCleanup(tmp.cleanup)
        d = tmp.name
        sft_dir = os.path.join(d, "sft")
        with contextlib.redirect_stderr(io.StringIO()):
            model.sft_model(data.Task(data.TaskConfig(), seed=0), CPU, sft_dir, 0, 5, quiet=True)
        frozen = lambda m: not any(p.requires_grad for p in m.parameters())
        _TINY_DPO.update(dir=d, sft_dir=sft_dir)
        for name, extra in (("plain", []), ("pre", ["--precompute-ref"])):
            counts = {"ref_in_loop": 0, "ref_whole_set": 0}
            pair_logps, pair_logps_all = dpo.pair_logps, data.pair_logps_all

            def counting_pair_logps(m, *args, **kwargs):
                counts["ref_in_loop"] += frozen(m)
                return pair_logps(m, *args, **kwargs)

            def counting_pair_logps_all(m, pairs, *args, **kwargs):
                counts["ref_whole_set"] += frozen(m) and pairs["chosen_ids"].shape[0] == data.TaskConfig.n_pairs
                return pair_logps_all(m, pairs, *args, **kwargs)

            out = os.path.join(d, name)
            argv = ["dpo.py", *TINY_RUN, "--steps", "4", "--seed", "0", "--sft-dir", sft_dir, "--out", out, *extra]
            stdout = io.StringIO()
            with mock.patch.object(sys, "argv", argv), mock.patch.object(dpo, "pair_logps", counting_pair_logps), \
                    mock.patch.object(data, "pair_logps_all", counting_pair_logps_all), \
                    contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
                dpo.main()
            _TINY_DPO[name] = {"out": out, "stdout": stdout.getvalue(), **counts}
    return _TINY_DPO


class TestPrecomputeRef(unittest.TestCase):
    def test_same_numbers_with_and_without(self):
        runs = tiny_dpo_runs()
        a = read_jsonl(os.path.join(runs["plain"]["out"], "log.jsonl"))
        b = read_jsonl(os.path.join(runs["pre"]["out"], "log.jsonl"))
        self.assertEqual(len(a), 4)
        self.assertEqual([sorted(r) for r in a], [sorted(r) for r in b])
        for ra, rb in zip(a, b):      # every step's loss, rewards and log-probs, up to float rounding
            for key in ra:
                self.assertAlmostEqual(ra[key], rb[key], delta=1e-5 * max(1.0, abs(ra[key])), msg=(ra["step"], key))
        self.assertNotEqual(a[-1]["rewards/margins"], 0.0)    # the reference mattered: the policy moved away from it
        ma = read_json(os.path.join(runs["plain"]["out"], "metrics.json"))
        mb = read_json(os.path.join(runs["pre"]["out"], "metrics.json"))
        self.assertEqual((ma["precompute_ref"], mb["precompute_ref"]), (False, True))
        self.assertIsNone(ma["ref_precompute_seconds"])
        self.assertGreaterEqual(mb["ref_precompute_seconds"], 0.0)
        skip = TIMING_KEYS | {"precompute_ref", "ref_precompute_seconds"}
        self.assertEqual(ma.keys(), mb.keys())
        for key in ma.keys() - skip:
            if isinstance(ma[key], float):
                self.assertAlmostEqual(ma[key], mb[key], delta=1e-4 * max(1.0, abs(ma[key])), msg=key)
            else:
                self.assertEqual(ma[key], mb[key], key)

    def test_no_reference_forward_pass_in_the_loop(self):
        runs = tiny_dpo_runs()
        self.assertEqual((runs["plain"]["ref_in_loop"], runs["plain"]["ref_whole_set"]), (4, 0))   # one per step
        self.assertEqual((runs["pre"]["ref_in_loop"], runs["pre"]["ref_whole_set"]), (0, 1))      # once, up front

    def test_refused_with_reference_free(self):
        with tempfile.TemporaryDirectory() as d:
            with self.assertRaises(SystemExit) as cm:
                run_main(dpo, TINY_RUN + ["--precompute-ref", "--reference-free", "--out", os.path.join(d, "o"),
                                          "--sft-dir", os.path.join(d, "sft")])
            self.assertEqual(cm.exception.code, 2)
            self.assertEqual(os.listdir(d), [])            # refused before any folder was made


class TestLogpsChart(unittest.TestCase):
    def test_two_curves_on_one_scale(self):
        lines = data.chart_lines([("w", "falls slowly", [0.0, -1.0, -2.0, -3.0]),
                                  ("l", "falls fast", [0.0, -3.0, -6.0, -9.0])], "t", width=60, height=10)
        grid = [line.split("│", 1)[1] for line in lines[1:11]]
        rows = {ch: [next(r for r, row in enumerate(grid) if row[c] in (ch, "*")) for c in range(4)] for ch in "wl"}
        self.assertEqual(grid[0][0], "*")                  # both start at 0, the top: they meet
        self.assertEqual(rows["l"], [0, 3, 6, 9])          # -9 at the bottom row, one row per nat
        self.assertEqual(rows["w"], [0, 1, 2, 3])          # the same scale for both curves
        self.assertIn("min -9, max 0", lines[0])
        self.assertIn("w = falls slowly, l = falls fast", lines[-1])
        self.assertEqual(data.chart_lines([("w", "none", [])], "empty"), ["empty: (no data)"])

    def test_dpo_summary_draws_logps_per_step(self):
        stdout = tiny_dpo_runs()["plain"]["stdout"]
        self.assertIn("logps/chosen and logps/rejected per step", stdout)
        self.assertIn("w = log pi(y_w|x), l = log pi(y_l|x)", stdout)


def readme_block(containing):
    """The README's ```python block that contains `containing`."""
    with open(os.path.join(REPO, "README.md")) as f:
        blocks = f.read().split("```python\n")[1:]
    found = [b.split("```", 1)[0] for b in blocks if containing in b]
    assert len(found) == 1, f"README: {len(found)} python blocks contain {containing!r}"
    return found[0]


def cli(argv):
    """data.main(argv) in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            data.main(argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


class TestRunCommands(unittest.TestCase):
    """python data.py sample / curves / logps / frontier, and the README's snippets that do the same."""

    def assert_one_line_error(self, code, err, *fragments):
        self.assertEqual(code, 2, err)
        self.assertNotIn("Traceback", err)
        lines = err.strip().splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertTrue(lines[0].startswith("error: "), err)
        for fragment in fragments:
            self.assertIn(fragment, lines[0])

    def test_sample_prints_scored_reviews_like_the_readme_snippet(self):
        run_dir = tiny_dpo_runs()["plain"]["out"]
        code, out, err = cli(["sample", run_dir, "--prompt", "new horror film", "-n", "5"])
        self.assertEqual(code, 0, err)
        lines = out.strip().splitlines()
        self.assertEqual(len(lines), 5)
        for line in lines:                                   # "[+0.25] review text": the judge's score of the text
            score, text = line[1:6], line[8:]
            self.assertEqual(line[6:8], "] ")
            self.assertEqual(score, f"{data.score('', text):+.2f}")
        self.assertEqual(cli(["sample", run_dir, "-n", "5"])[1], out)                  # seeded: the same again
        self.assertNotEqual(cli(["sample", run_dir, "-n", "5", "--seed", "1"])[1], out)
        snippet = readme_block("model.load_checkpoint(")
        self.assertIn('"out/simpo/model.pt"', snippet)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(snippet.replace('"out/simpo/model.pt"', repr(os.path.join(run_dir, "model.pt"))), {})
        self.assertEqual(printed.getvalue(), out)            # the README's five lines do what the command does
        self.assertLessEqual(len([l for l in snippet.splitlines() if l.strip() and not l.startswith(" ")]), 6)

    def test_sample_errors(self):
        run_dir = tiny_dpo_runs()["plain"]["out"]
        code, _, err = cli(["sample", run_dir, "--prompt", "new horrror film"])
        self.assert_one_line_error(code, err, "'horrror' is not a genre", "horror comedy")
        self.assert_one_line_error(*cli(["sample", run_dir, "--prompt", "new horror"])[::2], "three words")
        with tempfile.TemporaryDirectory() as d:
            self.assert_one_line_error(*cli(["sample", d])[::2], "no model.pt in")
            for name, content in (("corrupt", b"not a checkpoint"), ("truncated", None), ("foreign", "foreign")):
                path = os.path.join(d, "model.pt")
                if content is None:
                    with open(os.path.join(run_dir, "model.pt"), "rb") as f:
                        content = f.read()[:1000]
                if content == "foreign":
                    torch.save({"weights": torch.zeros(2)}, path)
                else:
                    with open(path, "wb") as f:
                        f.write(content)
                with self.subTest(checkpoint=name):
                    self.assert_one_line_error(*cli(["sample", d])[::2], path)

    def test_curves_redraws_any_key(self):
        run_dir = tiny_dpo_runs()["plain"]["out"]
        rows = read_jsonl(os.path.join(run_dir, "log.jsonl"))
        code, out, err = cli(["curves", run_dir, "--key", "logps/chosen", "--key", "loss"])
        self.assertEqual(code, 0, err)
        values = [r["logps/chosen"] for r in rows]
        self.assertEqual(out.splitlines()[0], f"logps/chosen per step ({run_dir})  "
                                              f"(min {min(values):.3g}, max {max(values):.3g}, 4 columns)")
        self.assertIn(f"loss per step ({run_dir})", out)
        self.assertIn(f"logps/chosen: first {values[0]:.4g}, last {values[-1]:.4g}, mean of the last 1 value {values[-1]:.4g}", out)
        code, _, err = cli(["curves", run_dir, "--key", "logp/chosen"])
        self.assert_one_line_error(code, err, "no key 'logp/chosen'", "logps/chosen, logps/rejected, loss")
        with tempfile.TemporaryDirectory() as d:
            self.assert_one_line_error(*cli(["curves", d])[::2], "no log.jsonl")
            open(os.path.join(d, "log.jsonl"), "w").close()
            self.assert_one_line_error(*cli(["curves", d])[::2], "holds no steps")
            with open(os.path.join(d, "log.jsonl"), "w") as f:
                f.write('{"loss": 1.0}\n{"loss": \n')
            self.assert_one_line_error(*cli(["curves", d])[::2], "unreadable")

    def test_readme_matplotlib_recipe_plots_the_log(self):
        """matplotlib is not a dependency: a stand-in records what the README's recipe asks it to draw."""
        run_dir = tiny_dpo_runs()["plain"]["out"]
        rows = read_jsonl(os.path.join(run_dir, "log.jsonl"))
        recipe = readme_block("matplotlib.pyplot")
        self.assertIn('"out/dpo/log.jsonl"', recipe)
        plt = mock.MagicMock()
        fake = mock.MagicMock(pyplot=plt)
        with mock.patch.dict(sys.modules, {"matplotlib": fake, "matplotlib.pyplot": plt}):
            exec(recipe.replace('"out/dpo/log.jsonl"', repr(os.path.join(run_dir, "log.jsonl"))), {})
        drawn = {c.kwargs.get("label"): c.args for c in plt.plot.call_args_list}
        self.assertEqual(set(drawn), {"logps/chosen", "logps/rejected"})
        for key, (steps, values) in drawn.items():
            self.assertEqual((list(steps), list(values)), ([r["step"] for r in rows], [r[key] for r in rows]))
        plt.savefig.assert_called_once()

    def test_logps_measures_where_the_mass_went(self):
        runs = tiny_dpo_runs()
        measured = []
        displacement = data.displacement

        def recording(*args, **kwargs):
            measured.append((args, kwargs, displacement(*args, **kwargs)))
            return measured[-1][2]

        with mock.patch.object(data, "displacement", recording):
            code, out, err = cli(["logps", runs["plain"]["out"]])
        self.assertEqual(code, 0, err)
        (args, kwargs, rows), = measured
        policy, sft, task = args
        self.assertTrue(state_equal(policy.state_dict(),
                                    torch.load(os.path.join(runs["plain"]["out"], "model.pt"), weights_only=True)["model"]))
        self.assertEqual(len(task.pairs["chosen_ids"]), data.TaskConfig.n_pairs)       # the run's own training pairs
        table = {line[:28].strip(): line[28:].split() for line in out.splitlines()[3:]}
        self.assertEqual([name for name, _, _ in rows], list(table))
        self.assertEqual(len(table), 5, out)
        for name, before, after in rows:
            self.assertEqual(table[name], [f"{before:.2f}", f"{after:.2f}", f"{after - before:+.2f}"])
        self.assertNotEqual(rows[0][2], rows[0][1])             # the policy moved
        # each row is a plain mean of summed log-probs: the first one checked by hand, on a small task
        small = small_task(seed=3)
        small_rows = data.displacement(policy, sft, small, n_samples=16, seed=0)
        self.assertEqual(small_rows[0][0], "chosen y_w, training pairs")
        self.assertAlmostEqual(small_rows[0][1], data.pair_logps_all(sft, small.pairs, CPU)[0].mean().item(), places=4)
        self.assertAlmostEqual(small_rows[1][2], data.pair_logps_all(policy, small.pairs, CPU)[1].mean().item(), places=4)
        for name, before, after in data.displacement(sft, sft, small, n_samples=16, seed=0):   # against itself: no change
            self.assertAlmostEqual(before, after, places=4, msg=name)

    def test_frontier_refuses_wrong_shapes_one_line_per_folder(self):
        good = {"method": "dpo", "beta": 0.1, "kl_to_sft": 1.0, "score": 0.5, "sft_score": 0.0}
        cases = {"a_list": "[]", "a_number": "3", "kl_null": json.dumps({**good, "kl_to_sft": None}),
                 "kl_nan": json.dumps({**good, "kl_to_sft": float("nan")}), "kl_text": json.dumps({**good, "kl_to_sft": "3"}),
                 "no_score": json.dumps({k: v for k, v in good.items() if k != "score"}), "not_json": "{",
                 "good": json.dumps(good)}
        expect = {"a_list": "holds a JSON list", "a_number": "holds a JSON int", "kl_null": "kl_to_sft is null",
                  "kl_nan": "kl_to_sft is NaN", "kl_text": 'kl_to_sft is "3"', "no_score": "no 'score'",
                  "not_json": "unreadable"}
        with tempfile.TemporaryDirectory() as d:
            for name, text in cases.items():
                os.makedirs(os.path.join(d, name))
                with open(os.path.join(d, name, "metrics.json"), "w") as f:
                    f.write(text)
            for name, fragment in expect.items():
                with self.subTest(case=name):
                    self.assert_one_line_error(*cli(["frontier", os.path.join(d, name)])[::2], name, fragment)
            code, out, err = cli(["frontier", *(os.path.join(d, n) for n in cases)])   # all at once
            self.assertEqual(code, 2)
            self.assertEqual(out, "")                                   # no chart from a partial set
            self.assertEqual(len(err.strip().splitlines()), len(expect))
            self.assertNotIn("Traceback", err)
            code, out, _ = cli(["frontier", os.path.join(d, "good")])
            self.assertEqual(code, 0)
            self.assertIn("A = good (dpo, beta 0.1): KL(policy || SFT) 1.00, score 0.500", out)


# ====================================================================================================
# --exact and --judge cyclic: a table policy, the cyclic judge, and what each objective converges to
# ====================================================================================================

def run_exact(module, *argv):
    """module.main() with --exact in this process, into a temporary folder: (metrics.json, files written).
    run_exact sets torch to one thread; the setting is put back for the tests that follow."""
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as d:
        try:
            run_main(module, ["--exact", "--out", d, *argv])
        finally:
            torch.set_num_threads(threads)
        return read_json(os.path.join(d, "metrics.json")), sorted(os.listdir(d))


def responses_of(*texts):
    """Token tensor [N, MAX_RESPONSE] of reviews given as text (EOS, then padding)."""
    out = torch.zeros(len(texts), data.MAX_RESPONSE, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = data.encode(text) + [data.EOS_ID]
        out[i, :len(ids)] = torch.tensor(ids)
    return out


class TestTablePolicy(unittest.TestCase):
    """model.TablePolicy: a distribution over listed responses that the GPT's code path reads unchanged."""

    def setUp(self):
        self.ex = data.ExactTask()
        g = torch.Generator().manual_seed(0)
        self.table = self.ex.table(torch.softmax(2 * torch.randn(self.ex.n, generator=g, dtype=torch.float64), 0))

    def test_sequence_logps_telescope_to_the_table(self):
        ex, table = self.ex, self.table
        ids, mask = ex.sequences()
        logps, lengths = model.sequence_logps(table, ids, mask)
        want = table.logits.detach() - torch.logsumexp(table.logits.detach(), 0)      # theta_y - logsumexp(theta)
        torch.testing.assert_close(logps.double(), want, atol=2e-5, rtol=0)
        torch.testing.assert_close(table.log_probs().detach(), want)
        self.assertEqual(lengths.tolist(), (ex.words + 1).float().tolist())           # |y|: words and EOS
        # extra padding columns change nothing
        wide_ids, wide_mask = F.pad(ids, (0, 6)), F.pad(mask, (0, 6))
        torch.testing.assert_close(model.sequence_logps(table, wide_ids, wide_mask)[0], logps)
        # d/dtheta of sum_y log pi(y) = 1 - C pi: the gradient flows through forward like through log_softmax
        logps.sum().backward()
        torch.testing.assert_close(table.logits.grad, 1 - ex.n * table.probs(), atol=1e-4, rtol=0)

    def test_pair_logps_are_two_entries_of_the_table(self):
        chosen, rejected, _ = self.ex.population_pairs()
        pc, pr, lc, lr = model.pair_logps(self.table, **self.ex.pair_batch(chosen, rejected))
        logps = self.table.log_probs().detach()
        torch.testing.assert_close(pc.double(), logps[chosen], atol=2e-5, rtol=0)
        torch.testing.assert_close(pr.double(), logps[rejected], atol=2e-5, rtol=0)
        self.assertEqual(lc.tolist(), (self.ex.words[chosen] + 1).float().tolist())

    def test_a_response_off_the_list_has_no_mass(self):
        off = responses_of("great plot lovely cast", "great plot lovely", "great plot")   # the last one is listed
        ids, mask = data.join(self.ex.prompts.expand(3, -1), off)
        logps, _ = model.sequence_logps(self.table, ids, mask)
        self.assertLess(logps[0].item(), -1e29)
        self.assertLess(logps[1].item(), -1e29)
        listed = self.table.log_probs()[self.ex.texts.index("great plot")]
        self.assertAlmostEqual(logps[2].item(), listed.item(), places=4)

    def test_model_sample_draws_from_the_table(self):
        n = 6000
        prompts = self.ex.prompts.expand(n, -1)
        draw = lambda cache: model.sample(self.table, prompts, data.MAX_RESPONSE, data.EOS_ID, data.BANNED_IN_RESPONSE,
                                          generator=model.make_generator(CPU, 3), use_cache=cache)
        cached = draw(True)
        self.assertTrue(torch.equal(cached, draw(False)))        # the cache dict holds the prefix: same draws
        index = self.ex.index_of(cached)
        self.assertTrue((index >= 0).all())                        # every sample is a listed review
        freq = torch.bincount(index, minlength=self.ex.n).double() / n
        p = self.table.probs()
        self.assertTrue(((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-3).all(), (freq - p).abs().max())

    def test_minimise_finds_a_known_minimum(self):
        x = nn.Parameter(torch.zeros(3, dtype=torch.float64))
        target = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
        scale = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)     # an ill-conditioned quadratic
        loss = model.minimise([x], lambda: ((x - target) ** 2 * scale).sum())
        self.assertLess(loss, 1e-15)
        torch.testing.assert_close(x.detach(), target)


class TestCyclicJudge(unittest.TestCase):
    """data.py's cyclic judge and exploitability [Nash]."""

    def test_school_is_the_nouns_a_review_uses_most(self):
        cases = [("great plot", 0), ("the acting and cast was dull", 1), ("music scenes and the plot", 2),
                 ("plot acting", data.NO_SCHOOL), ("great fun", data.NO_SCHOOL), ("the story and the ending", 0),
                 ("characters characters plot", 1)]
        schools = data.school_of(responses_of(*[c[0] for c in cases]))
        self.assertEqual(schools.tolist(), [c[1] for c in cases])
        for name, words in zip(data.SCHOOLS, data.SCHOOL_WORDS):   # school words are neutral: no score changes
            self.assertTrue(all(w in data.NEUTRAL for w in words.split()), name)

    def test_the_oracle_goes_round_in_a_circle(self):
        p = 0.9
        s = torch.tensor([0, 1, 2, data.NO_SCHOOL])
        prefs = data.cyclic_preference_prob(s[:, None], s[None, :], p)           # [4, 4]
        torch.testing.assert_close(prefs + prefs.T, torch.ones(4, 4, dtype=torch.float64))   # constant-sum
        torch.testing.assert_close(prefs.diagonal(), torch.full((4,), 0.5, dtype=torch.float64))
        for i in range(3):
            self.assertAlmostEqual(prefs[i, (i + 1) % 3].item(), p)              # story > acting > craft > story
            self.assertAlmostEqual(prefs[i, 3].item(), p)                        # any school beats none
        # no reward can represent it: Bradley-Terry log-odds around any cycle add up to 0, these to 3 logit(p)
        log_odds = lambda m, a, b: math.log(m[a, b] / m[b, a])
        cycle = sum(log_odds(prefs, a, b) for a, b in ((0, 1), (1, 2), (2, 0)))
        self.assertAlmostEqual(cycle, 3 * math.log(p / (1 - p)), places=9)
        scores = torch.tensor([0.3, -0.1, 0.7])
        bt = data.preference_prob(scores[:, None], scores[None, :], 0.2)
        self.assertAlmostEqual(sum(log_odds(bt, a, b) for a, b in ((0, 1), (1, 2), (2, 0))), 0.0, places=4)

    def test_judge_prob_on_tokens(self):
        a, b = responses_of("great plot and lovely story", "dull music"), responses_of("the acting", "the story was fun")
        cfg = data.TaskConfig(tau=0.5, length_bias=0.1)
        # scores 2/5 and -1/2 against 0 and 1/4; lengths 5, 2 against 2, 4
        want = [sig((0.4 - 0.0) / 0.5 + 0.1 * 3), sig((-0.5 - 0.25) / 0.5 + 0.1 * -2)]
        torch.testing.assert_close(data.judge_prob(a, b, cfg), torch.tensor(want, dtype=torch.float64))
        cyc = data.judge_prob(a, b, data.TaskConfig(judge="cyclic"))             # story vs acting, craft vs story
        torch.testing.assert_close(cyc, torch.tensor([0.9, 0.9], dtype=torch.float64))

    def test_exploitability_is_zero_exactly_at_the_equilibrium(self):
        p = 0.9
        s = torch.arange(3)
        prefs = data.cyclic_preference_prob(s[:, None], s[None, :], p)
        self.assertAlmostEqual(data.exploitability(torch.full((3,), 1 / 3, dtype=torch.float64), prefs), 0.0, places=12)
        # the SFT table's shares, by hand: craft beats it with 0.1/2 + 0.6 p + 0.3 (1 - p) = 0.62
        self.assertAlmostEqual(data.exploitability([0.6, 0.3, 0.1], prefs), 0.62 - 0.5, places=12)
        self.assertAlmostEqual(data.exploitability([1.0, 0.0, 0.0], prefs), p - 0.5, places=12)
        g = torch.Generator().manual_seed(0)
        for _ in range(50):      # a constant-sum game: never below 0; above 0 away from the equilibrium
            pi = torch.softmax(torch.randn(3, generator=g), 0)
            self.assertGreater(data.exploitability(pi, prefs), 1e-4)
        # on the listed reviews: any table with school shares 1/3 is an equilibrium, whatever it does inside
        ex = data.ExactTask(data.TaskConfig(judge="cyclic"))
        inside = torch.rand(ex.n, generator=g, dtype=torch.float64)
        for i in range(3):
            inside[ex.schools == i] /= 3 * inside[ex.schools == i].sum()
        self.assertAlmostEqual(ex.exploitability(inside), 0.0, places=12)
        self.assertAlmostEqual(ex.exploitability(ex.sft_probs), 0.12, places=12)
        # under Bradley-Terry the best review is the equilibrium: a point mass on it cannot be exploited
        bt = data.ExactTask()
        self.assertAlmostEqual(bt.exploitability(torch.eye(bt.n, dtype=torch.float64)[0]), 0.0, places=12)
        self.assertGreater(bt.exploitability(bt.sft_probs), 0.1)


class TestExactTask(unittest.TestCase):
    def setUp(self):
        self.ex = data.ExactTask()

    def test_the_listed_reviews(self):
        ex = self.ex
        self.assertEqual(ex.n, 27)
        self.assertEqual(len(set(ex.texts)), 27)
        cells = {(s, sc, w) for s, sc, w in zip(ex.schools.tolist(), ex.scores.tolist(), ex.words.tolist())}
        self.assertEqual(cells, {(s, sc, w) for s in range(3) for sc in (0.5, 0.0, -0.5) for w in (2, 4, 6)})
        torch.testing.assert_close(ex.index_of(ex.responses), torch.arange(27))
        self.assertAlmostEqual(ex.sft_probs.sum().item(), 1.0, places=12)
        torch.testing.assert_close(ex.school_shares(ex.sft_probs), torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64))
        torch.testing.assert_close(ex.prefs + ex.prefs.T, torch.ones(27, 27, dtype=torch.float64))
        self.assertAlmostEqual(ex.mean_words(ex.sft_probs), 2 * 0.5 + 4 * 0.3 + 6 * 0.2, places=12)

    def test_population_and_sampled_pairs(self):
        ex = self.ex
        chosen, rejected, weights = ex.population_pairs()
        self.assertAlmostEqual(weights.sum().item(), 1.0, places=12)
        self.assertFalse((chosen == rejected).any())
        # one entry by hand: "great plot" chosen over "the plot": 2 pi pi P / (1 - sum pi^2)
        w, l = ex.texts.index("great plot"), ex.texts.index("the plot")
        want = 2 * 0.075 * 0.15 * sig(0.5 / 0.2) / (1 - (ex.sft_probs ** 2).sum().item())
        got = weights[(chosen == w) & (rejected == l)].item()
        self.assertAlmostEqual(got, want, places=12)
        # many sampled pairs approach the population weights (identical pairs aside)
        c, r, sw = ex.sampled_pairs(200_000, seed=1)
        self.assertAlmostEqual(sw.sum().item(), 1.0, places=12)
        sampled = torch.zeros(27, 27, dtype=torch.float64).index_put_((c, r), sw)
        population = torch.zeros(27, 27, dtype=torch.float64).index_put_((chosen, rejected), weights)
        same = (ex.sft_probs ** 2).sum()
        self.assertLess((sampled.fill_diagonal_(0) / (1 - same) - population).abs().max().item(), 3e-3)

    def test_dpo_optimum_closed_form(self):
        ex = self.ex
        for beta in (0.5, 2.0):
            pi_star = ex.dpo_optimum(beta)
            self.assertAlmostEqual(pi_star.sum().item(), 1.0, places=12)
            a, b = ex.texts.index("great plot"), ex.texts.index("the acting and cast")
            # pi*(a)/pi*(b) = pi_ref(a)/pi_ref(b) exp((s_a - s_b)/(tau beta))
            want = 0.075 / 0.045 * math.exp(0.5 / (0.2 * beta))
            self.assertAlmostEqual((pi_star[a] / pi_star[b]).item(), want, places=9)
        with self.assertRaises(ValueError):
            data.ExactTask(data.TaskConfig(judge="cyclic")).dpo_optimum(1.0)

    def test_simpo_gamma0_closed_form(self):
        ex = self.ex
        beta = 2.0
        pi = ex.simpo_optimum_gamma0(beta)
        self.assertAlmostEqual(pi.sum().item(), 1.0, places=12)
        # the SimPO reward (beta/|y|) log pi(y) is the true reward plus one constant
        shift = beta * pi.log() / (ex.words.double() + 1) - ex.reward
        self.assertLess((shift - shift[0]).abs().max().item(), 1e-9)


class TestExactDPO(unittest.TestCase):
    """python dpo.py --exact: [DPO-opt] and [IPO-4.2] on the table, and DPO on cyclic labels."""

    @classmethod
    def setUpClass(cls):
        cls.bt, cls.bt_files = run_exact(dpo)
        cls.cyclic, _ = run_exact(dpo, "--judge", "cyclic")

    def test_population_minimum_is_pi_star(self):
        m = self.bt
        self.assertEqual(self.bt_files, ["metrics.json"])                # a table: no model.pt
        self.assertEqual((m["method"], m["exact"], m["judge"], m["beta"]), ("dpo", True, "bt", 1.0))
        self.assertLess(m["kl_to_optimum"], 1e-6)                        # goal: 1e-3
        # pi* by hand: pi_ref exp(s / (tau beta)) / Z
        ex = data.ExactTask()
        pi_star = ex.sft_probs * torch.exp(ex.scores / (0.2 * 1.0))
        pi_star = pi_star / pi_star.sum()
        self.assertLess(data.kl(torch.tensor(m["policy_probs"]), pi_star), 1e-6)
        self.assertAlmostEqual(m["best_mass"], m["best_mass_optimum"], places=6)
        # finite data: farther than the population's minimum, not far
        self.assertGreater(m["kl_to_optimum_finite_data"], 100 * m["kl_to_optimum"])
        self.assertLess(m["kl_to_optimum_finite_data"], 0.1)

    def test_beta_matters_only_with_noisy_labels(self):
        m = self.bt
        self.assertEqual(m["ipo_betas"], list(dpo.IPO_BETAS))
        for beta, trained, optimum in zip(m["ipo_betas"], m["best_mass_noisy"], m["best_mass_noisy_optimum"]):
            ref = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)     # the SFT table's mass by score level
            weight = ref * torch.exp(torch.tensor([0.5, 0.0, -0.5], dtype=torch.float64) / (0.2 * beta))
            self.assertAlmostEqual(optimum, (weight[0] / weight.sum()).item(), places=9)
            self.assertAlmostEqual(trained, optimum, places=5)
        noisy = m["best_mass_noisy"]
        self.assertTrue(all(a > b for a, b in zip(noisy, noisy[1:])))    # larger beta: closer to pi_ref
        self.assertLess(noisy[-1], 0.5)
        self.assertTrue(all(d > 0.999 for d in m["best_mass_deterministic"]), m["best_mass_deterministic"])

    def test_cyclic_labels_are_fit_with_a_line(self):
        m = self.cyclic
        self.assertNotIn("kl_to_optimum", m)                             # no reward, no pi*
        ex = data.ExactTask(data.TaskConfig(judge="cyclic"))
        pi = torch.tensor(m["policy_probs"], dtype=torch.float64)
        self.assertAlmostEqual(m["exploitability"], ex.exploitability(pi), places=12)
        # DPO's implicit reward beta log pi/pi_ref: one number per school (the judge ties within one), three
        # different numbers, so the schools stand in a line, which the cycle exploits
        reward = m["beta"] * (pi / ex.sft_probs).log()
        per_school = []
        for i in range(3):
            r = reward[ex.schools == i]
            self.assertLess((r - r[0]).abs().max().item(), 1e-6)
            per_school.append(r[0].item())
        self.assertGreater(min(abs(a - b) for a, b in itertools.combinations(per_school, 2)), 0.1)
        self.assertGreater(m["exploitability"], m["exploitability_sft"])
        self.assertGreater(m["exploitability"], 0.2)

    def test_pairs_that_meet_every_school_equally_teach_nothing(self):
        # every school meets every other equally often and each wins its comparisons 0.9 of the time: by
        # symmetry the Bradley-Terry fit gives the three schools one reward, and DPO stays at pi_ref's shares
        ex = data.ExactTask(data.TaskConfig(judge="cyclic", pair_schools="uniform"))
        torch.testing.assert_close(ex.school_shares(ex.pair_probs), torch.full((3,), 1 / 3, dtype=torch.float64))
        pi = dpo.fit_exact(ex, ex.population_pairs(), 1.0, 300)
        torch.testing.assert_close(ex.school_shares(pi), ex.school_shares(ex.sft_probs), atol=1e-6, rtol=0)


class TestExactSimPO(unittest.TestCase):
    """python simpo.py --exact: one end whatever the start, and what 1/|y| does to it."""

    @classmethod
    def setUpClass(cls):
        cls.m, cls.files = run_exact(simpo)

    def test_one_end_whatever_the_start(self):
        m = self.m
        self.assertEqual(self.files, ["metrics.json"])
        self.assertEqual((m["method"], m["beta"], m["gamma"], m["length_norm"]), ("simpo", 2.0, 1.0, True))
        self.assertLess(m["start_gap"], 1e-8)
        self.assertLess(m["kl_to_closed_form_gamma0"], 1e-8)

    def test_length_normalisation_favours_short_reviews(self):
        m = self.m
        ex = data.ExactTask()
        pi = torch.tensor(m["policy_probs"], dtype=torch.float64)
        # reviews that differ only in length: mass falls with length (equal reward per token)
        for school in range(3):
            best = pi[(ex.schools == school) & ex.best()]                # 2, 4 and 6 words, in order
            self.assertTrue(best[0] > best[1] > best[2], best)
        # without 1/|y| the loss cannot tell the lengths apart: equal mass, mean length 4 words exactly
        self.assertAlmostEqual(m["mean_words_length_norm_off"], 4.0, places=6)
        self.assertLess(m["mean_words"], m["mean_words_sft"])

    def test_no_reference_no_memory_of_the_sft_table(self):
        m = self.m
        ex = data.ExactTask()
        # the judge ignores schools and SimPO has no pi_ref: the SFT table's 0.6 / 0.3 / 0.1 is forgotten
        for share in m["school_shares"]:
            self.assertAlmostEqual(share, 1 / 3, places=6)
        # so the end is at least as far from DPO's pi* (which keeps pi_ref's shares) as the school shares are
        marginal = data.kl(torch.tensor(m["school_shares"]), ex.school_shares(ex.dpo_optimum(simpo.DPO_EXACT_BETA)))
        self.assertGreater(marginal, 0.2)
        self.assertGreaterEqual(m["kl_to_dpo_optimum"], marginal - 1e-9)


class TestExactSPPO(unittest.TestCase):
    """python sppo.py --exact: [MW-exact], the eta/2 and K-sample fits, and [SPPO-Thm4.1] on the cyclic judge."""

    @classmethod
    def setUpClass(cls):
        cls.bt, cls.files = run_exact(sppo, "--iterations", "6")
        cls.cyclic, _ = run_exact(sppo, "--judge", "cyclic", "--steps", "25")   # default eta, T, K; fits cut at 25

    def mw_chain(self, ex, eta, iterations):
        """Multiplicative weights [SPPO-2] by hand, from the SFT table: pi_1, ..., pi_{T+1}."""
        chain = [ex.sft_probs]
        for _ in range(iterations):
            pi = chain[-1]
            step = pi * torch.exp(eta * (ex.prefs @ pi))
            chain.append(step / step.sum())
        return chain

    def test_exact_log_z_fit_is_the_mw_step(self):
        for m, judge in ((self.bt, "bt"), (self.cyclic, "cyclic")):
            with self.subTest(judge=judge):
                self.assertLess(m["mw_kl_exact_logz"], 1e-6)            # goal: 1e-4
                chain = self.mw_chain(data.ExactTask(data.TaskConfig(judge=judge)), m["eta"], m["iterations"])
                self.assertLess(data.kl(torch.tensor(m["policy_probs"]), chain[-1]), 1e-6)
                self.assertLess(data.kl(torch.tensor(m["average_probs"]), torch.stack(chain).mean(0)), 1e-6)
        self.assertEqual(self.files, ["metrics.json"])
        self.assertEqual((self.cyclic["eta"], self.cyclic["iterations"], self.cyclic["k"]), (1.0, 40, 4))

    def test_half_and_sampled_fits_are_other_updates(self):
        for m in (self.bt, self.cyclic):
            self.assertEqual(len(m["mw_kl_half"]), m["iterations"])
            self.assertEqual(len(m["mw_kl_k"]), m["iterations"])
            self.assertTrue(all(k > 1e-9 for k in m["mw_kl_half"][:5]))  # log Z != eta/2 away from equilibrium
            self.assertTrue(all(k > 1e-6 for k in m["mw_kl_k"][:5]))

    def test_bradley_terry_iterates_move_to_the_best(self):
        best = self.bt["best_mass"]
        self.assertTrue(all(b > a for a, b in zip([self.bt["best_mass_sft"]] + best, best)), best)
        last = self.bt["exploitability_last"]
        self.assertTrue(all(b < a for a, b in zip(last, last[1:])), last)

    def test_cyclic_last_iterate_circles_and_the_average_converges(self):
        m = self.cyclic
        last, average = m["exploitability_last"], m["exploitability_average"]
        self.assertEqual(len(last), 40)
        self.assertLessEqual(average[-1], 0.05)                          # goal: 0.05
        self.assertGreater(min(last[20:]), 0.1)                          # the last iterate never settles
        self.assertGreater(last[-1], m["exploitability_sft"])            # it spirals outward
        leaders = [max(range(3), key=lambda i: s[i]) for s in m["school_shares"]]
        changes = sum(a != b for a, b in zip(leaders, leaders[1:]))
        self.assertGreaterEqual(changes, 3)                              # the leading school goes round
        self.assertGreater(min(last[20:]) - average[-1], 0.05)


# ====================================================================================================
# --judge cyclic on the GPT task: schooled demonstrations and pairs, the game's evaluation, the average
# ====================================================================================================

class TestCyclicTask(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.task = data.Task(data.TaskConfig(judge="cyclic", n_demos=3000, n_pairs=3000, n_heldout=64), seed=0)

    def test_every_demonstration_has_a_school_in_unequal_shares(self):
        responses = self.task.sft_ids[:, data.PROMPT_LEN:]
        schools = data.school_of(responses)
        self.assertTrue((schools >= 0).all())
        shares = data.school_shares(responses)
        for got, want in zip(shares.tolist(), (0.6, 0.3, 0.1, 0.0)):
            self.assertAlmostEqual(got, want, delta=0.03)
        # the same reviews as the Bradley-Terry task draws, but for the nouns: lengths unchanged
        rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
        plain = data._random_responses(rng_a, 200, 0.5, 0.0)
        schooled = data._with_schools(rng_b, data._random_responses(rng_b, 200, 0.5, 0.0), (1, 1, 1))
        self.assertTrue(torch.equal(data.response_lengths(plain), data.response_lengths(schooled)))
        changed = (plain != schooled).sum(1)
        nouns = torch.as_tensor(np.isin(plain.numpy(), [data.STOI[w] for s in data.SCHOOL_WORDS for w in s.split()]))
        self.assertTrue((changed <= nouns.sum(1) + 1).all())       # only nouns and one more word change

    def test_pairs_are_labelled_by_the_cyclic_oracle(self):
        pairs = self.task.pairs
        chosen, rejected = (data.school_of(pairs[f"{side}_ids"][:, data.PROMPT_LEN:]) for side in ("chosen", "rejected"))
        story_acting = ((chosen == 0) & (rejected == 1)).sum().item()
        acting_story = ((chosen == 1) & (rejected == 0)).sum().item()
        n = story_acting + acting_story
        self.assertGreater(n, 500)
        self.assertAlmostEqual(story_acting / n, 0.9, delta=4 * math.sqrt(0.09 / n))   # story beats acting 0.9
        craft_story = ((chosen == 2) & (rejected == 0)).sum().item()
        story_craft = ((chosen == 0) & (rejected == 2)).sum().item()
        self.assertGreater(craft_story, story_craft)                 # craft beats story

    def test_school_exploitability_from_shares(self):
        self.assertAlmostEqual(data.school_exploitability(torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0], dtype=torch.float64)),
                               0.0, places=12)
        # craft against (0.6, 0.3, 0.1, none 0): 0.9 * 0.6 + 0.1 * 0.3 + 0.5 * 0.1 = 0.62
        self.assertAlmostEqual(data.school_exploitability(torch.tensor([0.6, 0.3, 0.1, 0.0])), 0.12, places=6)
        # a review with no school loses to all: writing some makes any school's reply stronger
        self.assertGreater(data.school_exploitability(torch.tensor([0.3, 0.3, 0.3, 0.1])), 0.0)
        shares = data.school_shares(responses_of("great plot", "the cast", "music", "fun", "plot acting"))
        torch.testing.assert_close(shares, torch.tensor([0.2, 0.2, 0.2, 0.4], dtype=torch.float64))

    def test_evaluation_reports_the_game(self):
        torch.manual_seed(0)
        a, b = sharp_model(1), sharp_model(2)
        r = data.head_to_head(a, b, self.task, CPU, 32, seed=3)
        want = data.cyclic_preference_prob(data.school_of(r["samples"]), data.school_of(r["baseline_samples"])).mean()
        self.assertAlmostEqual(r["win_rate"], want.item(), places=6)
        self.assertEqual(r["school_shares"], data.school_shares(r["samples"]).tolist())
        self.assertAlmostEqual(r["exploitability"], data.school_exploitability(torch.tensor(r["school_shares"])), places=9)
        bt = data.head_to_head(a, b, small_task(), CPU, 8, seed=3)
        self.assertNotIn("exploitability", bt)                       # the default judge's output is unchanged

    def test_win_rates_from_a_preference_matrix(self):
        schools = torch.tensor([[0, 1, 2, 0]])
        prefs = data.cyclic_preference_prob(schools[:, :, None], schools[:, None, :]).float()
        p = sppo.estimate_win_rates(torch.zeros(1, 4), 0.2, prefs)
        want = [(0.5 + 0.9 + 0.1 + 0.5) / 4, (0.1 + 0.5 + 0.9 + 0.1) / 4, (0.9 + 0.1 + 0.5 + 0.9) / 4, (0.5 + 0.9 + 0.1 + 0.5) / 4]
        torch.testing.assert_close(p, torch.tensor([want]))
        self.assertAlmostEqual(p.mean().item(), 0.5, places=6)


class TestAverageOfIterates(unittest.TestCase):
    def test_the_mixture_samples_each_iterate_equally_often(self):
        # model i always writes review i, so each sample says which iterate drew it
        reviews = ["great plot", "the cast", "dull music"]
        models = []
        for text in reviews:
            ids = data.encode(text) + [data.EOS_ID]
            table = model.TablePolicy(torch.tensor([ids]), data.PROMPT_LEN, len(data.VOCAB))   # one review: certain
            models.append(table)
        n = 3000
        prompts = data.Task(data.TaskConfig(n_demos=8, n_pairs=4, n_heldout=4)).eval_prompts(n)
        samples, pick = data.sample_mixture(models, prompts, model.make_generator(CPU, 0))
        for i, text in enumerate(reviews):
            rows = pick == i
            self.assertAlmostEqual(rows.double().mean().item(), 1 / 3, delta=4 * math.sqrt(2 / 9 / n))
            self.assertTrue(all(data.decode(s) == text for s in samples[rows]))

    def test_shares_chart_puts_letters_at_their_shares(self):
        lines = data.shares_chart([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], "t", height=3)
        grid = [line.split("│", 1)[1] for line in lines[1:4]]
        self.assertEqual(grid[0][0], "s")                            # share 1 at the top
        self.assertEqual(grid[2][0], "*")                            # acting and craft meet at 0
        self.assertEqual(grid[1][2], "*")                            # story and acting meet at 0.5
        self.assertEqual(grid[2][2], "c")


class TestCyclicScripts(unittest.TestCase):
    """Tiny runs under --judge cyclic: every method reports the game; SPPO per iteration, last and average."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        d = cls.tmp.name
        tiny = ["--judge", "cyclic", "--sft-dir", os.path.join(d, "sft"), "--device", "cpu", "--sft-steps", "5",
                "--eval-samples", "16", "--batch-size", "8"]
        run_main(dpo, tiny + ["--steps", "2", "--out", os.path.join(d, "dpo")])
        run_main(sppo, tiny + ["--steps", "2", "--k", "2", "--iterations", "2", "--out", os.path.join(d, "sppo")])
        cls.dpo = read_json(os.path.join(d, "dpo", "metrics.json"))
        cls.sppo = read_json(os.path.join(d, "sppo", "metrics.json"))

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_metrics_carry_the_game(self):
        for m in (self.dpo, self.sppo):
            self.assertEqual(len(m["school_shares"]), 4)
            self.assertAlmostEqual(sum(m["school_shares"]), 1.0, places=9)
            self.assertAlmostEqual(m["exploitability"], data.school_exploitability(torch.tensor(m["school_shares"])),
                                   places=9)
            self.assertIn("sft_exploitability", m)
        m = self.sppo
        self.assertEqual(len(m["exploitability_last"]), 2)
        self.assertEqual(len(m["exploitability_average"]), 2)
        self.assertEqual(m["exploitability_last"][-1], m["exploitability"])
        self.assertEqual(len(m["school_shares_average_per_iteration"]), 2)
        self.assertNotIn("exploitability_last", read_json(os.path.join(self.tmp.name, "dpo", "metrics.json")))


if __name__ == "__main__":
    unittest.main()
