"""
test_all.py: the tests of model.py, data.py, dpo.py, simpo.py and sppo.py (standard-library unittest only).

    python -m unittest test_all -v        (or: python -m pytest test_all.py)

Every test checks a value worked out independently of the code under test (by hand, in closed form, with
a plain Python loop) or an invariance the code promises (padding, batch order, seeds, caches). Sizes are
tiny so that the whole file runs in well under two minutes on a 2-core CPU.
"""

import argparse
import contextlib
import os

# The tests start several scripts at once; on 2 cores, OpenMP threads that spin while they wait would slow
# every process many times over, so they sleep instead (inherited by the subprocesses). Before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import glob
import io
import json
import math
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

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

class TestReadmeCitations(unittest.TestCase):
    def test_cited_line_ranges_match_the_code(self):
        import inspect
        with open(os.path.join(REPO, "README.md")) as f:
            readme = f.read()
        for module, name in [(dpo, "dpo_loss"), (simpo, "simpo_loss"), (sppo, "sppo_loss"),
                             (sppo, "sppo_hard_loss"), (sppo, "estimate_win_rates"),
                             (sppo, "self_play_iteration"), (model, "sequence_logps"), (data, "ranking_metrics")]:
            lines, start = inspect.getsourcelines(getattr(module, name))
            cite = f"`{module.__name__}.py` lines {start}-{start + len(lines) - 1}"
            self.assertIn(cite, readme, f"README should cite {name} as {cite}")

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
                # TRL's sppo_hard with beta = 1/eta: (a_w - 1/(2 beta))^2 + (a_l + 1/(2 beta))^2, the same sum
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
                err = run_main(dpo, TINY_RUN + ["--precompute-ref", "--reference-free", "--out", os.path.join(d, "o"),
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


if __name__ == "__main__":
    unittest.main()
