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
import itertools
import json
import math
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

    def test_against_python_loop(self):
        self.assertTrue(len(set(self.mask.sum(1).tolist())) > 1, "want rows of different lengths")
        with torch.no_grad():
            logps, lengths = model.sequence_logps(self.m, self.ids, self.mask)
        self.assertEqual(logps.dtype, torch.float32)
        torch.testing.assert_close(logps.double(), self.loop_logps(self.ids, self.mask), rtol=0, atol=1e-3)
        self.assertEqual(lengths.tolist(), self.mask.sum(1).float().tolist())

    def test_extra_right_padding_changes_nothing(self):
        ids = F.pad(self.ids, (0, 6))     # PAD is id 0
        mask = F.pad(self.mask, (0, 6))
        with torch.no_grad():
            a, la = model.sequence_logps(self.m, self.ids, self.mask)
            b, lb = model.sequence_logps(self.m, ids, mask)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
        self.assertTrue(torch.equal(la, lb))

    def test_batch_order_changes_nothing(self):
        perm = torch.tensor([3, 0, 4, 2, 1])
        with torch.no_grad():
            a, la = model.sequence_logps(self.m, self.ids, self.mask)
            b, lb = model.sequence_logps(self.m, self.ids[perm], self.mask[perm])
        torch.testing.assert_close(a[perm], b, rtol=0, atol=1e-4)
        self.assertTrue(torch.equal(la[perm], lb))

    def test_response_lengths_count_eos_not_prompt_or_pad(self):
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


# ====================================================================================================
# dpo.py and simpo.py: the objectives
# ====================================================================================================

def t(*values, grad=False):
    return torch.tensor(values, dtype=torch.float32, requires_grad=grad)


def softplus(z):
    """log(1 + exp(z)), written out: -log sigmoid(x) = softplus(-x)."""
    return math.log(1 + math.exp(z))


class TestDPOLoss(unittest.TestCase):
    def test_hand_computed_batch(self):
        pc, pr = t(-5.0, -3.0, -10.0), t(-6.0, -2.0, -4.0)
        rc, rr = t(-5.5, -3.5, -8.0), t(-5.0, -2.5, -7.0)
        beta = 0.5
        losses, cr, rj = dpo.dpo_loss(pc, pr, rc, rr, beta)
        # log-ratios: chosen 0.5, 0.5, -2.0; rejected -1.0, 0.5, 3.0
        # logits = beta * (chosen - rejected) = 0.75, 0.0, -2.5; loss = -log sigmoid(z) = log(1 + exp(-z))
        expect = [softplus(-0.75), math.log(2), softplus(2.5)]
        for got, want in zip(losses.tolist(), expect):
            self.assertAlmostEqual(got, want, places=5)
        torch.testing.assert_close(cr, t(0.25, 0.25, -1.0))
        torch.testing.assert_close(rj, t(-0.5, 0.25, 1.5))

    def test_at_initialisation(self):
        g = torch.Generator().manual_seed(0)
        pc, pr = -torch.rand(8, generator=g) * 30, -torch.rand(8, generator=g) * 30
        pc.requires_grad_(True)
        losses, cr, rj = dpo.dpo_loss(pc, pr, pc.detach().clone(), pr.clone(), beta=0.1)
        torch.testing.assert_close(losses, torch.full((8,), math.log(2)))
        self.assertTrue(torch.equal(cr, torch.zeros(8)) and torch.equal(rj, torch.zeros(8)))
        self.assertTrue(torch.equal(cr - rj, torch.zeros(8)))
        losses.sum().backward()
        torch.testing.assert_close(pc.grad, torch.full((8,), -0.1 * 0.5))   # -beta * sigmoid(0)

    def test_gradient_closed_form(self):
        pc, pr = t(-5.0, -3.0, -10.0, -1.0, grad=True), t(-6.0, -2.0, -4.0, -9.0, grad=True)
        rc, rr = t(-5.5, -3.5, -8.0, -2.0), t(-5.0, -2.5, -7.0, -3.0)
        beta = 0.7
        losses, cr, rj = dpo.dpo_loss(pc, pr, rc, rr, beta)
        self.assertFalse(cr.requires_grad or rj.requires_grad)            # rewards are detached
        losses.sum().backward()
        logit = beta * ((pc - rc) - (pr - rr)).detach()
        torch.testing.assert_close(pc.grad, -beta * torch.sigmoid(-logit))
        torch.testing.assert_close(pr.grad, beta * torch.sigmoid(-logit))

    def test_finite_at_extreme_margins(self):
        pc, pr = t(0.0, -1000.0, -1000.0, 0.0, grad=True), t(-1000.0, 0.0, -1000.0, 0.0, grad=True)
        zero = torch.zeros(4)
        losses, cr, rj = dpo.dpo_loss(pc, pr, zero, zero, beta=1.0)
        self.assertTrue(torch.isfinite(losses).all(), losses)
        losses.sum().backward()
        self.assertTrue(torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all())
        # logits +1000, -1000, 0, 0: losses ~0, 1000, log 2, log 2; d/dpc = -sigmoid(-logit) = 0, -1, -1/2, -1/2
        torch.testing.assert_close(losses, t(0.0, 1000.0, math.log(2), math.log(2)))
        torch.testing.assert_close(pc.grad, t(0.0, -1.0, -0.5, -0.5))


class TestSimPOLoss(unittest.TestCase):
    def test_hand_computed_batch(self):
        pc, pr = t(-6.0, -4.0, -3.0), t(-9.0, -2.0, -12.0)
        lc, lr = t(3.0, 2.0, 6.0), t(3.0, 1.0, 4.0)
        beta, gamma = 2.0, 0.5
        losses, cr, rj = simpo.simpo_loss(pc, pr, lc, lr, beta, gamma)
        # rewards beta/|y| * logp: chosen 2*-6/3 = -4, 2*-4/2 = -4, 2*-3/6 = -1; rejected -6, -4, -6
        torch.testing.assert_close(cr, t(-4.0, -4.0, -1.0))
        torch.testing.assert_close(rj, t(-6.0, -4.0, -6.0))
        # logits r_w - r_l - gamma = 1.5, -0.5, 4.5; loss = log(1 + exp(-z))
        for got, want in zip(losses.tolist(), [softplus(-1.5), softplus(0.5), softplus(-4.5)]):
            self.assertAlmostEqual(got, want, places=5)

    def test_reward_scales_as_one_over_length(self):
        pc, pr = t(-6.0, -4.0), t(-9.0, -2.0)
        _, c1, r1 = simpo.simpo_loss(pc, pr, t(3.0, 2.0), t(3.0, 1.0), 2.5, 0.0)
        _, c2, r2 = simpo.simpo_loss(pc, pr, t(6.0, 4.0), t(6.0, 2.0), 2.5, 0.0)
        torch.testing.assert_close(c2, c1 / 2)
        torch.testing.assert_close(r2, r1 / 2)

    def test_gamma_shifts_the_logit_by_exactly_gamma(self):
        pc, pr, lc, lr = t(-6.0, -4.0, -3.0), t(-9.0, -2.0, -12.0), t(3.0, 2.0, 6.0), t(3.0, 1.0, 4.0)
        beta = 2.0
        for gamma in (0.3, 1.0, 2.5):
            with_gamma, _, _ = simpo.simpo_loss(pc, pr, lc, lr, beta, gamma)
            # the same logit reached without gamma, by lowering the chosen reward by gamma by hand
            shifted, _, _ = simpo.simpo_loss(pc - gamma * lc / beta, pr, lc, lr, beta, 0.0)
            torch.testing.assert_close(with_gamma, shifted)
            # and read the logit back from the losses: z = -log(exp(loss) - 1)
            no_gamma, _, _ = simpo.simpo_loss(pc, pr, lc, lr, beta, 0.0)
            logit = lambda loss: -torch.log(torch.expm1(loss.double()))
            torch.testing.assert_close(logit(no_gamma) - logit(with_gamma),
                                       torch.full((3,), gamma, dtype=torch.float64), rtol=0, atol=1e-4)

    def test_unit_lengths_give_summed_reward(self):
        """The --no-length-norm ablation: lengths all 1, the reward is beta * log pi(y|x), summed."""
        pc, pr = t(-6.0, -14.0), t(-9.0, -2.0)
        ones = torch.ones(2)
        losses, cr, rj = simpo.simpo_loss(pc, pr, ones, ones, 2.0, 1.0)
        torch.testing.assert_close(cr, 2.0 * pc)
        torch.testing.assert_close(rj, 2.0 * pr)
        # logits 2*(-6+9) - 1 = 5 and 2*(-14+2) - 1 = -25
        self.assertAlmostEqual(losses[0].item(), softplus(-5.0), places=5)
        self.assertAlmostEqual(losses[1].item(), softplus(25.0), places=4)

    def test_finite_at_extreme_margins(self):
        pc, pr = t(0.0, -1000.0, -3.0, grad=True), t(-1000.0, 0.0, -3.0, grad=True)
        ones = torch.ones(3)
        losses, _, _ = simpo.simpo_loss(pc, pr, ones, ones, 1.0, 0.0)
        self.assertTrue(torch.isfinite(losses).all(), losses)
        losses.sum().backward()
        self.assertTrue(torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all())
        torch.testing.assert_close(losses, t(0.0, 1000.0, math.log(2)))
        torch.testing.assert_close(pc.grad, t(0.0, -1.0, -0.5))       # -beta/|y| * sigmoid(-logit)


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
    def test_hand_worked_values(self):
        policy, ref = t(-5.0, -3.0, -10.0, -7.0), t(-6.0, -3.0, -8.0, -7.5)
        win = t(0.9, 0.5, 0.2, 0.0)
        losses = sppo.sppo_loss(policy, ref, win, eta=4.0)
        # log-ratios 1, 0, -2, 0.5; targets eta (P - 1/2) = 1.6, 0, -1.2, -2
        # losses (1 - 1.6)^2, 0, (-2 + 1.2)^2, (0.5 + 2)^2
        self.assertEqual(losses.shape, (4,))
        torch.testing.assert_close(losses, t(0.36, 0.0, 0.64, 6.25))

    def test_minimiser_is_eta_times_p_minus_half(self):
        ref = t(-4.0, -9.0, -2.5, -20.0)
        win = t(0.0, 0.3, 0.5, 0.95)
        for eta in (0.5, 10.0, 1000.0):
            with self.subTest(eta=eta):
                best = [r + eta * (p - 0.5) for r, p in zip(ref.tolist(), win.tolist())]
                at = torch.tensor(best, requires_grad=True)
                losses = sppo.sppo_loss(at, ref, win, eta)
                losses.sum().backward()
                torch.testing.assert_close(losses, torch.zeros(4), atol=1e-3 * eta, rtol=0)
                torch.testing.assert_close(at.grad, torch.zeros(4), atol=1e-3 * eta, rtol=0)
                # either side of it the loss is larger, and the gradient is 2 (log-ratio - target)
                for delta in (-0.5, 0.5):
                    moved = torch.tensor([b + delta for b in best], requires_grad=True)
                    losses = sppo.sppo_loss(moved, ref, win, eta)
                    losses.sum().backward()
                    torch.testing.assert_close(losses, torch.full((4,), delta ** 2), atol=1e-3 * eta, rtol=0)
                    torch.testing.assert_close(moved.grad, torch.full((4,), 2 * delta), atol=1e-3 * eta, rtol=0)

    def test_hard_variant_equals_the_two_squares(self):
        g = torch.Generator().manual_seed(0)
        pc, pr, rc, rr = (-torch.rand(6, generator=g) * 30 for _ in range(4))
        for eta in (0.1, 2.0, 20.0):
            with self.subTest(eta=eta):
                a_w, a_l = (pc - rc).tolist(), (pr - rr).tolist()
                want = [(w - eta / 2) ** 2 + (l + eta / 2) ** 2 for w, l in zip(a_w, a_l)]
                torch.testing.assert_close(sppo.sppo_hard_loss(pc, pr, rc, rr, eta), torch.tensor(want))
                # TRL's sppo_hard, beta = 1/eta: ((a_w - 1/(2 beta))^2 + (a_l + 1/(2 beta))^2) / 2, half of ours
                beta = 1 / eta
                trl = [((w - 1 / (2 * beta)) ** 2 + (l + 1 / (2 * beta)) ** 2) / 2 for w, l in zip(a_w, a_l)]
                torch.testing.assert_close(sppo.sppo_hard_loss(pc, pr, rc, rr, eta) / 2, torch.tensor(trl))

    def test_finite_at_extreme_inputs(self):
        policy = t(1000.0, -1000.0, 0.0, -1000.0, grad=True)
        ref = t(-1000.0, 1000.0, 0.0, -1000.0)
        win = t(0.0, 1.0, 1.0, 0.5)
        losses = sppo.sppo_loss(policy, ref, win, eta=1.0)
        losses.sum().backward()
        self.assertTrue(torch.isfinite(losses).all() and torch.isfinite(policy.grad).all())
        # log-ratios 2000, -2000, 0, 0; targets -0.5, 0.5, 0.5, 0
        torch.testing.assert_close(losses, t(2000.5 ** 2, 2000.5 ** 2, 0.25, 0.0))
        torch.testing.assert_close(policy.grad, t(4001.0, -4001.0, -1.0, 0.0))
        pc = t(1000.0, -1000.0, grad=True)
        hard = sppo.sppo_hard_loss(pc, t(-1000.0, 1000.0), t(0.0, 0.0), t(0.0, 0.0), eta=1000.0)
        hard.sum().backward()
        self.assertTrue(torch.isfinite(hard).all() and torch.isfinite(pc.grad).all())


class TestWinRates(unittest.TestCase):
    def test_constructed_case(self):
        # three responses scored 0, 0.2, -0.2 with tau 0.2: P(i > j) = sigmoid((s_i - s_j) / 0.2)
        p = sppo.estimate_win_rates(torch.tensor([[0.0, 0.2, -0.2]]), tau=0.2)
        want = [(0.5 + sig(-1) + sig(1)) / 3,      # y_0: ties itself, loses to y_1, beats y_2
                (sig(1) + 0.5 + sig(2)) / 3,
                (sig(-1) + sig(-2) + 0.5) / 3]
        self.assertEqual(p.shape, (1, 3))
        for got, w in zip(p[0].tolist(), want):
            self.assertAlmostEqual(got, w, places=6)

    def test_self_tie_counts_one_half(self):
        # a certain winner and a certain loser: with the self-tie 0.5 in the mean, (1 + 0.5)/2 and (0 + 0.5)/2
        # (without it they would be 1 and 0)
        p = sppo.estimate_win_rates(torch.tensor([[1.0, -1.0]]), tau=1e-3)
        torch.testing.assert_close(p, torch.tensor([[0.75, 0.25]]))

    def test_loop_over_pairs_and_mean_one_half(self):
        g = torch.Generator().manual_seed(1)
        scores = torch.rand(5, 4, generator=g) * 2 - 1
        tau = 0.3
        p = sppo.estimate_win_rates(scores, tau)
        for n in range(5):
            for i in range(4):
                want = sum(0.5 if i == j else sig((scores[n, i] - scores[n, j]).item() / tau) for j in range(4)) / 4
                self.assertAlmostEqual(p[n, i].item(), want, places=5)
        torch.testing.assert_close(p.mean(-1), torch.full((5,), 0.5))    # the 1/2 that replaces log Z / eta
        torch.testing.assert_close(sppo.estimate_win_rates(torch.zeros(2, 3), tau), torch.full((2, 3), 0.5))


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
