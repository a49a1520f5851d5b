"""
test_all.py: the tests of model.py, data.py, dpo.py, simpo.py and sppo.py (standard-library unittest only).

    python -m unittest test_all -v                  the whole suite (20 to 25 s on 2 quiet cores)
    python -m unittest test_all.TestDpoLoss -v      one class (any class below)

Write it yourself: replace a function's body with `raise NotImplementedError`, write it again from its
docstring and the derivation above it, and run its class. Each of these classes calls the function alone,
and a failure says what was expected, what came, and which common mistake gives exactly what came.

    function              in         class                  the one command
    dpo_loss              dpo.py     TestDpoLoss            python -m unittest test_all.TestDpoLoss -v
    simpo_loss            simpo.py   TestSimpoLoss          python -m unittest test_all.TestSimpoLoss -v
    sppo_loss             sppo.py    TestSppoLoss           python -m unittest test_all.TestSppoLoss -v
    estimate_win_rates    sppo.py    TestEstimateWinRates   python -m unittest test_all.TestEstimateWinRates -v
    sequence_logps        model.py   TestSequenceLogps      python -m unittest test_all.TestSequenceLogps -v

Then the tests follow the code, one part per file and one class per function or behaviour, named after it;
the run contract (flags, faults, the output folder, checkpoints, the SFT cache, memory, the README, the
scripts as processes) comes last, and students can skip it. Every test checks a value worked out apart from
the code under test (by hand, in closed form, with a loop, or from a run's own files) or a promised invariance.
The runs are tiny and shared: one SFT model per judge, each script's main() run in this process (run_main),
and a fresh process only where the process is the point, started first and in parallel (load_tests).
"""

import argparse
import atexit
import ast
import contextlib
import errno
import functools
import inspect
import io
import itertools
import json
import math
import os

# Several processes share 2 cores here, and the tests' tensors are tiny: one thread each (the subprocesses too)
os.environ.setdefault("OMP_NUM_THREADS", "1")     # before torch is imported
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.adam import adam as torch_adam    # the function torch.optim.Adam steps with

# torch.testing.assert_close imports torch.distributed.tensor on its first call (1.3 s) to look for distributed
# tensors, which these tests never hold: tell it so (a private flag; were it renamed, this would only cost the time)
torch.testing._comparison._HAS_DTENSOR = False

import data
import dpo
import model
import simpo
import sppo


# ====================================================================================================
# Write it yourself: dpo_loss, simpo_loss, sppo_loss, estimate_win_rates, sequence_logps
# ====================================================================================================
# (each mistake below is computed, not guessed from the message)

t = lambda *values, grad=False: torch.tensor(values, dtype=torch.float32, requires_grad=grad)
softplus = lambda z: math.log(1 + math.exp(z))      # log(1 + exp(z)), written out: -log sigmoid(x) = softplus(-x)
sig = lambda z: 1.0 / (1.0 + math.exp(-z))
NOT_MATCHED = ("no mistake these tests know gives this: compare your code with the docstring and the derivation "
               "above it")
NOT_FINITE = ("not finite: torch.log(torch.sigmoid(z)) is log(0) = -inf once z < -104 in float32, and its gradient "
              "is NaN; use F.logsigmoid(z), which is finite for any z")
RETURNS = ("losses", "chosen_rewards", "rejected_rewards")    # dpo_loss's and simpo_loss's, each [B]
SWAPPED = "chosen and rejected swapped (or the logit's sign flipped)"    # hints that several checks give
NO_LOGSIGMOID = "the log-sigmoid is missing: the loss is -log sigmoid(logits), not -logits"
MINUS = "the sign: the loss is MINUS log sigmoid(logits)"
REWARDS_SWAPPED = "chosen and rejected rewards swapped"


def attempt(test, fn, *args, returns=None):
    """fn(*args), failing with a sentence if fn is not written yet or does not return the tuple `returns` names."""
    try:
        out = fn(*args)
    except NotImplementedError:
        out = NotImplemented
    if out is NotImplemented:
        test.fail(f"{fn.__name__} is not written yet (it raises NotImplementedError): write its body from its "
                  f"docstring and the derivation above it in {fn.__module__}.py")
    if returns is not None and not (isinstance(out, tuple) and len(out) == len(returns)):
        got = type(out).__name__ + (f" of {len(out)}" if isinstance(out, (tuple, list)) else "")
        test.fail(f"{fn.__name__} must return {len(returns)} values, ({', '.join(returns)}); got {got}")
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
    """got == want to rounding; else fail: what, expected, got, and the hint of the first (value, hint) that fits."""
    if not torch.is_tensor(got):
        test.fail(f"{what}: expected a tensor {show(want)}; got {type(got).__name__} {got!r}")
    got_d, want_d = got.detach().double(), torch.as_tensor(want).double()
    same = lambda value: torch.allclose(got_d, torch.as_tensor(value).double().expand_as(got_d), rtol=rtol, atol=atol)
    if got_d.shape == want_d.shape and same(want_d):
        return
    if got_d.shape != want_d.shape:
        hint = (f"shape {tuple(got_d.shape)} instead of {tuple(want_d.shape)}: one value per example is expected"
                + ("; do not average here, the training loop takes the mean" if got_d.dim() == 0 else ""))
    elif not torch.isfinite(got_d).all():
        hint = NOT_FINITE
    else:
        hint = next((h for value, h in mistakes if same(value)), NOT_MATCHED)
    test.fail(f"{what}: expected {show(want_d)}; got {show(got_d)}: {hint}")


def expect_grad(test, tensor, want, what, mistakes=()):
    """The gradient that reached `tensor` after backward(): present, finite, and equal to want."""
    if tensor.grad is None:
        test.fail(f"{what}: no gradient reached it: the loss must be computed from the policy log-probs "
                  f"without .detach(), .item() or torch.no_grad()")
    expect_close(test, tensor.grad, want, what, mistakes)


def expect_detached(test, chosen_rewards, rejected_rewards):
    for name, rewards in (("chosen_rewards", chosen_rewards), ("rejected_rewards", rejected_rewards)):
        if rewards.requires_grad:
            test.fail(f"{name} carries a gradient: return it .detach()ed (rewards are logged and compared; only "
                      f"the loss is optimised)")


class TestDpoLoss(unittest.TestCase):
    """dpo.dpo_loss alone: losses -log sigma(beta (log-ratio_w - log-ratio_l)) [DPO-1], rewards [DPO-2]."""

    def loss(self, pc, pr, rc, rr, beta):
        """dpo_loss's three outputs, and m: what the usual wrong versions give for each and for both gradients."""
        out = attempt(self, dpo.dpo_loss, pc, pr, rc, rr, beta, returns=RETURNS)
        pc, pr = pc.detach(), pr.detach()
        z = beta * ((pc - rc) - (pr - rr))      # the logits; the loss is -log sigmoid(z) = log(1 + exp(-z))
        m = {"losses": [
            (F.softplus(z), "chosen and rejected swapped (or the logit's sign flipped): the logit is beta (log-ratio "
                            "of y_w - log-ratio of y_l), and the loss -log sigmoid(logit)"),
            (F.softplus(-z / beta), "beta is missing: logits = beta (log-ratio_w - log-ratio_l)"),
            (F.softplus(-beta * (pc - pr)),
             "the reference is not subtracted: each log-ratio is log pi_theta(y|x) - log pi_ref(y|x)"),
            (F.softplus(-beta * ((pc + rc) - (pr + rr))),
             "the reference is added: log pi_theta/pi_ref = log pi_theta - log pi_ref"),
            (-z, NO_LOGSIGMOID), (F.logsigmoid(z), MINUS),
            (torch.sigmoid(-z), "sigmoid(logits) without the log: the loss is -log sigmoid(logits)"),
            (-torch.sigmoid(z), "the log is missing: the loss is -log sigmoid(logits)")]}
        for name, policy, ref, other in (("chosen", pc, rc, pr - rr), ("rejected", pr, rr, pc - rc)):
            m[name] = [
                (policy - ref, "beta is missing from the reward: beta * log-ratio"),
                (beta * policy,
                 "the reference is not subtracted: the reward is beta (log pi_theta(y|x) - log pi_ref(y|x))"),
                (beta * other, REWARDS_SWAPPED),
                (beta * (ref - policy), "the sign: policy minus reference, log pi_theta - log pi_ref")]
        # paper, section 4: grad = -beta sigma(r_l - r_w) (grad log pi(y_w) - grad log pi(y_l)); y_l's is its opposite
        weight, n = torch.sigmoid(-z), len(z)
        grad = [(-beta * torch.sigmoid(z), SWAPPED), (beta * torch.sigmoid(z), SWAPPED),
                (-torch.sigmoid(-z / beta), "beta is missing from the logits: beta (log-ratio_w - log-ratio_l)"),
                (-beta * weight / n, f"1/{n} of the right gradient for a batch of {n}: the losses were averaged "
                                     f"inside dpo_loss; return one loss per example"),
                (-beta * torch.sigmoid(-beta * (pc - pr)), "the reference is not subtracted"),
                (torch.full_like(z, -beta), "the log-sigmoid is missing: -logits has the same gradient -beta for "
                                            "every pair; -log sigmoid weighs each pair by how wrong it is")]
        m["y_w"] = [(beta * weight, "the sign: raising log pi_theta(y_w|x) must LOWER the loss")] + grad
        m["y_l"] = [(-beta * weight, "the sign: raising log pi_theta(y_l|x) must raise the loss")] + [
            (-value, hint) for value, hint in grad]
        return out + (m,)

    def test_equal_policy_and_reference_give_ln2(self):
        g, beta = torch.Generator().manual_seed(0), 0.1
        pc, pr = (-torch.rand(8, generator=g) * 30).requires_grad_(True), -torch.rand(8, generator=g) * 30
        losses, cr, rj, m = self.loss(pc, pr, pc.detach().clone(), pr.clone(), beta)
        expect_close(self, losses, torch.full((8,), math.log(2)),
                     "pi_theta = pi_ref (log-ratios 0, logits 0): every loss must be -log sigmoid(0) = ln 2 = 0.693",
                     m["losses"])
        for got, name in ((cr, "chosen"), (rj, "rejected")):
            expect_close(self, got, torch.zeros(8), f"{name}_rewards when pi_theta = pi_ref: beta * log-ratio = 0",
                         m[name])
        losses.sum().backward()
        expect_grad(self, pc, torch.full((8,), -beta * 0.5),
                    "d loss / d log pi_theta(y_w|x) at logits 0: -beta sigmoid(0) = -0.05", m["y_w"])

    def test_hand_computed_batch(self):
        pc, pr, rc, rr = t(-5.0, -3.0, -10.0), t(-6.0, -2.0, -4.0), t(-5.5, -3.5, -8.0), t(-5.0, -2.5, -7.0)
        losses, cr, rj, m = self.loss(pc, pr, rc, rr, 0.5)
        # beta (log-ratio_w - log-ratio_l) = (0.75, 0, -2.5); loss log(1 + exp(-logit))
        expect_close(self, losses, t(softplus(-0.75), math.log(2), softplus(2.5)),
                     "losses for log-ratios w (0.5, 0.5, -2) and l (-1, 0.5, 3), beta 0.5, logits (0.75, 0, -2.5)",
                     m["losses"])
        for name, y, got, want in (("chosen", "y_w", cr, t(0.25, 0.25, -1.0)),
                                   ("rejected", "y_l", rj, t(-0.5, 0.25, 1.5))):
            expect_close(self, got, want, f"{name}_rewards = beta (log pi_theta({y}|x) - log pi_ref({y}|x))", m[name])

    def test_gradient_closed_form(self):
        pc, pr = t(-5.0, -3.0, -10.0, -1.0, grad=True), t(-6.0, -2.0, -4.0, -9.0, grad=True)
        rc, rr = t(-5.5, -3.5, -8.0, -2.0), t(-5.0, -2.5, -7.0, -3.0)
        beta = 0.7
        losses, cr, rj, m = self.loss(pc, pr, rc, rr, beta)
        expect_detached(self, cr, rj)
        losses.sum().backward()
        weight = torch.sigmoid(-beta * ((pc - rc) - (pr - rr)).detach())
        expect_grad(self, pc, -beta * weight, "d loss / d log pi_theta(y_w|x) = -beta sigmoid(-logit)", m["y_w"])
        expect_grad(self, pr, beta * weight, "d loss / d log pi_theta(y_l|x) = +beta sigmoid(-logit)", m["y_l"])

    def test_finite_at_extreme_margins(self):
        pc, pr = t(0.0, -1000.0, -1000.0, 0.0, grad=True), t(-1000.0, 0.0, -1000.0, 0.0, grad=True)
        losses, cr, rj, m = self.loss(pc, pr, torch.zeros(4), torch.zeros(4), 1.0)
        expect_close(self, losses, t(0.0, 1000.0, math.log(2), math.log(2)),
                     "losses at logits +1000, -1000, 0, 0 (beta 1): ~0, 1000, ln 2, ln 2, all finite", m["losses"])
        losses.sum().backward()
        expect_grad(self, pc, t(0.0, -1.0, -0.5, -0.5), "d loss / d log pi_theta(y_w|x) at logits +1000, -1000, 0, 0")
        expect_grad(self, pr, t(0.0, 1.0, 0.5, 0.5), "d loss / d log pi_theta(y_l|x) at logits +1000, -1000, 0, 0")


class TestSimpoLoss(unittest.TestCase):
    """simpo.simpo_loss alone: rewards (beta/|y|) log pi_theta(y|x) [SimPO-2], loss [SimPO-4]."""

    def loss(self, pc, pr, lc, lr, beta, gamma):
        """simpo_loss's three outputs, and m: what the usual wrong versions give for the losses and the rewards."""
        out = attempt(self, simpo.simpo_loss, pc, pr, lc, lr, beta, gamma, returns=RETURNS)
        pc, pr, m = pc.detach(), pr.detach(), {}
        for name, logps, lengths, other in (("chosen", pc, lc, pr / lr), ("rejected", pr, lr, pc / lc)):
            m[name] = [(beta * logps,
                        "the length normalisation is missing: divide log pi_theta(y|x) by |y| [SimPO-2]"),
                       (logps / lengths, "beta is missing from the reward: (beta/|y|) log pi_theta(y|x)"),
                       (beta * logps * lengths, "multiplied by |y|: the reward DIVIDES by the length"),
                       (beta * other, REWARDS_SWAPPED)]
        margin = beta * (pc / lc - pr / lr)    # r_w - r_l; the logits are margin - gamma, the loss log(1 + exp(-z))
        m["losses"] = [
            (F.softplus(-(margin + gamma)),
             "gamma is added: the chosen reward must beat the rejected one BY gamma, logits = r_w - r_l - gamma"),
            (F.softplus(-margin), "gamma is missing: logits = r_w - r_l - gamma [SimPO-3]"),
            (F.softplus(-(margin - beta * gamma)), "gamma is multiplied by beta: the target margin is gamma itself "
                                                   "(the official code's gamma_beta_ratio is gamma/beta)"),
            (F.softplus(-(margin - gamma / beta)), "gamma is divided by beta: the target margin is gamma itself"),
            (F.softplus(margin + gamma),      # at gamma 0 the same as the next one, the sign flipped
             SWAPPED if gamma == 0 else "chosen and rejected swapped: logits = r_w - r_l - gamma"),
            (F.softplus(margin - gamma), "the sign: chosen minus rejected, then the loss -log sigmoid(logits)"),
            (-(margin - gamma), NO_LOGSIGMOID), (F.logsigmoid(margin - gamma), MINUS)]
        return out + (m,)

    def test_hand_computed_batch(self):
        pc, pr = t(-6.0, -4.0, -3.0), t(-9.0, -2.0, -12.0)
        losses, cr, rj, m = self.loss(pc, pr, t(3.0, 2.0, 6.0), t(3.0, 1.0, 4.0), 2.0, 0.5)
        # rewards beta/|y| * logp: chosen 2*-6/3 = -4, 2*-4/2 = -4, 2*-3/6 = -1; rejected -6, -4, -6
        for name, got, want in (("chosen", cr, t(-4.0, -4.0, -1.0)), ("rejected", rj, t(-6.0, -4.0, -6.0))):
            expect_close(self, got, want, f"{name}_rewards = (beta/|y|) log pi_theta(y|x), beta 2", m[name])
        # reward margins 2, 0, 5; logits r_w - r_l - gamma = 1.5, -0.5, 4.5
        expect_close(self, losses, t(softplus(-1.5), softplus(0.5), softplus(-4.5)),
                     "losses for reward margins (2, 0, 5), gamma 0.5: -log sigmoid(margin - gamma)", m["losses"])

    def test_equal_rewards_give_log_one_plus_exp_gamma(self):
        """SimPO does not start at ln 2: with equal rewards the logit is -gamma (README, "Reading your logs")."""
        pc, lengths = t(-6.0, -10.0, -4.0, grad=True), t(3.0, 5.0, 2.0)
        beta, gamma = 2.0, 1.0
        losses, cr, rj, m = self.loss(pc, pc.detach().clone(), lengths, lengths, beta, gamma)
        expect_close(self, losses, torch.full((3,), softplus(gamma)),
                     "equal rewards, gamma 1: every loss must be -log sigmoid(-gamma) = ln(1 + e) = 1.313", m["losses"])
        expect_detached(self, cr, rj)
        losses.sum().backward()
        # d/d logp_w of -log sigma(beta logp_w/|y_w| - ...) = -(beta/|y_w|) sigma(-logit) = -(beta/|y_w|) sigma(gamma)
        expect_grad(self, pc, -beta / lengths * sig(gamma),
                    "d loss / d log pi_theta(y_w|x) = -(beta/|y_w|) sigmoid(gamma)", [
            (-beta * sig(gamma) * torch.ones(3), "the length normalisation is missing from the gradient's path"),
            (-1 / lengths * sig(gamma), "beta is missing from the rewards: (beta/|y|) log pi_theta(y|x)"),
            (beta / lengths * sig(gamma), "the sign: raising log pi_theta(y_w|x) must lower the loss")])

    def test_reward_scales_as_one_over_length(self):
        pc, pr = t(-6.0, -4.0), t(-9.0, -2.0)
        _, c1, r1 = attempt(self, simpo.simpo_loss, pc, pr, t(3.0, 2.0), t(3.0, 1.0), 2.5, 0.0, returns=RETURNS)
        _, c2, r2 = attempt(self, simpo.simpo_loss, pc, pr, t(6.0, 4.0), t(6.0, 2.0), 2.5, 0.0, returns=RETURNS)
        for name, before, after in (("chosen", c1, c2), ("rejected", r1, r2)):
            expect_close(self, after, before / 2, f"{name}_rewards with every length doubled: half of what they were", [
                (before, "the reward does not change with |y|: divide log pi_theta(y|x) by the length"),
                (before * 4, "the reward grows with |y|: it must DIVIDE by the length")])

    def test_gamma_shifts_the_logit_by_exactly_gamma(self):
        pc, pr, lc, lr = t(-6.0, -4.0, -3.0), t(-9.0, -2.0, -12.0), t(3.0, 2.0, 6.0), t(3.0, 1.0, 4.0)
        beta = 2.0
        logit = lambda loss: -torch.log(torch.expm1(loss.double()))    # the logit, read back from -log sigmoid(z)
        no_gamma, _, _ = attempt(self, simpo.simpo_loss, pc, pr, lc, lr, beta, 0.0, returns=RETURNS)
        for gamma in (0.3, 1.0, 2.5):
            with self.subTest(gamma=gamma):
                with_gamma, _, _ = attempt(self, simpo.simpo_loss, pc, pr, lc, lr, beta, gamma, returns=RETURNS)
                shift = logit(no_gamma) - logit(with_gamma)
                expect_close(self, shift, torch.full((3,), gamma), f"how much gamma = {gamma} lowers every logit", [
                    (-gamma, "gamma is added: logits = r_w - r_l - gamma"),
                    (beta * gamma, "gamma is multiplied by beta: the margin is gamma itself"),
                    (gamma / beta, "gamma is divided by beta: the margin is gamma itself"),
                    (0.0, "gamma is ignored")])

    def test_unit_lengths_give_summed_reward(self):
        """The --no-length-norm ablation: lengths all 1, the reward is beta * log pi(y|x), summed."""
        pc, pr = t(-6.0, -14.0), t(-9.0, -2.0)
        losses, cr, rj, m = self.loss(pc, pr, torch.ones(2), torch.ones(2), 2.0, 1.0)
        for name, y, got, logps in (("chosen", "y_w", cr, pc), ("rejected", "y_l", rj, pr)):
            expect_close(self, got, 2.0 * logps, f"{name}_rewards with lengths 1: beta log pi_theta({y}|x)", m[name])
        # margins 2*(-6+9) = 6 and 2*(-14+2) = -24; logits margin - gamma = 5 and -25
        expect_close(self, losses, t(softplus(-5.0), softplus(25.0)),
                     "losses at margins 6 and -24, gamma 1 (lengths 1)", m["losses"])

    def test_finite_at_extreme_margins(self):
        pc, pr = t(0.0, -1000.0, -3.0, grad=True), t(-1000.0, 0.0, -3.0, grad=True)
        losses, _, _, m = self.loss(pc, pr, torch.ones(3), torch.ones(3), 1.0, 0.0)
        expect_close(self, losses, t(0.0, 1000.0, math.log(2)),
                     "losses at logits +1000, -1000, 0: ~0, 1000, ln 2, all finite", m["losses"])
        losses.sum().backward()      # the gradients: -beta/|y| sigmoid(-logit) and its opposite
        expect_grad(self, pc, t(0.0, -1.0, -0.5), "d loss / d log pi_theta(y_w|x) at logits +1000, -1000, 0")
        expect_grad(self, pr, t(0.0, 1.0, 0.5), "d loss / d log pi_theta(y_l|x) at logits +1000, -1000, 0")


class TestSppoLoss(unittest.TestCase):
    """sppo.sppo_loss alone: (log pi_theta(y|x)/pi_ref(y|x) - eta (P - 1/2))^2 per sample [SPPO-6]."""

    def mistakes(self, policy, ref, win, eta):
        """What the usual wrong versions return, each with its hint."""
        logratio, win = (policy - ref).detach(), torch.as_tensor(win)
        target = eta * (win - 0.5)
        return [((logratio - (win - 0.5) / eta) ** 2, "the target is eta (P - 1/2), not (P - 1/2)/eta: the SPPO "
                 "write-up's error (its 'eta' there is TRL's beta = 1/eta)"),
                ((logratio - eta * win) ** 2, "the -1/2 is missing: log Z is replaced by eta/2, so the target is "
                 "eta P - eta/2 = eta (P - 1/2)"),
                ((-logratio - target) ** 2,
                 "the log-ratio is reversed: log pi_theta(y|x) - log pi_ref(y|x), policy minus reference"),
                ((logratio + target) ** 2,
                 "the target's sign: a sample that wins (P > 1/2) gets a POSITIVE target log-ratio"),
                (logratio - target, "not squared: the loss is (log-ratio - target)^2"),
                ((logratio - target).abs(), "an absolute value: the loss is the square (log-ratio - target)^2"),
                ((logratio - target) ** 2 / 2, "halved: [SPPO-6] is the plain square, no factor 1/2"),
                ((policy.detach() - target) ** 2,
                 "the reference is not subtracted: the log-ratio is log pi_theta(y|x) - log pi_ref(y|x)")]

    def test_hand_worked_values(self):
        policy, ref, win = t(-5.0, -3.0, -10.0, -7.0), t(-6.0, -3.0, -8.0, -7.5), t(0.9, 0.5, 0.2, 0.0)
        losses = attempt(self, sppo.sppo_loss, policy, ref, win, 4.0)
        # log-ratios 1, 0, -2, 0.5; targets 1.6, 0, -1.2, -2; losses (1 - 1.6)^2, 0, (-2 + 1.2)^2, (0.5 + 2)^2
        expect_close(self, losses, t(0.36, 0.0, 0.64, 6.25), "losses for log-ratios (1, 0, -2, 0.5), win rates "
                     "(0.9, 0.5, 0.2, 0), eta 4: targets (1.6, 0, -1.2, -2)", self.mistakes(policy, ref, win, 4.0))

    def test_minimiser_is_eta_times_p_minus_half(self):
        ref, win = t(-4.0, -9.0, -2.5, -20.0), t(0.0, 0.3, 0.5, 0.95)
        for eta in (0.5, 10.0, 1000.0):
            with self.subTest(eta=eta):
                best = [r + eta * (p - 0.5) for r, p in zip(ref.tolist(), win.tolist())]
                # the losses first, at the minimiser and half a nat either side of it; then the gradients
                points = [(delta, torch.tensor([b + delta for b in best], requires_grad=True))
                          for delta in (0.0, -0.5, 0.5)]
                for delta, at in points:
                    losses = attempt(self, sppo.sppo_loss, at, ref, win, eta)
                    expect_close(self, losses, torch.full((4,), delta ** 2),
                                 f"losses at log-ratio = eta (P - 1/2) {delta:+} (eta {eta}): {delta ** 2}",
                                 self.mistakes(at, ref, win, eta), atol=1e-3)
                    losses.sum().backward()
                for delta, at in points:   # the gradient is 2 (log-ratio - target)
                    expect_grad(self, at, torch.full((4,), 2 * delta),
                                f"d loss / d log pi_theta at log-ratio = eta (P - 1/2) {delta:+} (eta {eta}): "
                                f"2 x {delta}",
                                [(torch.full((4,), -2 * delta), "the log-ratio is reversed: policy minus reference"),
                                 (torch.full((4,), delta), "halved: [SPPO-6] is the plain square, whose gradient is "
                                                           "2 (log-ratio - target)")])

    def test_win_prob_may_be_a_number(self):
        """sppo_hard_loss passes P = 1 and P = 0 as plain numbers: the function must take a float too."""
        policy, ref = t(-5.0, -3.0), t(-6.0, -3.0)
        try:
            losses = sppo.sppo_loss(policy, ref, 1.0, 4.0)
        except NotImplementedError:
            return self.fail("sppo_loss is not written yet (it raises NotImplementedError): write its body from "
                             "the derivation above it in sppo.py")
        except Exception as e:   # the student's code meets a float where it expected a tensor
            return self.fail(f"sppo_loss(policy, ref, 1.0, eta) raised {type(e).__name__}: {e}: win_prob may be a "
                             f"number; torch.as_tensor(win_prob) turns it into a tensor")
        # log-ratios 1, 0; target eta (1 - 1/2) = 2
        expect_close(self, losses, t(1.0, 4.0), "losses with P = 1 (a plain number), log-ratios (1, 0), eta 4: "
                     "(1 - 2)^2, (0 - 2)^2", self.mistakes(policy, ref, torch.ones(2), 4.0))

    def test_finite_at_extreme_inputs(self):
        policy, ref = t(1000.0, -1000.0, 0.0, -1000.0, grad=True), t(-1000.0, 1000.0, 0.0, -1000.0)
        win = t(0.0, 1.0, 1.0, 0.5)
        losses = attempt(self, sppo.sppo_loss, policy, ref, win, 1.0)
        # log-ratios 2000, -2000, 0, 0; targets -0.5, 0.5, 0.5, 0
        expect_close(self, losses, t(2000.5 ** 2, 2000.5 ** 2, 0.25, 0.0),
                     "losses at log-ratios (2000, -2000, 0, 0), targets (-0.5, 0.5, 0.5, 0): finite",
                     self.mistakes(policy, ref, win, 1.0))
        losses.sum().backward()
        expect_grad(self, policy, t(4001.0, -4001.0, -1.0, 0.0),
                    "d loss / d log pi_theta = 2 (log-ratio - target) at log-ratios (2000, -2000, 0, 0)")


def bt_prefs(scores, tau):
    """[N, K, K] P(y_i > y_j | x) = sigmoid((s_i - s_j) / tau) of K responses per prompt scored `scores` [N, K]."""
    return torch.sigmoid((scores[:, :, None] - scores[:, None, :]) / tau)


class TestEstimateWinRates(unittest.TestCase):
    """sppo.estimate_win_rates alone: (1/K) sum_j P(y_i > y_j|x), j = i included, from [N, K, K] prefs [SPPO-5]."""

    def mistakes(self, prefs):
        """What the usual wrong versions return for `prefs` [N, K, K], each with its hint."""
        p, K = prefs.double(), prefs.shape[-1]
        eye = torch.eye(K, dtype=torch.bool)
        zero_diag, half_diag = p.masked_fill(eye, 0.0), p.masked_fill(eye, 0.5)
        return [(zero_diag.sum(-1) / (K - 1), "the tie with itself is left out: average over all K samples, the "
                                              "sample itself included (P(y_i > y_i) = 1/2), as the official code does"),
                (zero_diag.sum(-1) / K, "the diagonal counts 0: a sample ties with itself, P(y_i > y_i) = 1/2"),
                (p.mean(-1), "the diagonal is taken as the matrix holds it: set P(y_i > y_i) = 1/2 (a tie with "
                             "itself) whatever the judge put there"),
                (half_diag.mean(1), "averaged over the wrong axis (or the matrix transposed): row i holds "
                                    "P(y_i > y_j), averaged over j, the last axis"),
                (half_diag.sum(-1), "summed over j: the win rate is the MEAN over the K samples, (1/K) sum_j")]

    def check(self, prefs, want, what, mistakes=None):
        """estimate_win_rates(prefs) == want, and the matrix it was given left as it was."""
        given = prefs.clone()
        out = attempt(self, sppo.estimate_win_rates, prefs)
        if not torch.equal(prefs, given):
            self.fail("estimate_win_rates changed the matrix it was given: set the diagonal of a copy "
                      "(prefs.clone()); the caller's matrix is the judge's answer")
        expect_close(self, out, want, what, self.mistakes(given) if mistakes is None else mistakes)
        return out

    def test_constructed_case(self):
        # three responses scored 0, 0.2, -0.2 with tau 0.2: P(i > j) = sigmoid((s_i - s_j) / 0.2)
        want = [[(0.5 + sig(-1) + sig(1)) / 3,      # y_0: ties itself, loses to y_1, beats y_2
                 (sig(1) + 0.5 + sig(2)) / 3,
                 (sig(-1) + sig(-2) + 0.5) / 3]]
        self.check(bt_prefs(torch.tensor([[0.0, 0.2, -0.2]]), 0.2), want,
                   "win rates of three samples scored (0, 0.2, -0.2), tau 0.2")

    def test_self_tie_counts_one_half(self):
        # a certain winner and loser: the self-tie 1/2 in the mean gives (1 + 0.5)/2, (0 + 0.5)/2 (not 1 and 0)
        self.check(bt_prefs(torch.tensor([[1.0, -1.0]]), 1e-3), torch.tensor([[0.75, 0.25]]),
                   "a certain winner and a certain loser (K = 2): (1 + 1/2)/2 and (0 + 1/2)/2")

    def test_the_diagonal_is_a_tie_whatever_the_matrix_holds(self):
        # a judge that answers 0.9 when asked about a response against itself: the estimate still counts 1/2
        prefs = bt_prefs(torch.tensor([[0.0, 0.2, -0.2, 0.4]]), 0.2)
        want = prefs.mean(-1)
        prefs.diagonal(dim1=1, dim2=2).fill_(0.9)
        self.check(prefs, want, "win rates when the matrix holds 0.9 on its diagonal: the self-comparison counts 1/2")

    def test_loop_over_pairs_and_mean_one_half(self):
        g, tau = torch.Generator().manual_seed(1), 0.3
        scores = torch.rand(5, 4, generator=g) * 2 - 1
        want = [[sum(0.5 if i == j else sig((scores[n, i] - scores[n, j]).item() / tau) for j in range(4)) / 4
                 for i in range(4)] for n in range(5)]
        p = self.check(bt_prefs(scores, tau), want, "win rates [5 prompts, K = 4] against a loop over every pair")
        expect_close(self, p.mean(-1), torch.full((5,), 0.5),
                     "each prompt's K win rates average to exactly 1/2 (the 1/2 that replaces log Z / eta)")
        self.check(bt_prefs(torch.zeros(2, 3), tau), torch.full((2, 3), 0.5), "equal scores: every win rate 1/2", ())

    def test_a_matrix_no_reward_can_make(self):
        # the cyclic judge (data.py): story beats acting beats craft beats story, 0.9 each
        schools = torch.tensor([[0, 1, 2, 0]])
        prefs = data.cyclic_preference_prob(schools[:, :, None], schools[:, None, :]).float()
        want = [[(0.5 + 0.9 + 0.1 + 0.5) / 4, (0.1 + 0.5 + 0.9 + 0.1) / 4, (0.9 + 0.1 + 0.5 + 0.9) / 4,
                 (0.5 + 0.9 + 0.1 + 0.5) / 4]]
        self.check(prefs, want, "win rates of samples from the schools story, acting, craft, story under the cyclic "
                   "judge")


class TestSequenceLogps(unittest.TestCase):
    """model.sequence_logps alone: log pi(y|x) = sum over response tokens of log pi(y_i | x, y_<i), and |y|."""

    @classmethod
    def setUpClass(cls):
        cls.m, task = sharp_gpt(4), small_task(seed=5)
        cls.ids, cls.mask = task.sft_ids[:5], task.sft_mask[:5]    # BOS prompt SEP response EOS PAD...

    def loop_logps(self, ids, mask):
        """The definition, one token at a time: each response token scored by a forward pass on its prefix."""
        out = torch.zeros(ids.shape[0], dtype=torch.float64)
        for b, t in mask[:, 1:].nonzero().tolist():      # token t + 1 of row b is a response token
            with torch.no_grad():
                logits = self.m(ids[b:b + 1, :t + 1])[0, -1]
            out[b] += torch.log_softmax(logits.double(), dim=-1)[ids[b, t + 1]].item()
        return out

    def mistakes(self, ids, mask):
        """What the usual wrong versions return for these rows, each with its hint."""
        with torch.no_grad():
            logits = self.m(ids).double()                                     # [B, T, V]
        lsm, targets = torch.log_softmax(logits, -1), ids[:, 1:, None]
        shifted = lsm[:, :-1].gather(-1, targets).squeeze(-1)                 # log pi(token t+1 | tokens <= t)
        right = (shifted * mask[:, 1:]).sum(-1)
        raw = logits[:, :-1].gather(-1, targets).squeeze(-1)
        wrong_dim = torch.log_softmax(logits[:, :-1], 1).gather(-1, targets).squeeze(-1)
        not_pad = (ids[:, 1:] != data.PAD_ID).double()
        return [((lsm.gather(-1, ids[..., None]).squeeze(-1) * mask).sum(-1),
                 "no shift: position t's logits predict token t+1, so compare logits[:, :-1] with input_ids[:, 1:]"),
                ((shifted * mask[:, :-1]).sum(-1), "the mask is not shifted with the targets: use "
                                                   "response_mask[:, 1:], so the first response token counts and the "
                                                   "token after EOS does not"),
                ((shifted * not_pad).sum(-1), "the prompt is counted: only response tokens (response_mask) count"),
                (shifted.sum(-1), "the mask is missing: the prompt and the padding are counted"),
                (right / mask.sum(-1), "averaged: log pi(y|x) is a SUM over response tokens (SimPO divides by |y| "
                                       "itself)"),
                ((raw * mask[:, 1:]).sum(-1), "raw logits: take log_softmax over the vocabulary first"),
                ((wrong_dim * mask[:, 1:]).sum(-1),
                 "log_softmax over the wrong dimension: it normalises over the vocabulary, dim=-1")]

    def logps(self, ids, mask, m=None):
        return attempt(self, model.sequence_logps, m or self.m, ids, mask, returns=("logps", "lengths"))

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
        reviews = responses_of("great acting", "the plot was dull and boring")[:, :8]      # 2 and 6 words
        ids = torch.cat([prompt, reviews], dim=1)
        mask = torch.zeros_like(ids)
        mask[0, 5:8], mask[1, 5:12] = 1, 1                                  # the response tokens, EOS included
        with torch.no_grad():
            logps, lengths = self.logps(ids, mask)
        expect_close(self, lengths, t(3.0, 7.0),
                     "|y| of 'great acting <eos>' and 'the plot was dull and boring <eos>'", [
            (t(2.0, 6.0), "the closing EOS is not counted: |y| is the number of response tokens, EOS included"),
            (t(8.0, 12.0), "the prompt is counted: |y| counts response tokens only"),
            (t(12.0, 12.0), "the padding and the prompt are counted: |y| is the sum of the response mask")])
        expect_close(self, logps, self.loop_logps(ids, mask), "log pi(y|x) of the same two reviews",
                     self.mistakes(ids, mask), atol=1e-3, rtol=0)

    def test_extra_right_padding_and_batch_order_change_nothing(self):
        ids, mask, perm = F.pad(self.ids, (0, 6)), F.pad(self.mask, (0, 6)), torch.tensor([3, 0, 4, 2, 1])  # PAD is 0
        with torch.no_grad():
            (a, la), (b, lb) = self.logps(self.ids, self.mask), self.logps(ids, mask)
            c, lc = self.logps(self.ids[perm], self.mask[perm])
        expect_close(self, b, a, "log pi(y|x) with 6 more PAD columns on the right: unchanged",
                     self.mistakes(ids, mask), atol=1e-4, rtol=0)
        expect_close(self, lb, la, "|y| with 6 more PAD columns on the right: unchanged (padding never counts)")
        expect_close(self, c, a[perm], "log pi(y|x) of the same rows in another order: each row's own value, permuted",
                     atol=1e-4, rtol=0)
        expect_close(self, lc, la[perm], "|y| of the same rows in another order")

    def test_gradient_reaches_the_model(self):
        """Training differentiates log pi(y|x) with respect to the weights: nothing may be detached."""
        m = sharp_gpt(4)
        logps, _ = self.logps(self.ids, self.mask, m)
        if not logps.requires_grad:
            self.fail("the log-probs carry no gradient: no .detach(), .item() or torch.no_grad() inside sequence_logps")
        logps.sum().backward()
        self.assertGreater(m.wte.weight.grad.abs().sum().item(), 0.0, "the token embeddings got no gradient")


# ====================================================================================================
# The tests' helpers, one of each: stand-in models, tasks, the shared SFT model and runs, ScriptChecks
# ====================================================================================================

REPO, CPU = os.path.dirname(os.path.abspath(__file__)), torch.device("cpu")
SCRATCH = tempfile.mkdtemp(prefix="test_all-")   # every folder the tests write, removed at exit
SEED = 1    # every run's --seed: not 0, the default, so that a seed dropped on the way shows
SMALL = model.GPTConfig(n_layer=1, n_embd=32)    # the runs' GPT: the same code, a quarter of the work
TINY = ["--seed", str(SEED), "--sft-steps", "5", "--eval-samples", "16", "--batch-size", "8", "--device", "cpu",
        "--n-layer", "1", "--n-embd", "32"]
METRIC_KEYS = ["method", "seed", "device", "steps", "win_rate_vs_sft", "score", "sft_score", "length", "sft_length",
               "kl_to_sft", "sft_win_rate_vs_sft", "reward_accuracy", "ranking_agreement", "startup_seconds",
               "train_seconds", "eval_seconds", "seconds_per_step", "peak_memory_mb", "wall_seconds"]
TIMING_KEYS = set(METRIC_KEYS[13:]) | {"sampling_seconds", "ref_precompute_seconds"}
LOG_KEYS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"]
ZERO_RANKING = {"reward_accuracy": 0.0, "ranking_agreement": 0.0}   # a reward that ties every pair
scratch = lambda name: tempfile.mkdtemp(prefix=f"{name}-", dir=SCRATCH)


def sharp_gpt(seed=0):
    """The real network (two blocks, narrow), its next-token logits a few nats apart (a fresh one's are flat)."""
    torch.manual_seed(seed)
    m = model.GPT(model.GPTConfig(n_embd=32))
    with torch.no_grad():
        m.wte.weight.mul_(20.0)    # tied with lm_head
        m.wpe.weight.normal_(0.0, 0.5)
    return m.eval()


class Bigram(nn.Module):
    """The stand-in language model: next-token logits `first` after SEP and `rest` after any other token."""

    def __init__(self, first, rest=None):
        super().__init__()
        self.first, self.rest, self.blocks = first, first if rest is None else rest, nn.ModuleList()   # no kv cache

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
POSITIVE_WRITER = Bigram(logits_row(POS), logits_row(POS, eos=1.0))                # one positive word, EOS
NEGATIVE_WRITER = Bigram(logits_row(NEG), logits_row(NEG, eos=0.25))               # negative words, ~4 of them
EITHER_WRITER = Bigram(logits_row(POS + NEG), logits_row(POS, eos=1.0))            # one word of either kind, EOS
writer_of = lambda word: Bigram(logits_row([data.STOI[word]]), logits_row(eos=1.0))   # the review "word", always
small_task = lambda seed=0, **kw: data.Task(data.TaskConfig(n_demos=64, n_pairs=16, n_heldout=16, **kw), seed=seed)
weights = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}


def same_weights(a, b):
    """Two state_dicts, or the models holding them, hold equal tensors under the same names."""
    a, b = (x if isinstance(x, dict) else x.state_dict() for x in (a, b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def responses_of(*texts):
    """Token tensor [N, MAX_RESPONSE] of reviews given as text (EOS, then padding)."""
    out = torch.zeros(len(texts), data.MAX_RESPONSE, dtype=torch.long)
    for i, text in enumerate(texts):
        out[i, :len(text.split()) + 1] = torch.tensor(data.encode(text) + [data.EOS_ID])
    return out


def rows_of(ids):
    """The rows of a token tensor as tuples, trailing padding removed (so trimmed and full rows compare)."""
    return [tuple(row[:len(row) - next((i for i, v in enumerate(reversed(row)) if v != data.PAD_ID), len(row))])
            for row in ids.tolist()]


def logps_of(m, ids, mask):
    """log pi(y|x) of each row under m, one row set at a time (no stacking, no batching): [B]."""
    with torch.no_grad():
        return model.sequence_logps(m, ids, mask)[0]


def read_json(*path):
    """A JSON file, or a JSON-lines file (.jsonl) as the list of its rows."""
    text = pathlib.Path(*path).read_text()
    if path[-1].endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def folder_state(folder):
    """({name: bytes} of a folder's files, what a save leaves beside it: NAME.incoming, NAME.previous)."""
    head, name = os.path.split(os.path.normpath(folder))
    files = {p.name: p.read_bytes() for p in sorted(pathlib.Path(folder).iterdir())} if os.path.exists(folder) else None
    return files, sorted(f for f in os.listdir(head) if f.startswith(f"{name}."))


def write_previous_run(folder):
    """A previous run's three files with recognisable bytes; returns {name: bytes}."""
    os.makedirs(folder, exist_ok=True)
    files = {"metrics.json": b'{"previous": true}\n', "log.jsonl": b'{"step": 0}\n', "model.pt": b"previous weights"}
    for name, content in files.items():
        pathlib.Path(folder, name).write_bytes(content)
    return files


def throw(error):   # raise, in a lambda
    raise error


@contextlib.contextmanager
def quietly():
    """stdout and stderr captured: `with quietly() as (out, err):`."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield out, err


class Spy:
    """with Spy(obj, "name") as spy: obj.name runs; spy.calls: a (arguments), result, before(a), caller, start, end."""
    clock = itertools.count()

    def __init__(self, obj, name, before=None):
        self.obj, self.name, self.before, self.calls = obj, name, before, []

    def __enter__(self):
        original = getattr(self.obj, self.name)
        signature = inspect.signature(original)

        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            call = argparse.Namespace(a=dict(bound.arguments), caller=sys._getframe(1).f_code.co_name,
                                      start=next(Spy.clock))
            call.before = self.before(call.a) if self.before else None
            call.result, call.end = original(*args, **kwargs), next(Spy.clock)
            self.calls.append(call)
            return call.result
        self.patch = mock.patch.object(self.obj, self.name, wrapper)
        self.patch.start()
        return self

    def __exit__(self, *exc):
        self.patch.stop()

    def by(self, caller):
        return [c for c in self.calls if c.caller == caller]


_SFT = {}


def sft(judge="bt"):
    """The SFT cache folder of the default task under `judge` (--seed 1, 5 steps, SMALL), trained once."""
    if judge not in _SFT:
        _SFT[judge], task = scratch(f"sft-{judge}"), data.Task(data.TaskConfig(judge=judge), seed=SEED)
        with quietly():
            model.sft_model(task, CPU, _SFT[judge], SEED, 5, SMALL, quiet=True)
    return _SFT[judge]


def run_main(module, argv, spies=()):
    """`python module.py argv` in this process, as a fresh process would run it: (exit code, stdout, stderr)."""
    out, err, code, threads = io.StringIO(), io.StringIO(), 0, torch.get_num_threads()
    model.progress.__dict__.update(out=None, phase="setup", step=None, total=None, lr=None)
    with contextlib.ExitStack() as stack:
        for context in (*spies, mock.patch.object(sys, "argv", [f"{module.__name__}.py", *argv]),
                        contextlib.redirect_stdout(out), contextlib.redirect_stderr(err)):
            stack.enter_context(context)
        try:
            model.run(module.main)
        except SystemExit as e:
            code = e.code
        finally:
            torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


# The shared runs (gpt_run): script, flags beyond TINY, the judge of the SFT cache it loads (None: its own)
GPT_RUNS = {
    "dpo": (dpo, "--steps 3 --beta 0.5 --lr 1e-2".split(), "bt"),
    "dpo_precompute": (dpo, "--steps 3 --beta 0.5 --lr 1e-2 --precompute-ref".split(), "bt"),
    "simpo": (simpo, "--judge cyclic --steps 3 --beta 3 --gamma 0.6 --lr 1e-2".split(), "cyclic"),
    "simpo_small": (simpo, "--steps 1 --beta 3 --gamma 0.6 --no-length-norm --n-head 4".split(), None),
    "sppo": (sppo, "--judge cyclic --tau 0.5 --steps 2 --k 2 --iterations 2 --eta 10".split(), "cyclic"),
    "sppo_hard": (sppo, "--variant hard --steps 2 --eta 10".split(), "bt"),
}
SPIED = {dpo: ["dpo_loss", "pair_logps", "frozen_copy"], simpo: ["simpo_loss"],
         sppo: ["self_play_iteration", "hard_fit", "sppo_hard_loss", "frozen_copy"]}

@functools.cache
def gpt_run(name):
    """One of GPT_RUNS, made once and spied on: dir, out, err, metrics, log, trained, task, policy, spy, gpts, sft."""
    module, flags, judge = GPT_RUNS[name]
    sft_dir = sft(judge) if judge else scratch("sft-fresh")
    out, start = os.path.join(scratch(name), "run"), Spy(data, "start_run")
    spy = {"start_run": start, "pair_batch": Spy(data, "pair_batch", lambda a: weights(start.calls[0].result[2])),
           "evaluate_sft": Spy(data, "evaluate_sft", lambda a: weights(a["sft"])),
           "memory_sample": Spy(model.PeakMemory, "sample"),
           **{n: Spy(data, n) for n in ("evaluate", "heldout_reviews", "sample", "pair_logps_all", "print_summary")},
           **{n: Spy(module, n) for n in ["PeakMemory", "Adam", *SPIED[module]]},
           **{n: Spy(model.GPT, n) for n in ("__init__", "__setstate__")}}   # every GPT made: GPT(...), a deepcopy
    if module is sppo:
        spy.update(play_sample=Spy(sppo, "sample"), game_stats=Spy(sppo, "game_stats", lambda a: list(a["iterates"])))
    code, stdout, err = run_main(module, TINY + flags + ["--out", out, "--sft-dir", sft_dir], spies=spy.values())
    if code != 0:
        raise AssertionError(f"{name}: exit {code}\n{err}")
    cache = torch.load(glob_one(sft_dir), weights_only=True)
    return argparse.Namespace(
        dir=out, out=stdout, err=err, metrics=read_json(out, "metrics.json"), log=read_json(out, "log.jsonl"),
        spy=spy, sft_dir=sft_dir, task=start.calls[0].result[1], policy=start.calls[0].result[2],
        gpts=len(spy["__init__"].calls + spy["__setstate__"].calls),
        trained=model.load_checkpoint(os.path.join(out, "model.pt"))[0],
        sft=with_weights(cache["model"], model.GPTConfig(**cache["key"]["model"])))


def glob_one(folder):
    """The one SFT cache file in a folder."""
    (path,) = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".pt")]
    return path


def with_weights(state, cfg=SMALL):
    m = model.GPT(cfg)
    m.load_state_dict(state)
    return m.eval()


class ScriptChecks:
    """What every method script's run must do, checked on one run of it (gpt_run(run_name)); mixed in per script."""
    run_name, title, log_keys, training_forwards, trains_on = None, None, LOG_KEYS, 3, "main"
    reward_scale = None    # the reward: reward_scale * log pi_theta/pi_sft, or (None) SimPO's beta log pi / |y|

    @classmethod
    def setUpClass(cls):
        cls.r = gpt_run(cls.run_name)       # the run
        cls.sft = cls.r.sft

    def sft_column(self):
        return ZERO_RANKING    # DPO's and SPPO's reward of the SFT model itself: 0, all ties

    def test_files_of_the_run(self):
        m, r = self.r.metrics, self.r
        self.assertLessEqual(set(METRIC_KEYS), set(m))
        self.assertEqual((m["method"], m["seed"], m["device"]), (self.title.lower(), SEED, "cpu"))
        self.assertTrue(all(0.0 <= m[k] <= 1.0 for k in ("win_rate_vs_sft", "reward_accuracy", "ranking_agreement")))
        self.assertTrue(all(math.isfinite(m[k]) for k in METRIC_KEYS[4:]))
        times = ("startup_seconds", "train_seconds", "eval_seconds")
        self.assertTrue(all(m[k] >= 0.0 for k in (*times, "peak_memory_mb")))
        self.assertLessEqual(sum(m[k] for k in times), m["wall_seconds"] + 1e-6)
        self.assertEqual([row["step"] for row in r.log], list(range(m["steps"])))
        self.assertTrue(all(math.isfinite(row[k]) for row in r.log for k in self.log_keys))
        self.assertTrue(all(0.0 <= row["rewards/accuracies"] <= 1.0 for row in r.log))
        self.assertIn(f"SFT model (cache {glob_one(r.sft_dir)}): loaded; ", r.err)   # the shared cache, not rebuilt
        ckpt = torch.load(os.path.join(r.dir, "model.pt"), weights_only=True)    # (its format: TestCheckpoint)
        self.assertEqual((ckpt["args"]["seed"], ckpt["args"]["out"]), (SEED, r.dir))
        self.assertTrue(same_weights(ckpt["model"], r.trained) and same_weights(ckpt["model"], r.policy))
        files, beside = folder_state(r.dir)
        self.assertEqual((sorted(files), beside), (["log.jsonl", "metrics.json", "model.pt"], []))

    def test_the_game_is_reported_under_the_cyclic_judge_only(self):
        m, game = self.r.metrics, ("school_shares", "exploitability", "sft_school_shares", "sft_exploitability")
        if self.r.task.config.judge != "cyclic":
            return self.assertFalse(set(game) & set(m))
        self.assertLessEqual(set(game), set(m))
        shares = torch.tensor(m["school_shares"])
        self.assertAlmostEqual(m["exploitability"], data.school_exploitability(shares), places=6)
        self.assertEqual("exploitability_last" in m, self.title == "SPPO")

    def test_training_sees_training_pairs_only(self):
        calls, g = self.r.spy["pair_batch"].by(self.trains_on), torch.Generator().manual_seed(SEED)
        self.assertEqual(len(calls), self.r.metrics["steps"])
        for call in calls:                                  # the batches are the seeded draws, in order
            self.assertIs(call.a["pairs"], self.r.task.pairs, "training batches must come from task.pairs")
            draw = torch.randint(0, len(self.r.task.pairs["chosen_ids"]), (8,), generator=g)
            self.assertTrue(torch.equal(call.a["idx"].cpu(), draw))

    def test_evaluation_compares_the_trained_policy_with_the_sft_model_on_heldout_data_only(self):
        spy, r = self.r.spy, self.r
        self.assertEqual(len(spy["evaluate_sft"].calls), 1, "the SFT model's side of the evaluation is measured once")
        side = spy["evaluate_sft"].calls[0]
        self.assertTrue(same_weights(side.before, self.sft), "evaluate_sft must get the SFT model")
        call = spy["evaluate"].calls[-1]                    # (SPPO evaluates after every iteration)
        self.assertIs(call.a["policy"], r.policy, "evaluate(policy, sft, ...): the trained policy first")
        self.assertIs(call.a["sft_side"], side.result)
        ids = r.task.heldout_pairs["chosen_ids"][:4]
        with torch.no_grad():                               # the SFT model, or what computes its logits
            torch.testing.assert_close(call.a["sft"](ids), self.sft(ids), rtol=0, atol=1e-5)
        self.assertEqual([(c.a["n_samples"], c.a["seed"]) for c in (side, call)], [(16, SEED)] * 2)
        held = set(rows_of(r.task.heldout_prompts))
        self.assertTrue(spy["sample"].calls)
        self.assertTrue(all(set(rows_of(c.a["prompts"])) <= held for c in spy["sample"].calls))
        calls = [c for c in spy["pair_logps_all"].calls if c.caller != "hard_fit"]   # (its pi_ref: training)
        self.assertTrue(calls and all(c.a["pairs"] is r.task.heldout_pairs for c in calls))

    def test_evaluation_numbers_match_a_recomputation(self):
        """metrics.json's evaluation and held-out rewards, recomputed from model.pt and the SFT cache alone."""
        side = data.evaluate_sft(self.sft, self.r.task, CPU, 16, SEED)
        e, m = data.evaluate(self.r.trained, self.sft, side, self.r.task, CPU, 16, SEED), self.r.metrics
        for key in ("win_rate_vs_sft", "score", "sft_score", "length", "sft_length", "kl_to_sft", "sft_win_rate_vs_sft",
                    "exploitability", "sft_exploitability"):
            self.assertAlmostEqual(m.get(key, 0.0), e.get(key, 0.0), places=5, msg=key)
        for key in ("school_shares", "sft_school_shares"):
            self.assertEqual(m.get(key), e.get(key), key)
        # reward_accuracy: reward puts y_w first; ranking_agreement: reward's order is the average log-likelihood's
        pc, pr, lc, lr = data.pair_logps_all(self.r.trained, self.r.task.heldout_pairs, CPU)
        if self.reward_scale is None:
            cr, rr = 3.0 * pc / lc, 3.0 * pr / lr                         # SimPO, --beta 3
            self.assertEqual(m["ranking_agreement"], 1.0)                 # the reward IS the average log-likelihood
        else:
            sc, sr, _, _ = data.pair_logps_all(self.sft, self.r.task.heldout_pairs, CPU)
            cr, rr = self.reward_scale * (pc - sc), self.reward_scale * (pr - sr)
        self.assertAlmostEqual(m["reward_accuracy"], (cr > rr).double().mean().item(), places=6)
        agree = torch.sign(cr - rr) == torch.sign(pc / lc - pr / lr)
        self.assertAlmostEqual(m["ranking_agreement"], agree.double().mean().item(), places=6)

    def test_end_of_run_table_gets_this_runs_numbers(self):
        (call,) = self.r.spy["print_summary"].calls
        self.assertEqual((call.a["method"], call.a["out"]), (self.title, self.r.dir))
        for key in ("win_rate_vs_sft", "sft_win_rate_vs_sft", "kl_to_sft", "reward_accuracy"):
            self.assertEqual(call.a["metrics"][key], self.r.metrics[key], key)
        self.assertEqual(call.a["sft_ranking"], self.sft_column())
        # an SFT column of 0 by definition (a reward that ties every pair) is said under the table
        self.assertEqual(call.a["note"] is not None, self.sft_column() == ZERO_RANKING)
        self.assertIn(f"| wrote {self.r.dir}/", self.r.out.strip().splitlines()[-1])

    def test_peak_memory_is_sampled_at_every_training_forward_only(self):
        spy = self.r.spy
        (meter,) = spy["PeakMemory"].calls
        self.assertIs(meter.a["policy"], self.r.policy)
        built = min(c.start for name in ("Adam", "frozen_copy") if name in spy for c in spy[name].calls)
        self.assertLess(meter.end, built, "PeakMemory measures from the SFT model, before the method builds anything")
        samples = [s.start for s in spy["memory_sample"].calls]
        self.assertEqual(len(samples), self.training_forwards)
        for c in spy["evaluate"].calls + spy["evaluate_sft"].calls + spy["pair_logps_all"].calls:
            self.assertFalse([s for s in samples if c.start < s < c.end], f"sampled in {c.caller}")
        self.assertAlmostEqual(self.r.metrics["peak_memory_mb"], meter.result.mb(), places=9)

    def step_log_ratios(self, step, batch_call, loss_call):
        """A step's loss got its batch's log-probs, the policy's (weights then) and the SFT model's: (a_w, a_l)."""
        b, policy = batch_call.result, with_weights(batch_call.before)
        want = {f"{who}_{side}_logps": logps_of(m, b[f"{side}_ids"], b[f"{side}_mask"])
                for who, m in (("policy", policy), ("ref", self.sft)) for side in ("chosen", "rejected")}
        for name, value in want.items():     # each computed alone, under the loss's argument names
            torch.testing.assert_close(loss_call.a[name].detach(), value, rtol=0, atol=1e-3, msg=f"step {step}: {name}")
        return [want[f"policy_{side}_logps"] - want[f"ref_{side}_logps"] for side in ("chosen", "rejected")]


def exact_run(module, *flags):
    """python module.py --exact flags, in this process: (metrics.json, the files written)."""
    out = os.path.join(scratch("exact"), "run")
    code, _, err = run_main(module, ["--exact", "--out", out, *flags])
    if code != 0:
        raise AssertionError(f"exit {code}\n{err}")
    return read_json(out, "metrics.json"), sorted(os.listdir(out))


# ====================================================================================================
# model.py: the network, log-probs, sampling, the SFT start, the table policy
# ====================================================================================================

class TestGPT(unittest.TestCase):
    def test_size_tying_causal_mask_and_kv_cache(self):
        m, g, V = model.GPT(model.GPTConfig()), torch.Generator().manual_seed(1), len(data.VOCAB)
        self.assertIs(m.lm_head.weight, m.wte.weight)                                     # weight tying
        self.assertTrue(5e4 <= sum(p.numel() for p in m.parameters()) <= 1e6 and model.GPTConfig().vocab_size == V)
        # changing the token at position 7 never changes the logits of positions 0..6 (but does change 7)
        m, ids = sharp_gpt(0), torch.randint(4, V, (3, 15), generator=g)
        changed = ids.clone()
        changed[:, 7] = (ids[:, 7] - 4 + 1) % (V - 4) + 4   # a different real token
        with torch.no_grad():
            a, b, caches = m(ids), m(changed), [dict() for _ in m.blocks]
            # the prompt through the key/value cache in one pass, then one token at a time: the full pass's logits
            parts = [m(ids[:, :5], caches)] + [m(ids[:, i:i + 1], caches) for i in range(5, ids.shape[1])]
        torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-5)
        self.assertGreater((a[:, 7:] - b[:, 7:]).abs().max().item(), 1e-2)
        torch.testing.assert_close(torch.cat(parts, dim=1), a, rtol=1e-4, atol=1e-4)


class TestPairLogps(unittest.TestCase):
    def test_one_pass_equals_two_calls_and_batches_change_nothing(self):
        """pair_logps: the stacked batch, the sides padded to one width; sequence_logps_all: in batches, trimmed."""
        m, task = sharp_gpt(4), small_task(seed=5)
        chosen = model.trim(task.sft_ids[:3], task.sft_mask[:3])
        rejected = F.pad(task.sft_ids[2:5], (0, 3)), F.pad(task.sft_mask[2:5], (0, 3))   # another width
        self.assertNotEqual(chosen[0].shape[1], rejected[0].shape[1])
        with torch.no_grad():
            (sc, slc), (sr, slr) = model.sequence_logps(m, *chosen), model.sequence_logps(m, *rejected)
            torch.testing.assert_close(model.pair_logps(m, *chosen, *rejected), (sc, sr, slc, slr), rtol=0, atol=1e-4)
        ids, mask = F.pad(task.sft_heldout_ids, (0, 4)), F.pad(task.sft_heldout_mask, (0, 4))   # 4 PAD columns more
        logps, lengths = model.sequence_logps_all(m, ids, mask, batch_size=5)   # 16 rows: batches of 5, 5, 5, 1
        torch.testing.assert_close(logps, logps_of(m, ids, mask), rtol=0, atol=1e-4)
        self.assertTrue(torch.equal(lengths, mask[:, 1:].sum(1).float()) and not logps.requires_grad)


class TestSample(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.m, cls.prompts = sharp_gpt(12), small_task(seed=12).eval_prompts(200)
        torch.manual_seed(123)
        cls.rng = torch.random.get_rng_state()
        cls.a, cls.b, cls.c, cls.uncached = cls.draw(0), cls.draw(0), cls.draw(1), cls.draw(0, use_cache=False)
        cls.rng_after = torch.random.get_rng_state()

    @classmethod
    def draw(cls, seed, prompts=None, m=None, n=data.MAX_RESPONSE, **kw):
        return model.sample(m or cls.m, cls.prompts if prompts is None else prompts, n, data.EOS_ID,
                            data.BANNED_IN_RESPONSE, generator=torch.Generator().manual_seed(seed), **kw)

    def test_reproducible_cache_or_not_and_the_global_rng_untouched(self):
        a = self.a
        self.assertTrue(torch.equal(a, self.b) and not torch.equal(a, self.c) and torch.equal(a, self.uncached))
        self.assertTrue(torch.equal(self.rng, self.rng_after))
        self.assertTrue(torch.equal(self.draw(0, batch_size=64)[:64], self.draw(0, self.prompts[:64])))   # one stream

    def test_rows_end_in_eos_then_pad_and_never_banned(self):
        # EOS with probability 0.15 at every step (banned tokens likelier still): EOS drawn early, or forced last
        row = logits_row(range(4, len(data.VOCAB)), eos=0.15)    # the words (all but PAD BOS SEP EOS) share 0.85
        row[list(data.BANNED_IN_RESPONSE)] = 50.0
        for ys in (self.a, self.c, self.draw(0, m=Bigram(row))):
            self.assertEqual(tuple(ys.shape), (200, data.MAX_RESPONSE))
            ends = [r.index(data.EOS_ID) for r in ys.tolist()]    # allowed tokens, then EOS, then only PAD
            for r, e in zip(ys.tolist(), ends):
                self.assertTrue(set(r[e + 1:]) <= {data.PAD_ID} and not set(r[:e]) & set(data.BANNED_IN_RESPONSE), r)
        self.assertEqual((min(ends), max(ends)), (0, data.MAX_RESPONSE - 1))
        # P(EOS drawn at step i) = 0.85^i * 0.15 for i < 16; the rest forced at 16: E[end] = sum_i 0.85^i, i<16
        self.assertLess(abs(sum(ends) / len(ends) - sum(0.85 ** i for i in range(data.MAX_RESPONSE - 1))), 1.5)

    def test_banned_ids_never_drawn_even_when_most_likely(self):
        good, bad = data.STOI["good"], data.STOI["bad"]
        row = torch.full((len(data.VOCAB),), float("-inf"))
        row[list(data.BANNED_IN_RESPONSE)] = 50.0               # what an unconstrained sampler would draw
        row[good], row[bad] = math.log(0.75), math.log(0.25)
        draw = lambda **kw: self.draw(0, torch.zeros(4000, data.PROMPT_LEN, dtype=torch.long), Bigram(row), 2, **kw)
        ys = draw()
        self.assertTrue(torch.isin(ys[:, 0], torch.tensor([good, bad])).all() and (ys[:, 1] == data.EOS_ID).all())
        # temperature 1 draws with the model's probabilities, 0.5 squares the odds: 0.75^2/(0.75^2+0.25^2)
        share = lambda ys: (ys[:, 0] == good).double().mean().item()
        self.assertLess(abs(share(ys) - 0.75), 5 * math.sqrt(0.25 * 0.75 / 4000))
        self.assertLess(abs(share(draw(temperature=0.5)) - 0.9), 5 * math.sqrt(0.09 / 4000))


class TestAdam(unittest.TestCase):
    def test_bit_for_bit_equal_to_torch_adam(self):
        """model.Adam against torch.optim.adam.adam, the function torch.optim.Adam steps with, step by step (the class
        itself would first import torch's compiler, 1.4 s), from torch.optim.Adam's defaults and from others."""
        g, default = torch.Generator().manual_seed(0), inspect.signature(torch.optim.Adam).parameters
        for kw in ({"lr": 3e-3}, {"lr": 0.1, "betas": (0.8, 0.99), "eps": 1e-6}):
            (beta1, beta2), eps = kw.get("betas", default["betas"].default), kw.get("eps", default["eps"].default)
            start = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
            ours, theirs = [nn.Parameter(p.clone()) for p in start], [p.clone() for p in start]
            a, lr = model.Adam(ours, **kw), kw["lr"]
            moments, steps = [torch.zeros_like(p) for p in start * 2], [torch.tensor(0.0) for _ in start]
            for step in range(6):
                if step == 3:      # the SFT model's schedule sets the learning rate between steps
                    a.lr = lr = kw["lr"] / 3
                for p in ours:
                    p.grad = torch.randn(p.shape, generator=g) * 10.0 ** (step - 3)
                a.step()
                torch_adam(theirs, [p.grad.clone() for p in ours], moments[:2], moments[2:], [], steps, amsgrad=False,
                           beta1=beta1, beta2=beta2, lr=lr, weight_decay=0.0, eps=eps, maximize=False)
                for p, q in zip(ours, theirs):
                    self.assertTrue(torch.equal(p, q), f"{kw}, step {step}: off by {(p - q).abs().max().item():.3g}")
            a.zero_grad()
            self.assertEqual((a.t, [p.grad for p in ours]), (6, [None, None]))


class TestSftModel(unittest.TestCase):
    def test_trains_on_demonstrations_and_measures_on_heldout_ones(self):
        """Cross-entropy on the demonstrations' response tokens, measured on held-out ones; sft_ce in float64."""
        task, steps, lrs, real_step = small_task(seed=26), 8, [], model.Adam.step
        demos, held = set(rows_of(task.sft_ids)), set(rows_of(task.sft_heldout_ids))
        pairs = set(rows_of(task.pairs["chosen_ids"])) | set(rows_of(task.pairs["rejected_ids"]))
        with Spy(model, "sequence_logps", lambda a: torch.is_grad_enabled()) as spy, quietly(), \
                mock.patch.object(model.Adam, "step", lambda opt: lrs.append(opt.lr) or real_step(opt)):
            m, info = model.sft_model(task, CPU, scratch("sft"), 0, steps, SMALL, quiet=True)
        training = [set(rows_of(c.a["input_ids"])) for c in spy.calls if c.before]
        self.assertEqual(len(training), steps)
        self.assertTrue(all(rows <= demos and not rows & pairs for rows in training), "SFT trains on task.sft_ids")
        self.assertEqual([set(rows_of(c.a["input_ids"])) for c in spy.calls if not c.before], [held, held],
                         "cross-entropy before and after, on held-out demonstrations")
        self.assertLess(info["ce_after"], info["ce_before"])
        self.assertEqual((info["steps"], info["cached"], m.training), (steps, False, False))
        # a linear warm-up over 20 steps, then a cosine decay to 0
        self.assertEqual(lrs, [model.SFT_LR * min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps))
                               for s in range(steps)])
        ids, mask = task.sft_heldout_ids, task.sft_heldout_mask
        ce = -logps_of(m, ids, mask).double().sum().item() / mask[:, 1:].sum().item()
        self.assertAlmostEqual(model.sft_ce(m, ids, mask), ce, places=4)
        on_mps = mock.Mock(cpu=lambda: torch.tensor([-3.0, -5.0]),
                           double=mock.Mock(side_effect=AssertionError("float64 on the device: MPS has none")))
        with mock.patch.object(model, "sequence_logps_all", return_value=(on_mps, torch.tensor([2.0, 2.0]))):
            self.assertAlmostEqual(model.sft_ce(None, None, None), 8.0 / 4.0)


class TestFrozenCopy(unittest.TestCase):
    def test_a_copy_that_never_trains(self):
        m = sharp_gpt(15).train()
        ref = model.frozen_copy(m)
        grads = lambda net: {p.requires_grad for p in net.parameters()}
        self.assertEqual((ref.training, m.training, grads(ref), grads(m)), (False, True, {False}, {True}))
        with torch.no_grad():
            next(m.parameters()).add_(1.0)
        self.assertFalse(torch.equal(next(m.parameters()), next(ref.parameters())))   # not shared


class TestTablePolicy(unittest.TestCase):
    """model.TablePolicy: a distribution over listed responses that the GPT's code path reads unchanged."""

    def setUp(self):
        self.ex, g = data.ExactTask(), torch.Generator().manual_seed(0)
        self.table = self.ex.table(torch.softmax(2 * torch.randn(self.ex.n, generator=g, dtype=torch.float64), 0))
        self.listed = lambda index: data.join(self.ex.prompts.expand(len(index), -1), self.ex.responses[index])

    def test_sequence_and_pair_logps_telescope_to_the_table(self):
        ex, table = self.ex, self.table
        ids, mask = self.listed(torch.arange(ex.n))
        logps, lengths = model.sequence_logps(table, ids, mask)
        want = table.logits.detach() - torch.logsumexp(table.logits.detach(), 0)      # theta_y - logsumexp(theta)
        torch.testing.assert_close(logps.double(), want, atol=2e-5, rtol=0)
        torch.testing.assert_close((table.log_probs().detach(), table.probs()), (want, want.exp()))
        self.assertEqual(lengths.tolist(), (ex.words + 1).float().tolist())           # |y|: words and EOS
        torch.testing.assert_close(model.sequence_logps(table, F.pad(ids, (0, 6)), F.pad(mask, (0, 6)))[0], logps)
        chosen, rejected, _ = ex.population_pairs()
        pc, pr, lc, lr = model.pair_logps(table, *self.listed(chosen), *self.listed(rejected))
        torch.testing.assert_close((pc.double(), pr.double()), (want[chosen], want[rejected]), atol=2e-5, rtol=0)
        self.assertEqual(lc.tolist(), (ex.words[chosen] + 1).float().tolist())
        # d/dtheta of sum_y log pi(y) = 1 - C pi: the gradient flows through forward like through log_softmax
        logps.sum().backward()
        torch.testing.assert_close(table.logits.grad, 1 - ex.n * table.probs(), atol=1e-4, rtol=0)
        # a response off the list has no mass
        off = responses_of("great plot lovely cast", "great plot lovely", "great plot")   # the last one is listed
        logps, _ = model.sequence_logps(table, *data.join(ex.prompts.expand(3, -1), off))
        self.assertTrue(logps[0].item() < -600 and logps[1].item() < -600)      # log 1e-300 for the token off the list
        self.assertAlmostEqual(logps[2].item(), want[ex.texts.index("great plot")].item(), places=4)

    def test_model_sample_draws_from_the_table(self):
        n, p = 6000, self.table.probs()
        sample = lambda rows, **kw: model.sample(self.table, self.ex.prompts.expand(rows, -1), data.MAX_RESPONSE,
                                                 data.EOS_ID, data.BANNED_IN_RESPONSE, **kw)
        index = self.ex.index_of(sample(n, generator=torch.Generator().manual_seed(3), use_cache=False))
        self.assertTrue((index >= 0).all())                        # every sample is a listed review
        freq = torch.bincount(index, minlength=self.ex.n).double() / n
        self.assertTrue(((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-3).all(), (freq - p).abs().max())
        self.assertRaises((AssertionError, AttributeError), sample, 2)   # no key/value cache: use_cache=False


class TestMinimise(unittest.TestCase):
    def test_newton_finds_known_minima(self):
        x, target = nn.Parameter(torch.zeros(3, dtype=torch.float64)), torch.tensor([1.0, -2.0, 0.5]).double()
        scale = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
        # an ill-conditioned quadratic: Newton's first step lands on its minimum
        self.assertLess(model.minimise(x, lambda: ((x - target) ** 2 * scale).sum(), max_iter=1), 1e-15)
        torch.testing.assert_close(x.detach(), target)
        # cross-entropy to p: softmax(theta) = p at the minimum, a singular H along theta + c; the loss is H(p)
        p = torch.tensor([0.5, 0.3, 0.2 - 1e-12, 1e-12], dtype=torch.float64)
        theta, one = (nn.Parameter(torch.zeros(4, dtype=torch.float64)) for _ in range(2))
        loss = model.minimise(theta, lambda: -(p * torch.log_softmax(theta, 0)).sum())
        self.assertLess((torch.softmax(theta.detach(), 0) - p).abs().max().item(), 1e-10)
        self.assertAlmostEqual(loss, -(p * p.log()).sum().item(), places=12)
        self.assertEqual(loss, -(p * torch.log_softmax(theta, 0)).sum().item())   # the loss where it leaves theta
        # max_iter bounds the work: one Newton step is not enough here
        self.assertGreater(model.minimise(one, lambda: -(p * torch.log_softmax(one, 0)).sum(), max_iter=1), loss + 1e-6)


# ====================================================================================================
# data.py: vocabulary, the judge, the task, evaluation, summaries and charts, the exact task, the commands
# ====================================================================================================

EXAMPLE_A = "the acting was great and the music superb"   # the docstring's worked example
EXAMPLE_B = "a dull plot but lovely cast"
# a terminal of that encoding for the charts (data.glyphs reads sys.stdout's encoding)
terminal = lambda encoding: contextlib.redirect_stdout(io.TextIOWrapper(io.BytesIO(), encoding=encoding))


class TestVocabulary(unittest.TestCase):
    def test_encode_decode_round_trip(self):
        ids = data.encode(EXAMPLE_A) + [data.EOS_ID, data.PAD_ID, data.PAD_ID]
        self.assertEqual((data.decode(ids), data.decode(torch.tensor(ids))), (EXAMPLE_A, EXAMPLE_A))
        prompt = [data.BOS_ID] + data.encode("new horror film") + [data.SEP_ID]
        self.assertEqual(data.decode(prompt), "new horror film")


class TestScore(unittest.TestCase):
    def test_worked_example_word_counts_and_length(self):
        # a: 8 words, 2 positive, 0 negative; b: 6 words, 1 and 1; c: 3 words, 0 and 2; the prompt changes nothing
        reviews = (EXAMPLE_A, EXAMPLE_B, "terrible boring script")
        scores = [round(data.score("classic comedy film", r), 6) for r in reviews]
        self.assertEqual(scores, [round(2 / 8, 6), 0.0, round(-2 / 3, 6)])
        self.assertEqual(data.score("new horror film", EXAMPLE_A), data.score("old war sequel", EXAMPLE_A))
        task, pos, neg = small_task(seed=7), set(data.POSITIVE), set(data.NEGATIVE)
        for side in ("chosen", "rejected"):      # score_responses and response_lengths against counting words
            for row, s in zip(task.pairs[f"{side}_ids"], task.pairs[f"{side}_score"]):
                words = data.decode(row[data.PROMPT_LEN:]).split()
                want = (sum(w in pos for w in words) - sum(w in neg for w in words)) / len(words)
                self.assertAlmostEqual(s.item(), want, places=6)
                self.assertEqual(data.response_lengths(row[None, data.PROMPT_LEN:]).item(), len(words))
        # length alone does not raise the score: twice as long, neutral filler (padding: the padded rows above)
        base = data.score("", EXAMPLE_A)
        self.assertAlmostEqual(data.score("", EXAMPLE_A + " " + EXAMPLE_A), base, places=6)
        self.assertLess(data.score("", EXAMPLE_A + " the plot and the story"), base)
        self.assertLessEqual(data.score("", "great " + " ".join(["the"] * 15)), data.score("", "great"))
        self.assertEqual(data.score_responses(torch.tensor([[data.EOS_ID, 0]])).item(), -1.0)   # an empty review


class TestOracle(unittest.TestCase):
    def test_bradley_terry_symmetry_direction_and_worked_example(self):
        prob = lambda a, b, tau: data.judge_prob(a, b, data.TaskConfig(tau=tau))   # Bradley-Terry on the score
        rng = np.random.default_rng(0)
        a, b = (data._random_responses(rng, 200, 0.5, 0.0) for _ in range(2))
        sa, sb = data.score_responses(a), data.score_responses(b)
        for tau in (0.05, 0.2, 1.0):
            torch.testing.assert_close(prob(a, b, tau) + prob(b, a, tau), torch.ones(200), rtol=0, atol=1e-6)
            self.assertTrue(torch.equal(prob(a, b, tau) > 0.5, sa > sb))
        self.assertEqual(prob(a[:1], a[:1], 0.2).item(), 0.5)
        better, worse = responses_of("great plot"), responses_of("the plot")
        self.assertGreater(prob(better, worse, 0.1).item(), prob(better, worse, 0.5).item())   # sharper
        self.assertAlmostEqual(data.oracle("classic comedy film", EXAMPLE_A, EXAMPLE_B), sig(0.25 / 0.2), places=6)


class TestCyclicJudge(unittest.TestCase):
    def test_schools_and_the_circle(self):
        cases = [("great plot", 0), ("the acting and cast was dull", 1), ("music scenes and the plot", 2),
                 ("plot acting", data.NO_SCHOOL), ("great fun", data.NO_SCHOOL), ("the story and the ending", 0),
                 ("characters characters plot", 1)]        # the school is the nouns a review uses most
        self.assertEqual(data.school_of(responses_of(*[c[0] for c in cases])).tolist(), [c[1] for c in cases])
        self.assertTrue(all(w in data.NEUTRAL for words in data.SCHOOL_WORDS for w in words.split()))   # no score
        p, s = 0.9, torch.tensor([0, 1, 2, data.NO_SCHOOL])
        prefs = data.cyclic_preference_prob(s[:, None], s[None, :], p)           # [4, 4]
        torch.testing.assert_close((prefs + prefs.T, prefs.diagonal()),           # constant-sum, ties with itself
                                   (torch.ones(4, 4, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64)))
        for i in range(3):          # story > acting > craft > story, and any school beats none
            self.assertEqual((prefs[i, (i + 1) % 3].item(), prefs[i, 3].item()), (p, p))
        # no reward can represent it: Bradley-Terry log-odds around any cycle add up to 0, these to 3 logit(p)
        cycle = lambda m: sum(math.log(m[a, b] / m[b, a]) for a, b in ((0, 1), (1, 2), (2, 0)))
        self.assertAlmostEqual(cycle(prefs), 3 * math.log(p / (1 - p)), places=9)
        reviews = responses_of("great plot", "dull plot", "great fun plot")            # Bradley-Terry: no cycle
        bradley_terry = data.judge_prob(reviews[:, None], reviews[None], data.TaskConfig())
        self.assertAlmostEqual(cycle(bradley_terry), 0.0, places=4)


class TestJudgeProb(unittest.TestCase):
    def test_the_one_judge_of_every_preference(self):
        a = responses_of("great plot and lovely story", "dull music")
        b = responses_of("the acting", "the story was fun")
        cfg = data.TaskConfig(tau=0.5, length_bias=0.1)     # scores 2/5 and -1/2 against 0 and 1/4; 5, 2 words vs 2, 4
        quality, got = [sig((0.4 - 0.0) / 0.5), sig((-0.5 - 0.25) / 0.5)], data.judge_prob(a, b, cfg)
        self.assertEqual(got.dtype, torch.float32)          # the evaluation's: quality only
        torch.testing.assert_close(got, torch.tensor(quality))
        torch.testing.assert_close(data.judge_prob(a, b, cfg, cfg.length_bias, torch.float64),   # the raters'
                                   torch.tensor([sig(0.8 + 0.1 * 3), sig(-1.5 + 0.1 * -2)], dtype=torch.float64))
        self.assertAlmostEqual(data.win_rate(a, b, cfg), sum(quality) / 2, places=6)
        torch.testing.assert_close(data.judge_prob(a, b, data.TaskConfig(judge="cyclic"), dtype=torch.float64),
                                   torch.tensor([0.9, 0.9], dtype=torch.float64))    # story > acting, craft > story


class TestExploitability(unittest.TestCase):
    def test_zero_exactly_at_the_equilibrium(self):
        p, s, g = 0.9, torch.arange(3), torch.Generator().manual_seed(0)
        v = lambda *x: torch.tensor(x, dtype=torch.float64)
        prefs = data.cyclic_preference_prob(s[:, None], s[None, :], p)
        # the SFT table's shares, by hand: craft beats them with 0.1/2 + 0.6 p + 0.3 (1 - p) = 0.62
        for shares, want in ((v(1 / 3, 1 / 3, 1 / 3), 0.0), ([0.6, 0.3, 0.1], 0.62 - 0.5), ([1.0, 0.0, 0.0], p - 0.5)):
            self.assertAlmostEqual(data.exploitability(shares, prefs), want, places=12)
        for _ in range(50):      # a constant-sum game: never below 0; above 0 away from the equilibrium
            self.assertGreater(data.exploitability(torch.softmax(torch.randn(3, generator=g), 0), prefs), 1e-4)
        # from school shares (story, acting, craft, none); a review with no school loses to all
        self.assertAlmostEqual(data.school_exploitability(v(1 / 3, 1 / 3, 1 / 3, 0.0)), 0.0, places=12)
        self.assertAlmostEqual(data.school_exploitability(v(0.6, 0.3, 0.1, 0.0)), 0.12, places=12)
        self.assertGreater(data.school_exploitability(v(0.3, 0.3, 0.3, 0.1)), 0.0)
        reviews = responses_of("great plot", "the cast", "music", "fun", "plot acting")
        torch.testing.assert_close(data.school_shares(reviews), v(0.2, 0.2, 0.2, 0.4))


class TestTask(unittest.TestCase):
    def test_reproducible_and_heldout_prompts_disjoint(self):
        tensors = lambda task: [task.train_prompts, task.heldout_prompts, task.sft_ids, task.sft_mask,
                                task.sft_heldout_ids, task.sft_heldout_mask, *task.pairs.values(),
                                *task.heldout_pairs.values()]
        a, b, c = (tensors(small_task(seed=s)) for s in (3, 3, 4))
        self.assertTrue(all(torch.equal(x, y) for x, y in zip(a, b)))
        self.assertFalse(any(torch.equal(a[i], c[i]) for i in (0, 2, 6)))
        task, P, rows = small_task(seed=8), data.PROMPT_LEN, lambda t: {tuple(r.tolist()) for r in t}
        train, held = rows(task.train_prompts), rows(task.heldout_prompts)
        self.assertEqual(len(train & held), 0)
        self.assertEqual(len(train) + len(held), len(data.DECADES) * len(data.GENRES) * len(data.NOUNS))
        for ids, pool in ((task.sft_ids, train), (task.pairs["chosen_ids"], train), (task.sft_heldout_ids, held),
                          (task.heldout_pairs["chosen_ids"], held), (task.eval_prompts(50), held)):
            self.assertLessEqual(rows(ids[:, :P]), pool)
        self.assertEqual(len(rows(task.eval_prompts(500))), len(held))           # cycling through all of them
        self.assertTrue(torch.equal(task.pairs["chosen_ids"][:, :P], task.pairs["rejected_ids"][:, :P]))

    def test_labels_are_sampled_from_the_oracle(self):
        """The better review is chosen at the oracle's rate, mean sigmoid(|s_a - s_b|/tau): not always nor at chance."""
        task = data.Task(data.TaskConfig(n_demos=8, n_pairs=3000, n_heldout=8), seed=9)
        cs, rs = task.pairs["chosen_score"].double(), task.pairs["rejected_score"].double()
        differ = cs != rs
        observed = (cs[differ] > rs[differ]).double().mean().item()
        expected = torch.sigmoid((cs[differ] - rs[differ]).abs() / task.config.tau).mean().item()
        self.assertLess(abs(observed - expected), 5 * math.sqrt(expected * (1 - expected) / differ.sum().item()))
        self.assertLess(observed, 0.97)

    def test_length_bias_and_pair_style_knobs(self):
        words = lambda ids: data.response_lengths(ids[:, data.PROMPT_LEN:]).double()
        config = lambda n_demos, n_pairs, **kw: data.TaskConfig(n_demos=n_demos, n_pairs=n_pairs, n_heldout=8, **kw)
        plain, biased = (data.Task(config(8, 2000, length_bias=b), seed=10).pairs for b in (0.0, 0.5))
        gap = lambda p: (words(p["chosen_ids"]) - words(p["rejected_ids"])).mean().item()
        self.assertGreater(words(biased["chosen_ids"]).mean().item(), words(plain["chosen_ids"]).mean().item() + 1.0)
        self.assertTrue(gap(biased) > 2.0 and abs(gap(plain)) < 1.0)     # unbiased raters: no systematic length gap
        style = torch.as_tensor(data.STYLE_IDS)
        share = lambda ids: (torch.isin(ids[:, data.PROMPT_LEN:], style).sum() / words(ids).sum()).item()
        plain, styled = (data.Task(config(500, 1000, pair_style=s), seed=11) for s in (0.0, 1.0))
        self.assertEqual((share(plain.pairs["chosen_ids"]), share(styled.sft_ids)), (0.0, 0.0))   # SFT: its own style
        self.assertGreater(min(share(styled.pairs["chosen_ids"]), share(styled.pairs["rejected_ids"])), 0.05)
        for row, s in zip(styled.pairs["chosen_ids"][:50], styled.pairs["chosen_score"][:50]):   # the judge: no style
            self.assertAlmostEqual(data.score("", data.decode(row[data.PROMPT_LEN:])), s.item(), places=6)

    def test_the_cyclic_task(self):
        task = data.Task(data.TaskConfig(judge="cyclic", n_demos=3000, n_pairs=3000, n_heldout=8), seed=0)
        responses = task.sft_ids[:, data.PROMPT_LEN:]              # every demonstration has a school, in unequal shares
        self.assertTrue((data.school_of(responses) >= 0).all())
        shares = data.school_shares(responses).tolist()
        self.assertTrue(all(abs(got - want) < 0.03 for got, want in zip(shares, (0.6, 0.3, 0.1, 0.0))), shares)
        # the same reviews as the Bradley-Terry task draws, but for the nouns: lengths unchanged
        rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
        plain = data._random_responses(rng_a, 200, 0.5, 0.0)
        schooled = data._with_schools(rng_b, data._random_responses(rng_b, 200, 0.5, 0.0), (1, 1, 1))
        self.assertTrue(torch.equal(data.response_lengths(plain), data.response_lengths(schooled)))
        nouns = torch.as_tensor(np.isin(plain.numpy(), [data.STOI[w] for s in data.SCHOOL_WORDS for w in s.split()]))
        self.assertTrue(((plain != schooled).sum(1) <= nouns.sum(1) + 1).all())    # only nouns and one more word change
        # the pairs are labelled by the cyclic oracle
        chosen, rejected = (data.school_of(task.pairs[f"{s}_ids"][:, data.PROMPT_LEN:]) for s in ("chosen", "rejected"))
        count = lambda w, l: ((chosen == w) & (rejected == l)).sum().item()
        n = count(0, 1) + count(1, 0)
        self.assertGreater(n, 500)
        self.assertAlmostEqual(count(0, 1) / n, 0.9, delta=4 * math.sqrt(0.09 / n))   # story beats acting 0.9
        self.assertGreater(count(2, 0), count(0, 2))                                  # craft beats story


class TestStartRun(unittest.TestCase):
    def test_builds_the_task_and_sft_model_the_flags_ask_for(self):
        d = scratch("start_run")
        args = dpo.parser.parse_args(["--device", "cpu", "--tau", "0.3", "--length-bias", "0.2", "--pair-style", "0.5",
                                      "--seed", "3", "--sft-steps", "2", "--out", os.path.join(d, "out"), "--sft-dir",
                                      os.path.join(d, "sft"), "--n-layer", "1", "--n-embd", "16", "--lr", "0.02"])
        with quietly():
            device, task, policy, info = data.start_run(args)
            want = data.Task(data.TaskConfig(tau=0.3, length_bias=0.2, pair_style=0.5), seed=3)
            # the same settings straight to the cache: a hit (same weights) iff start_run trained these settings
            with mock.patch.object(model, "Adam", side_effect=AssertionError("not the cached SFT model")):
                again, cached = model.sft_model(want, CPU, args.sft_dir, 3, 2, model.GPTConfig(n_layer=1, n_embd=16))
        self.assertEqual((device, task.config, info["steps"], info["path"]), (CPU, want.config, 2, cached["path"]))
        self.assertTrue(all(torch.equal(getattr(task, k), getattr(want, k)) for k in ("sft_ids", "heldout_prompts")))
        self.assertTrue(all(torch.equal(task.pairs[k], want.pairs[k]) for k in task.pairs))
        self.assertTrue(same_weights(policy, again))
        self.assertEqual(os.listdir(d), ["sft"])     # the output folder is proved writable, not made, before the run


class TestJoin(unittest.TestCase):
    def test_masks_the_response_and_its_eos_only(self):
        prompt = torch.tensor([[data.BOS_ID] + data.encode("new horror film") + [data.SEP_ID]] * 2)
        responses = responses_of("great acting", "the plot was dull and boring")   # 2 and 6 words, then EOS
        ids, mask = data.join(prompt, responses)
        self.assertEqual(mask.tolist(), [[0] * 5 + [1] * 3 + [0] * 14, [0] * 5 + [1] * 7 + [0] * 10])   # EOS, no prompt
        self.assertTrue(torch.equal(ids[:, data.PROMPT_LEN:], responses))


class TestPairBatch(unittest.TestCase):
    def test_trims_only_padding_and_keeps_pairs_sides_and_order(self):
        task, m, idx = small_task(seed=6), sharp_gpt(4), torch.arange(6)
        batch, full = data.pair_batch(task.pairs, idx, CPU), task.pairs
        for side in ("chosen", "rejected"):
            width = batch[f"{side}_ids"].shape[1]
            self.assertTrue(all(torch.equal(batch[f"{side}_{part}"], full[f"{side}_{part}"][idx, :width])
                                for part in ("ids", "mask")))                    # the same rows, sides and order
            self.assertTrue((full[f"{side}_ids"][idx, width:] == data.PAD_ID).all())     # only PAD dropped
            self.assertTrue((batch[f"{side}_ids"][:, -1] != data.PAD_ID).any())          # and no more
        sides = [full[f"{side}_{part}"] for side in ("chosen", "rejected") for part in ("ids", "mask")]
        want = (logps_of(m, *sides[:2]), logps_of(m, *sides[2:]), sides[1][:, 1:].sum(1).float(),
                sides[3][:, 1:].sum(1).float())
        torch.testing.assert_close(data.pair_logps_all(m, full, CPU, batch_size=5), want, rtol=0, atol=1e-4)   # by 5


class TestEvaluate(unittest.TestCase):
    """data.heldout_reviews, win_rate, evaluate_sft and evaluate, with models whose answers are known."""

    def both(self, policy, sft_model, task, n, seed):
        side = data.evaluate_sft(sft_model, task, CPU, n, seed)
        return side, data.evaluate(policy, sft_model, side, task, CPU, n, seed)

    def test_which_way_round_and_the_kl(self):
        """Reviews scoring +1 against -1: sigmoid(2 / tau) one way round; one word of 16 against one of 32: KL log 2."""
        for tau in (0.2, 1.0):
            task = small_task(seed=20, tau=tau)
            _, r = self.both(POSITIVE_WRITER, NEGATIVE_WRITER, task, 64, 3)
            self.assertAlmostEqual(r["win_rate_vs_sft"], sig(2 / tau), places=5, msg="P(policy > SFT review), tau")
            self.assertEqual((r["score"], r["sft_score"], r["length"], r["sft_win_rate_vs_sft"]), (1.0, -1.0, 1.0, 0.5))
            self.assertTrue(r["sft_length"] > 2.0 and r["kl_to_sft"] > 100.0)   # ~4 words; it writes no positive ones
            _, r = self.both(NEGATIVE_WRITER, POSITIVE_WRITER, task, 64, 3)
            self.assertAlmostEqual(r["win_rate_vs_sft"], sig(-2 / tau), places=5)
        task, g = small_task(seed=21), torch.Generator().manual_seed(0)
        kl = lambda a, b, n=64: self.both(a, b, task, n, 4)[1]["kl_to_sft"]
        self.assertAlmostEqual(kl(POSITIVE_WRITER, EITHER_WRITER), math.log(2), places=5)
        self.assertGreater(kl(EITHER_WRITER, POSITIVE_WRITER), 1e6)   # negative words the SFT model never writes
        allowed = [i for i in range(len(data.VOCAB)) if i not in data.BANNED_IN_RESPONSE]

        def writer():   # a random writer: it samples what it scores (none of the banned tokens), a few words
            first, rest = (torch.full((len(data.VOCAB),), IMPOSSIBLE) for _ in range(2))
            first[allowed], rest[allowed] = (torch.randn(len(allowed), generator=g) * 2 for _ in range(2))
            first[data.EOS_ID], rest[data.EOS_ID] = IMPOSSIBLE, 3.0
            return Bigram(first, rest)
        a, b = writer(), writer()
        self.assertGreater(min(kl(a, b, 128), kl(b, a, 128)), 1.0)   # positive both ways round
        self.assertEqual(kl(a, a), 0.0)

    def test_which_samples_go_where(self):
        """The SFT model samples at seeds 10_000 + seed (its own) and 10_001 + seed (the policy's rival), the policy at
        10_000 + seed, on held-out prompts; win rates and KL recomputed from those samples."""
        task, policy, sft_model, seed, n = small_task(seed=24), sharp_gpt(32), sharp_gpt(33), 5, 40
        with Spy(data, "sample", lambda a: a["generator"].initial_seed()) as spy:
            side, r = self.both(policy, sft_model, task, n, seed)
        self.assertEqual([(c.a["model"], c.before) for c in spy.calls],
                         [(sft_model, 10_000 + seed), (sft_model, 10_001 + seed), (policy, 10_000 + seed)])
        self.assertTrue(all(torch.equal(c.a["prompts"], task.eval_prompts(n)) for c in spy.calls))   # held-out prompts
        own, reviews, samples = (c.result for c in spy.calls)
        self.assertTrue(torch.equal(r["sft_samples"], reviews) and torch.equal(r["samples"], samples))
        score = data.score_responses
        win = lambda a, b: torch.sigmoid((score(a) - score(b)) / task.config.tau).mean().item()
        self.assertAlmostEqual(side["sft_win_rate_vs_sft"], win(own, reviews), places=6)
        self.assertAlmostEqual(r["win_rate_vs_sft"], win(samples, reviews), places=6)
        self.assertAlmostEqual(r["sft_score"], score(reviews).mean().item(), places=6)
        ids, mask = data.join(task.eval_prompts(n), samples)
        kl = (logps_of(policy, ids, mask) - logps_of(sft_model, ids, mask)).mean().item()
        self.assertAlmostEqual(r["kl_to_sft"], kl, places=4)
        self.assertNotEqual(r["kl_to_sft"], 0.0)

    def test_the_sft_side_and_the_game(self):
        """sft_win_rate_vs_sft is measured (not 1/2 by fiat) on the reviews every policy meets; cyclic: the game."""
        task = small_task(seed=25)
        side, itself = self.both(EITHER_WRITER, EITHER_WRITER, task, 64, 3)   # its reviews score +1 or -1
        self.assertEqual(itself["win_rate_vs_sft"], side["sft_win_rate_vs_sft"])
        self.assertTrue(side["sft_win_rate_vs_sft"] != 0.5 and abs(side["sft_win_rate_vs_sft"] - 0.5) < 0.15)
        r = data.evaluate(POSITIVE_WRITER, EITHER_WRITER, side, task, CPU, 64, 3)
        self.assertEqual(r["sft_win_rate_vs_sft"], side["sft_win_rate_vs_sft"])
        side, r = self.both(sharp_gpt(1), sharp_gpt(2), small_task(seed=26, judge="cyclic"), 32, 3)
        schools = data.school_of(r["samples"]), data.school_of(r["sft_samples"])
        self.assertAlmostEqual(r["win_rate_vs_sft"], data.cyclic_preference_prob(*schools).mean().item(), places=6)
        for prefix, samples in (("", r["samples"]), ("sft_", r["sft_samples"])):
            shares = data.school_shares(samples)
            self.assertEqual(r[f"{prefix}school_shares"], shares.tolist())
            self.assertAlmostEqual(r[f"{prefix}exploitability"], data.school_exploitability(shares), places=12)


class TestPairLogRow(unittest.TestCase):
    def test_puts_each_number_under_its_name(self):
        row = data.pair_log_row(7, t(0.25), t(1.0, -2.0, 3.0, 0.5), t(0.0, -1.0, 1.0, 0.5), t(-3.0, -5.0),
                                t(-8.0, -10.0))
        self.assertEqual((row["step"], row["loss"], row["logps/chosen"], row["logps/rejected"]), (7, 0.25, -4.0, -9.0))
        for key, want in (("rewards/chosen", 2.5 / 4), ("rewards/rejected", 0.5 / 4), ("rewards/margins", 2.0 / 4),
                          ("rewards/accuracies", 2 / 4)):   # 1 > 0, 3 > 1; -2 < -1; a tie is not
            self.assertAlmostEqual(row[key], want, msg=key)


class TestRankingMetrics(unittest.TestCase):
    def test_constructed_cases_and_ties(self):
        cr, ones, four = t(1.0, 2.0, 3.0, 4.0), torch.ones(4), lambda x: torch.full((4,), x)
        cases = [  # rewards (chosen, rejected), log-probs (chosen, rejected), lengths: accuracy, agreement
            # reward: y_w first T F T F; average log-likelihood T F F F: agreement 3/4 (summed, F F F F: 2/4)
            (cr, t(0.0, 3.0, 2.0, 5.0), t(-8.0, -8.0, -6.0, -4.0), t(-4.0, -3.0, -2.0, -1.0), t(8.0, 4.0, 3.0, 2.0),
             t(2.0, 3.0, 2.0, 1.0), 2 / 4, 3 / 4),
            # length decides: -4 over 4 tokens beats -3 over 1 token on average (summed it would lose); TTTF vs TTTT
            (cr, t(0.0, 1.0, 2.0, 5.0), four(-4.0), four(-3.0), four(4.0), ones, 3 / 4, 3 / 4),
            # one reward for every response (DPO's at pi_theta = pi_ref): right about no pair, agrees on ties only
            (four(0.0), four(0.0), t(-1.0, -5.0, -2.0, -3.0), t(-2.0, -1.0, -2.0, -9.0), ones, ones, 0.0, 1 / 4)]
        for *args, accuracy, agreement in cases:
            m = data.ranking_metrics(*args)
            self.assertEqual((m["reward_accuracy"], m["ranking_agreement"]), (accuracy, agreement))


class TestPrintSummary(unittest.TestCase):
    def table(self, note=None, **more):
        empty = torch.zeros(4, 3, dtype=torch.long)
        metrics = {"sft_score": -0.25, "sft_length": 9.5, "sft_win_rate_vs_sft": 0.486, "win_rate_vs_sft": 0.93,
                   "score": 0.7, "length": 6.5, "kl_to_sft": 4.25, "reward_accuracy": 0.8, "ranking_agreement": 0.85,
                   "seconds_per_step": 0.05, "peak_memory_mb": 48.0, "samples": empty, "sft_samples": empty,
                   "prompts": torch.zeros(4, data.PROMPT_LEN, dtype=torch.long), "wall_seconds": 6.54,
                   "startup_seconds": 2.5, "train_seconds": 3.0, "eval_seconds": 1.0, **more}
        with quietly() as (out, _):
            data.print_summary("DPO", metrics, ZERO_RANKING, "out/x", note)
        text = out.getvalue()
        return {line.split("  ")[0]: line.split()[-2:] for line in text.split("\n\nHeld-out")[0].splitlines()[2:]}, text

    def test_the_sft_column_as_measured_beside_the_policy(self):
        rows, text = self.table()
        self.assertEqual(text.splitlines()[0].split(), ["SFT", "DPO"])
        self.assertEqual(rows, {"win rate vs SFT": ["0.486", "0.930"], "score (judge)": ["-0.250", "+0.700"],
                                "length (words)": ["9.50", "6.50"], "KL to SFT (nats)": ["0.00", "4.25"],
                                "reward accuracy": ["0.000", "0.800"], "ranking agreement": ["0.000", "0.850"],
                                "seconds per step": ["-", "0.0500"], "peak memory (MB)": ["-", "48.00"]})
        self.assertNotIn("SFT column", text)        # the SFT model against itself; costs it never paid: "-"
        self.assertEqual(text.splitlines()[-1], "win rate vs SFT 0.930 | reward accuracy 0.800 | "
                         "ranking agreement 0.850 | 6.5 s (start-up 2.5, training 3.0, evaluation 1.0) | wrote out/x/")
        text = self.table(note="beta log pi_theta/pi_ref")[1]
        note = " ".join(text[text.index("SFT column"):].split())
        self.assertIn("beta log pi_theta/pi_ref is 0 for every response", note)
        rows, text = self.table(exploitability=0.2, sft_exploitability=0.12, school_shares=[0.5, 0.2, 0.2, 0.1],
                                sft_school_shares=[0.6, 0.3, 0.1, 0.0])
        self.assertEqual(rows["exploitability"], ["0.120", "0.200"])
        self.assertIn("SFT 0.60 / 0.30 / 0.10 / 0.00, DPO 0.50 / 0.20 / 0.20 / 0.10", text)


class TestChart(unittest.TestCase):
    """data.chart (one chart function: a series, or several on one scale), data.frame, data.glyphs, data.scatter."""

    def rows(self, lines, height, ch="█"):
        """The row (0: the top) of each column's highest `ch` or "*", and the grid."""
        grid = [line.split("│", 1)[1] for line in lines[1:1 + height]]
        return [next(r for r, row in enumerate(grid) if row[c] in (ch, "*")) for c in range(len(grid[0]))], grid

    def test_one_series(self):
        with terminal("utf-8"):
            rising = data.chart(list(range(12)), "rising", width=60, height=4)
            many = data.chart([x * x for x in range(200)], "t", width=20, height=3)
            falling = data.chart(list(range(10, 0, -1)), "falling", width=60, height=2)
        r = self.rows(rising, 4)[0]
        self.assertTrue(len(r) == 12 and all(a >= b for a, b in zip(r, r[1:])) and (r[0], r[-1]) == (3, 0), r)
        self.assertEqual(rising[0], "rising  (12 values; min 0, max 11)")
        # more values than columns: averaged into `width` columns, still rising; the title gives the data's range
        r = self.rows(many, 3)[0]
        self.assertTrue(len(r) == 20 and all(a >= b for a, b in zip(r, r[1:])) and r[0] > r[-1], r)
        self.assertIn(f"(200 values in 20 columns of means; min 0, max {199 ** 2:.3g})", many[0])
        self.assertEqual((self.rows(falling, 2)[0], falling[-1]), ([0] * 5 + [1] * 5, " " * 10 + "└" + "─" * 10))
        self.assertEqual(data.chart([], "empty"), ["empty: (no data)"])

    def test_several_series_ascii_and_scatter(self):
        with terminal("utf-8"):
            lines = data.chart([("w", "falls slowly", [0.0, -1.0, -2.0, -3.0]),
                                ("l", "falls fast", [0.0, -3.0, -6.0, -9.0])], "t", width=60, height=10)
            shares = data.chart([("s", "story", [1.0, 0.5]), ("a", "acting", [0.0, 0.5]), ("c", "craft", [0.0, 0.0])],
                                "t", height=3, lo=0.0, hi=1.0)
            points = data.scatter([("A:low", 0.0, 0.0), ("B:high", 4.0, 1.0), ("C:mid", 2.0, 0.5)], "KL", "score",
                                  width=41, height=11)
            self.assertEqual(data.glyphs(), ("█", "│", "└", "─"))
        self.assertEqual([self.rows(lines, 10, ch)[0] for ch in "lw"], [[0, 3, 6, 9], [0, 1, 2, 3]])   # a row a nat
        self.assertEqual(self.rows(lines, 10, "w")[1][0][0], "*")            # both start at 0, the top: they meet
        self.assertEqual(lines[0], "t  (8 values; min -9, max 0; w falls slowly; l falls fast)")
        grid = self.rows(shares, 3, "s")[1]                                   # lo and hi fixed: shares 0 to 1
        self.assertEqual((grid[0][0], grid[2][0], grid[1][1], grid[2][1]), ("s", "*", "*", "c"))
        grid = [line.split("│", 1)[1] for line in points[1:12]]             # the scatter's rows, top = highest score
        self.assertEqual({ch: next((r, row.index(ch)) for r, row in enumerate(grid) if ch in row) for ch in "ABC"},
                         {"B": (0, 40), "C": (5, 20), "A": (10, 0)})          # score 1, 0.5, 0; KL 4, 2, 0
        self.assertTrue(any(line.strip().startswith("B = high") for line in points))
        with terminal("ascii"):                                 # a terminal, no Unicode
            self.assertEqual(data.glyphs(), ("#", "|", "+", "-"))
            self.assertTrue(all(line.isascii() for line in data.chart([1.0, 2.0], "t")))


class TestExactTask(unittest.TestCase):
    """data.ExactTask: 27 listed reviews, the SFT table, the judge's full matrix, the pairs, the closed forms."""

    @classmethod
    def setUpClass(cls):
        cls.ex, cls.cyclic = data.ExactTask(), data.ExactTask(data.TaskConfig(judge="cyclic"))

    def test_the_listed_reviews(self):
        ex, f64 = self.ex, torch.float64
        self.assertEqual((ex.n, len(set(ex.texts)), ex.best().sum().item()), (27, 27, 9))   # best: score +0.5, 3 x 3
        cells = {(s, sc, w) for s, sc, w in zip(ex.schools.tolist(), ex.scores.tolist(), ex.words.tolist())}
        self.assertEqual(cells, {(s, sc, w) for s in range(3) for sc in (0.5, 0.0, -0.5) for w in (2, 4, 6)})
        torch.testing.assert_close(ex.index_of(ex.responses), torch.arange(27))
        index = ex.index_of(responses_of("great plot lovely", "great plot")).tolist()
        self.assertEqual(index, [-1, ex.texts.index("great plot")])
        torch.testing.assert_close(ex.school_shares(ex.sft_probs), torch.tensor([0.6, 0.3, 0.1], dtype=f64))
        torch.testing.assert_close(ex.prefs + ex.prefs.T, torch.ones(27, 27, dtype=f64))
        self.assertAlmostEqual(ex.mean_words(ex.sft_probs), 2 * 0.5 + 4 * 0.3 + 6 * 0.2, places=12)
        torch.testing.assert_close((ex.table().probs(), ex.win_rates(ex.sft_probs)),
                                   (ex.sft_probs, ex.prefs @ ex.sft_probs))
        biased = data.ExactTask(data.TaskConfig(length_bias=0.3))   # the raters' length bias: in matrix and reward
        a, b = ex.texts.index("great plot lovely story"), ex.texts.index("great plot")    # same score, 2 words longer
        self.assertAlmostEqual(biased.prefs[a, b].item(), sig(0.3 * 2), places=12)
        self.assertAlmostEqual((biased.reward[a] - biased.reward[b]).item(), 0.3 * 2, places=12)
        self.assertTrue(torch.equal(biased.best(), ex.best()))                  # the judge's best: the score's

    def test_population_and_sampled_pairs(self):
        ex = self.ex
        chosen, rejected, weights = ex.population_pairs()
        self.assertAlmostEqual(weights.sum().item(), 1.0, places=12)
        self.assertFalse((chosen == rejected).any())
        # one entry by hand: "great plot" chosen over "the plot": 2 pi pi P / (1 - sum pi^2)
        w, l, no_ties = ex.texts.index("great plot"), ex.texts.index("the plot"), 1 - (ex.sft_probs ** 2).sum()
        self.assertAlmostEqual(weights[(chosen == w) & (rejected == l)].item(),
                               2 * 0.075 * 0.15 * sig(0.5 / 0.2) / no_ties.item(), places=12)
        c, r, sw = ex.sampled_pairs(200_000, seed=1)     # many sampled pairs approach the population weights
        self.assertAlmostEqual(sw.sum().item(), 1.0, places=12)
        sampled = torch.zeros(27, 27, dtype=torch.float64).index_put_((c, r), sw).fill_diagonal_(0)
        population = torch.zeros(27, 27, dtype=torch.float64).index_put_((chosen, rejected), weights)
        self.assertLess((sampled / no_ties - population).abs().max().item(), 3e-3)
        uniform = data.ExactTask(data.TaskConfig(judge="cyclic", pair_schools="uniform"))   # --pair-schools uniform
        torch.testing.assert_close((uniform.school_shares(uniform.pair_probs), uniform.sft_probs),
                                   (torch.full((3,), 1 / 3, dtype=torch.float64), self.cyclic.sft_probs))

    def test_closed_forms_and_exploitability(self):
        ex, g = self.ex, torch.Generator().manual_seed(0)
        a, b = ex.texts.index("great plot"), ex.texts.index("the acting and cast")
        for beta in (0.5, 2.0):       # [DPO-opt]: pi*(a)/pi*(b) = pi_ref(a)/pi_ref(b) exp((s_a - s_b)/(tau beta))
            pi_star = ex.dpo_optimum(beta)
            self.assertAlmostEqual(pi_star.sum().item(), 1.0, places=12)
            want = 0.075 / 0.045 * math.exp(0.5 / (0.2 * beta))
            self.assertAlmostEqual((pi_star[a] / pi_star[b]).item(), want, places=9)
        self.assertIsNone(self.cyclic.reward)                  # no reward under the cyclic judge: no pi*
        self.assertRaises(TypeError, self.cyclic.dpo_optimum, 1.0)
        pi = ex.simpo_optimum_gamma0(2.0)               # SimPO, gamma 0: (beta/|y|) log pi(y) = r(y) + one constant
        shift = 2.0 * pi.log() / (ex.words.double() + 1) - ex.reward
        self.assertTrue(abs(pi.sum().item() - 1) < 1e-12 and (shift - shift[0]).abs().max().item() < 1e-9)
        inside = torch.rand(ex.n, generator=g, dtype=torch.float64)   # shares 1/3: an equilibrium, whatever inside
        for i in range(3):
            inside[ex.schools == i] /= 3 * inside[ex.schools == i].sum()
        self.assertAlmostEqual(self.cyclic.exploitability(inside), 0.0, places=12)
        self.assertAlmostEqual(self.cyclic.exploitability(ex.sft_probs), 0.12, places=12)
        # under Bradley-Terry the best review is the equilibrium: a point mass on it cannot be exploited
        self.assertAlmostEqual(ex.exploitability(torch.eye(ex.n, dtype=torch.float64)[0]), 0.0, places=12)
        self.assertGreater(ex.exploitability(ex.sft_probs), 0.1)


def refused(test, command, *fragments):
    """python data.py command... in this process: exit 2 and one line on stderr, `error: ...`, holding each fragment."""
    code, _, err = run_main(data, command)
    lines = err.strip().splitlines()
    test.assertEqual((code, len(lines)), (2, 1), err)
    test.assertTrue(lines[0].startswith("error: ") and all(f in lines[0] for f in fragments), (lines[0], fragments))


class TestFrontier(unittest.TestCase):
    """python data.py frontier DIR...: score against KL for finished runs, or one line per folder that is not one."""

    def test_plots_finished_runs_and_refuses_what_is_not_one(self):
        good, d = {"method": "dpo", "beta": 0.1, "kl_to_sft": 1.5, "score": 0.4, "sft_score": 0.0}, scratch("frontier")
        cases = {"a_list": ("[]", "kl_to_sft is null"), "a_number": ("3", "kl_to_sft is null"),
                 "kl_null": ({**good, "kl_to_sft": None}, "kl_to_sft is null"),
                 "kl_nan": ({**good, "kl_to_sft": math.nan}, "kl_to_sft is NaN"),
                 "kl_text": ({**good, "kl_to_sft": "3"}, 'kl_to_sft is "3"'),
                 "no_score": ({k: v for k, v in good.items() if k != "score"}, "score is null"),
                 "not_json": ("{", "no readable metrics.json (JSONDecodeError)"),
                 "run_a": (good, None), "run_b": ({**good, "kl_to_sft": 3.0, "score": 0.8}, None)}
        for name, (content, fragment) in cases.items():
            os.makedirs(os.path.join(d, name))
            text = content if isinstance(content, str) else json.dumps(content)
            pathlib.Path(d, name, "metrics.json").write_text(text)
            if fragment:
                refused(self, ["frontier", os.path.join(d, name)], name, fragment)
        code, out, err = run_main(data, ["frontier", *(os.path.join(d, n) for n in cases)])   # all at once
        bad = sum(fragment is not None for _, fragment in cases.values())
        self.assertEqual((code, out, len(err.strip().splitlines())), (2, "", bad))   # no chart from a partial set
        code, out, err = run_main(data, ["frontier", os.path.join(d, "run_a"), os.path.join(d, "run_b")])
        self.assertEqual(code, 0, err)
        for line in ("B = run_b (dpo, beta 0.1): KL(policy || SFT) 3.00, score 0.800",
                     "S = the SFT model: KL(policy || SFT) 0.00, score 0.000"):
            self.assertIn(line, out)
        refused(self, ["frontier"], "frontier takes some run folder(s), got 0")


class TestSampleCommand(unittest.TestCase):
    """python data.py sample DIR: reviews from a trained model, the judge's score beside each."""

    def test_prints_scored_reviews_or_says_why_not(self):
        run_dir, d = gpt_run("dpo").dir, scratch("sample")
        code, out, err = run_main(data, ["sample", run_dir, "--prompt", "new horror film", "-n", "5"])
        lines = out.strip().splitlines()
        self.assertEqual((code, len(lines)), (0, 6), err)
        for line in lines[:5]:                              # "[+0.25] review text": the judge's score of the text
            self.assertEqual((line[0], line[6:8], line[1:6]), ("[", "] ", f"{data.score('', line[8:]):+.2f}"))
        self.assertIn("ignore the prompt", lines[5])
        self.assertEqual(run_main(data, ["sample", run_dir, "-n", "5"])[1], out)          # seeded: the same again
        self.assertNotEqual(run_main(data, ["sample", run_dir, "-n", "5", "--seed", "1"])[1], out)
        self.assertEqual(run_main(data, ["sample", run_dir, "-n", "3"])[1].splitlines()[:3], lines[:3])   # the first 3
        for prompt in ("new horrror film", "new horror"):
            refused(self, ["sample", run_dir, "--prompt", prompt], f"got {prompt!r}", "genres: horror comedy")
        refused(self, ["sample"], "sample takes 1 run folder(s), got 0")
        path, foreign = os.path.join(d, "model.pt"), io.BytesIO()
        refused(self, ["sample", d], path, "no such file")
        torch.save({"weights": torch.zeros(2)}, foreign)
        for content in (b"not a checkpoint", pathlib.Path(run_dir, "model.pt").read_bytes()[:1000], foreign.getvalue()):
            pathlib.Path(path).write_bytes(content)
            refused(self, ["sample", d], f"cannot load checkpoint {path!r}")


class TestCurves(unittest.TestCase):
    """python data.py curves DIR --key KEY: any key of a run's log.jsonl, per step."""

    def test_redraws_any_key_or_says_why_not(self):
        run_dir, d = gpt_run("dpo").dir, scratch("curves")
        values = [r["logps/chosen"] for r in read_json(run_dir, "log.jsonl")]
        code, out, err = run_main(data, ["curves", run_dir, "--key", "logps/chosen", "--key", "loss"])
        self.assertEqual(code, 0, err)
        self.assertEqual(out.splitlines()[0], f"logps/chosen per step ({run_dir})  (3 values; min {min(values):.3g}, "
                                              f"max {max(values):.3g})")
        self.assertIn(f"loss per step ({run_dir})", out)
        self.assertIn(f"logps/chosen: first {values[0]:.4g}, last {values[-1]:.4g}, mean of the last 1 value "
                      f"{values[-1]:.4g}", out)
        refused(self, ["curves", run_dir, "--key", "logp/chosen"], "no numbers under 'logp/chosen'",
                "logps/chosen, logps/rejected, loss")
        refused(self, ["curves", d], "no readable log.jsonl (FileNotFoundError)")
        for content, words in (("", "no numbers under 'loss' (a run with --steps 0?)"),
                               ('{"loss": 1.0}\n{"loss": \n', "no readable log.jsonl (JSONDecodeError)")):
            pathlib.Path(d, "log.jsonl").write_text(content)
            refused(self, ["curves", d], words)


class TestDisplacement(unittest.TestCase):
    """python data.py logps DIR (data.displacement): where a trained policy put its probability mass."""

    def test_the_command_measures_the_runs_policy_against_its_sft_model(self):
        run, small, real = gpt_run("dpo"), small_task(seed=3), data.displacement
        on_small = lambda policy, sft_model, task, seed: real(policy, sft_model, small, seed, n_samples=16)
        with mock.patch.object(data, "displacement", side_effect=on_small) as measure:   # the real measure, small task
            code, out, err = run_main(data, ["logps", run.dir])
        self.assertEqual(code, 0, err)
        (call,) = measure.call_args_list
        policy, sft_model, task, seed = call.args
        self.assertTrue(same_weights(policy, run.trained) and same_weights(sft_model, run.sft))   # the run's SFT cache
        self.assertTrue(seed == SEED and all(torch.equal(task.pairs[k], run.task.pairs[k]) for k in task.pairs))
        table = {line[:28].strip(): line[28:].split() for line in out.splitlines()[3:]}
        self.assertEqual(table, {name: [f"{a:.2f}", f"{b:.2f}", f"{b - a:+.2f}"]
                                 for name, a, b in real(policy, sft_model, small, SEED, 16)})
        self.assertEqual(list(table), ["chosen y_w, training pairs", "rejected y_l, training pairs",
                                       "the policy's own samples", "the SFT model's samples",
                                       "5 positive words, in no pair"])
        # each row is a plain mean of summed log-probs; against itself, no change
        rows = real(policy, sft_model, small, 0, 16)
        self.assertAlmostEqual(rows[0][1], data.pair_logps_all(sft_model, small.pairs, CPU)[0].mean().item(), places=4)
        self.assertAlmostEqual(rows[1][2], data.pair_logps_all(policy, small.pairs, CPU)[1].mean().item(), places=4)
        self.assertNotEqual(rows[0][2], rows[0][1])             # the policy moved
        self.assertTrue(all(abs(a - b) < 1e-4 for _, a, b in real(sft_model, sft_model, small, 0, 16)))


# ====================================================================================================
# dpo.py: the training run (3 steps, beta 0.5, a learning rate that moves the policy), --precompute-ref, --exact
# ====================================================================================================

class TestDpoScript(ScriptChecks, unittest.TestCase):
    run_name, title, reward_scale = "dpo", "DPO", 0.5

    def test_every_step_is_the_dpo_loss_of_its_batch(self):
        """Each step's dpo_loss gets its batch's log-probs (policy then, SFT reference), --beta; ln 2 at step 0 only."""
        losses = [c for c in self.r.spy["dpo_loss"].calls if len(c.a["policy_chosen_logps"]) == 8]   # not held-out
        self.assertEqual(len(losses), 3)
        for step, (batch_call, loss_call) in enumerate(zip(self.r.spy["pair_batch"].by("main"), losses)):
            (a_w, a_l), a = self.step_log_ratios(step, batch_call, loss_call), loss_call.a
            self.assertEqual((a["policy_chosen_logps"].requires_grad, a["ref_chosen_logps"].requires_grad, a["beta"]),
                             (True, False, 0.5))
            self.assertAlmostEqual(self.r.log[step]["loss"], (-F.logsigmoid(0.5 * (a_w - a_l))).mean().item(), places=4)
        first = self.r.log[0]                   # step 0: pi_theta = pi_ref; were the reference the policy, always
        self.assertEqual((round(first["loss"], 6), first["rewards/chosen"], first["rewards/rejected"]),
                         (round(math.log(2), 6), 0.0, 0.0))
        for row in self.r.log[1:]:
            self.assertGreater(abs(row["loss"] - math.log(2)), 1e-3, f"step {row['step']}: loss still ln 2")
            self.assertTrue(row["rewards/chosen"] != 0.0 and row["rewards/margins"] != 0.0)


class TestPrecomputeRef(unittest.TestCase):
    """dpo.py --precompute-ref: log pi_ref of every pair once, before the loop, and the same numbers."""

    def test_same_numbers_and_no_reference_pass_in_the_loop(self):
        plain, pre = gpt_run("dpo"), gpt_run("dpo_precompute")
        for ra, rb in zip(plain.log, pre.log):      # every step's loss, rewards and log-probs, to rounding
            self.assertEqual(ra.keys(), rb.keys())
            for key in ra:
                self.assertAlmostEqual(ra[key], rb[key], delta=1e-5 * max(1.0, abs(ra[key])), msg=(ra["step"], key))
        ma, mb = plain.metrics, pre.metrics
        self.assertEqual((ma["precompute_ref"], mb["precompute_ref"], ma["ref_precompute_seconds"]),
                         (False, True, None))
        self.assertGreaterEqual(mb["ref_precompute_seconds"], 0.0)
        self.assertEqual(ma.keys(), mb.keys())
        for key in ma.keys() - TIMING_KEYS - {"precompute_ref"}:
            if isinstance(ma[key], float):
                self.assertAlmostEqual(ma[key], mb[key], delta=1e-4 * max(1.0, abs(ma[key])), msg=key)
            else:
                self.assertEqual(ma[key], mb[key], key)
        frozen = lambda m: not any(p.requires_grad for p in m.parameters())
        for run, in_loop, whole_set in ((plain, 3, 0), (pre, 0, 1)):     # one per step, or once up front
            self.assertEqual(sum(frozen(c.a["model"]) for c in run.spy["pair_logps"].by("main")), in_loop)
            up_front = [c for c in run.spy["pair_logps_all"].calls if c.a["pairs"] is run.task.pairs]
            self.assertEqual(sum(frozen(c.a["model"]) for c in up_front), whole_set)

    def test_refused_with_reference_free(self):
        d = scratch("refused")
        code, _, err = run_main(dpo, TINY + ["--precompute-ref", "--reference-free", "--out", os.path.join(d, "o"),
                                             "--sft-dir", os.path.join(d, "sft")])
        self.assertEqual((code, os.listdir(d)), (2, []))            # refused before any folder was made
        self.assertIn("--precompute-ref with --reference-free", err)


class TestDpoExact(unittest.TestCase):
    """python dpo.py --exact: [DPO-opt] and [IPO-4.2] on the table, and DPO on cyclic labels."""

    def test_population_minimum_is_pi_star_and_beta_matters_only_with_noisy_labels(self):
        (m, files), ex, f64 = exact_run(dpo), data.ExactTask(), torch.float64
        self.assertEqual(files, ["metrics.json"])                # a table: no model.pt
        self.assertEqual((m["method"], m["exact"], m["judge"], m["beta"], m["seed"]), ("dpo", True, "bt", 1.0, 0))
        self.assertLess(m["kl_to_optimum"], 1e-6)                        # goal: 1e-3
        pi_star = ex.sft_probs * torch.exp(ex.scores / (0.2 * 1.0))     # pi* by hand: pi_ref exp(s / (tau beta)) / Z
        pi_star, pi, best = pi_star / pi_star.sum(), torch.tensor(m["policy_probs"], dtype=f64), ex.best()
        self.assertLess(data.kl(pi, pi_star), 1e-6)
        self.assertAlmostEqual(m["best_mass"], m["best_mass_optimum"], places=6)
        for key, want in (("best_mass_optimum", pi_star[best].sum().item()), ("best_mass", pi[best].sum().item()),
                          ("exploitability", ex.exploitability(pi)), ("mean_words", ex.mean_words(pi))):
            self.assertAlmostEqual(m[key], want, places=12, msg=key)
        self.assertEqual(m["responses"], ex.texts)
        # finite data: the n_pairs pairs sampled with --seed, fitted the same way: farther, not far
        finite = dpo.fit_exact(ex, ex.sampled_pairs(m["n_pairs"], 0), 1.0, dpo.EXACT_DEFAULTS["steps"])
        self.assertAlmostEqual(m["kl_to_optimum_finite_data"], data.kl(finite, pi_star), places=9)
        self.assertTrue(100 * m["kl_to_optimum"] < m["kl_to_optimum_finite_data"] < 0.1)
        # [IPO-4.2]: the best reviews' mass under noisy labels, for each beta, against its optimum by hand
        self.assertEqual(m["ipo_betas"], list(dpo.IPO_BETAS))
        for beta, trained, optimum in zip(m["ipo_betas"], m["best_mass_noisy"], m["best_mass_noisy_optimum"]):
            ref = torch.tensor([0.25, 0.5, 0.25], dtype=f64)     # the SFT table's mass by score level
            weight = ref * torch.exp(torch.tensor([0.5, 0.0, -0.5], dtype=f64) / (0.2 * beta))
            self.assertAlmostEqual(optimum, (weight[0] / weight.sum()).item(), places=9)
            self.assertAlmostEqual(trained, optimum, places=5)
        noisy = m["best_mass_noisy"]
        self.assertTrue(all(a > b for a, b in zip(noisy, noisy[1:])) and noisy[-1] < 0.5)   # larger beta: nearer pi_ref
        self.assertTrue(all(d > 0.999 for d in m["best_mass_deterministic"]), m["best_mass_deterministic"])

    def test_cyclic_labels_are_fit_with_a_line(self):
        (m, _), ex = exact_run(dpo, "--judge", "cyclic"), data.ExactTask(data.TaskConfig(judge="cyclic"))
        self.assertNotIn("kl_to_optimum", m)                             # no reward, no pi*
        pi = torch.tensor(m["policy_probs"], dtype=torch.float64)
        self.assertAlmostEqual(m["exploitability"], ex.exploitability(pi), places=12)
        self.assertEqual(m["school_shares"], ex.school_shares(pi).tolist())
        # DPO's implicit reward beta log pi/pi_ref: one number per school, three different ones: a line, exploited
        reward = m["beta"] * (pi / ex.sft_probs).log()
        per_school = [reward[ex.schools == i] for i in range(3)]
        self.assertLess(max((r - r[0]).abs().max().item() for r in per_school), 1e-6)
        self.assertGreater(min(abs(a[0] - b[0]).item() for a, b in itertools.combinations(per_school, 2)), 0.1)
        self.assertGreater(m["exploitability"], max(m["exploitability_sft"], 0.2))
        # pairs meeting every school equally: by symmetry one reward for the three, and DPO keeps pi_ref's shares
        ex = data.ExactTask(data.TaskConfig(judge="cyclic", pair_schools="uniform"))
        torch.testing.assert_close(ex.school_shares(dpo.fit_exact(ex, ex.population_pairs(), 1.0, 300)),
                                   ex.school_shares(ex.sft_probs), atol=1e-6, rtol=0)


# ====================================================================================================
# simpo.py: the run (--judge cyclic, 3 steps, beta 3, gamma 0.6), a first run (own SFT model, size), --exact
# ====================================================================================================

class TestSimpoScript(ScriptChecks, unittest.TestCase):
    run_name, title = "simpo", "SimPO"

    def simpo_losses(self, m, b, length_norm=True):
        pc, pr = (logps_of(m, b[f"{side}_ids"], b[f"{side}_mask"]) for side in ("chosen", "rejected"))
        lc, lr = (b[f"{side}_mask"][:, 1:].sum(1).float() if length_norm else 1 for side in ("chosen", "rejected"))
        return -F.logsigmoid(3.0 * pc / lc - 3.0 * pr / lr - 0.6)     # --beta 3 --gamma 0.6

    def test_every_step_is_the_simpo_loss_of_its_batch(self):
        """Each step's simpo_loss gets its batch's summed log-probs and |y|, --beta and --gamma [SimPO-4]."""
        losses = [c for c in self.r.spy["simpo_loss"].calls if len(c.a["policy_chosen_logps"]) == 8]  # not held-out
        self.assertEqual(len(losses), 3)
        for step, (batch_call, loss_call) in enumerate(zip(self.r.spy["pair_batch"].by("main"), losses)):
            b, a, current = batch_call.result, loss_call.a, with_weights(batch_call.before)
            self.assertEqual((a["beta"], a["gamma"]), (3.0, 0.6))
            for side in ("chosen", "rejected"):
                self.assertTrue(torch.equal(a[f"{side}_lengths"], b[f"{side}_mask"][:, 1:].sum(1).float()))
            want = logps_of(current, b["chosen_ids"], b["chosen_mask"])
            torch.testing.assert_close(a["policy_chosen_logps"].detach(), want, rtol=0, atol=1e-3)
            self.assertAlmostEqual(self.r.log[step]["loss"], self.simpo_losses(current, b).mean().item(), places=4)

    def test_no_length_norm_sums_the_log_probs(self):
        """--no-length-norm: the first step's loss is [SimPO-4] with |y| = 1 (and not the normalised one)."""
        small = gpt_run("simpo_small")
        b, loss = small.spy["pair_batch"].by("main")[0].result, small.log[0]["loss"]
        self.assertAlmostEqual(loss, self.simpo_losses(small.sft, b, length_norm=False).mean().item(), places=3)
        self.assertNotAlmostEqual(loss, self.simpo_losses(small.sft, b).mean().item(), places=2)
        self.assertFalse(small.metrics["length_norm"])

    def test_the_sft_side_is_measured_before_training_and_one_gpt_is_built(self):
        """No reference model: the SFT side is measured before training; KL: the SFT weights by functional_call."""
        spy = self.r.spy
        (side,) = spy["evaluate_sft"].calls
        first_step = min(c.start for c in spy["memory_sample"].calls)
        self.assertTrue(side.a["sft"] is self.r.policy and side.end < first_step)
        self.assertEqual(len([c for c in spy["pair_logps_all"].calls if c.end < first_step]), 1)   # held-out rewards
        self.assertEqual((self.r.gpts, gpt_run("simpo_small").gpts), (1, 1))   # the SFT model, loaded or trained, IS
        self.assertGreater(gpt_run("dpo").gpts, 1)                  # the policy; DPO keeps a reference copy
        self.assertTrue(model.GPT.__init__.__name__ == "__init__" and "__setstate__" not in vars(model.GPT))   # undone

    def sft_column(self):
        """The SFT model's own SimPO reward: right where its average log-likelihood puts y_w first, agreeing always."""
        pc, pr, lc, lr = data.pair_logps_all(self.sft, self.r.task.heldout_pairs, CPU)
        return {"reward_accuracy": (pc / lc > pr / lr).float().mean().item(), "ranking_agreement": 1.0}


class TestSimpoExact(unittest.TestCase):
    """python simpo.py --exact: one end whatever the start, and what 1/|y| does to it."""

    def test_where_simpo_ends(self):
        (m, files), ex = exact_run(simpo), data.ExactTask()
        pi = torch.tensor(m["policy_probs"], dtype=torch.float64)
        self.assertEqual((files, m["method"], m["beta"], m["gamma"], m["length_norm"]),
                         (["metrics.json"], "simpo", 2.0, 1.0, True))
        self.assertLess(max(m["start_gap"], m["kl_to_closed_form_gamma0"]), 1e-8)    # one end, whatever the start
        # reviews that differ only in length: mass falls with length (equal reward per token)
        for school in range(3):
            best = pi[(ex.schools == school) & ex.best()]                # 2, 4 and 6 words, in order
            self.assertTrue(best[0] > best[1] > best[2], best)
        # without 1/|y| the loss cannot tell the lengths apart: equal mass, mean length 4 words exactly
        self.assertAlmostEqual(m["mean_words_length_norm_off"], 4.0, places=6)
        self.assertLess(m["mean_words"], m["mean_words_sft"])
        self.assertAlmostEqual(m["mean_words"], ex.mean_words(pi), places=12)
        # the judge ignores schools and SimPO has no pi_ref: the SFT table's 0.6 / 0.3 / 0.1 is forgotten
        self.assertTrue(all(abs(share - 1 / 3) < 1e-6 for share in m["school_shares"]), m["school_shares"])
        # so the end is at least as far from DPO's pi* (which keeps pi_ref's shares) as the school shares are
        optimum = ex.dpo_optimum(simpo.DPO_EXACT_BETA)
        marginal = data.kl(torch.tensor(m["school_shares"]), ex.school_shares(optimum))
        self.assertGreater(marginal, 0.2)
        self.assertGreaterEqual(m["kl_to_dpo_optimum"], marginal - 1e-9)
        self.assertAlmostEqual(m["kl_to_dpo_optimum"], data.kl(pi, optimum), places=12)


# ====================================================================================================
# sppo.py: the hard-label loss, one self-play iteration, the average of the iterates, the runs, --exact
# ====================================================================================================

class TestSppoHardLoss(unittest.TestCase):
    def test_the_two_squares(self):
        g = torch.Generator().manual_seed(0)
        pc, pr, rc, rr = (-torch.rand(6, generator=g) * 30 for _ in range(4))
        a_w, a_l = (pc - rc).tolist(), (pr - rr).tolist()
        for eta in (0.1, 2.0, 20.0):
            # TRL's sppo_hard (beta = 1/eta) is this sum; the official trainer halves it (Adam does not care)
            want = [(w - eta / 2) ** 2 + (l + eta / 2) ** 2 for w, l in zip(a_w, a_l)]
            torch.testing.assert_close(sppo.sppo_hard_loss(pc, pr, rc, rr, eta), torch.tensor(want), msg=f"eta {eta}")


class TestSelfPlayIteration(unittest.TestCase):
    """sppo.self_play_iteration: pi_t frozen, K samples per prompt, win rates within a prompt, [SPPO-6] fitted."""

    def play(self, policy, prompts, log_rows, k=3, eta=8.0, config=None, steps=3, batch_size=8, lr=1e-2):
        with quietly():
            return sppo.self_play_iteration(policy, prompts, iteration=1, k=k, eta=eta, steps=steps,
                                            config=config or data.TaskConfig(tau=0.3), batch_size=batch_size, lr=lr,
                                            device=CPU, sampler=torch.Generator().manual_seed(0),
                                            batch_order=torch.Generator().manual_seed(0), log_rows=log_rows)

    def test_pi_t_frozen_k_samples_per_prompt_and_each_win_rate_on_its_own_sample(self):
        prompts, log_rows = small_task(seed=29).train_prompts[:6], []
        torch.manual_seed(1)
        policy = model.GPT(SMALL)      # untrained: reviews of every quality, so the win rates vary
        before = weights(policy)
        with Spy(sppo, "sample") as draws, Spy(sppo, "trim") as batches, Spy(sppo, "sppo_loss") as losses:
            pi_t, stats = self.play(policy, prompts, log_rows)
        self.assertTrue(not any(p.requires_grad for p in pi_t.parameters()) and not pi_t.training)
        self.assertTrue(same_weights(pi_t, before))       # pi_t is the policy as it was, untouched
        self.assertFalse(same_weights(policy, before))    # pi_theta moved (so pi_t is not the policy itself)
        (draw,) = draws.calls
        self.assertIs(draw.a["model"], pi_t)              # the samples are pi_t's
        self.assertEqual([(r["step"], r["iteration"]) for r in log_rows], [(0, 1), (1, 1), (2, 1)])
        self.assertTrue(all(math.isfinite(r["loss"]) for r in log_rows))
        self.assertEqual(stats["samples"], 18)
        self.assertAlmostEqual(stats["win_prob_mean"], 0.5, places=5)
        self.assertEqual(log_rows[0]["logratios/mean"], 0.0)   # the first step fits a policy still equal to pi_t
        again, rows = with_weights(before), []                  # same seeds, same start: the same fit, bit for bit
        self.play(again, prompts, rows)
        self.assertTrue(rows == log_rows and same_weights(again, policy))
        # K = 3 samples per prompt; sample i's win rate [SPPO-5]: mean over ITS PROMPT's K of P(y_i > y_j), 1/2 self
        rows, scores = draw.a["prompts"], data.score_responses(draw.result)
        samples = rows_of(torch.cat([rows, draw.result], dim=1))      # prompt + response of each sample
        prompt_of = [tuple(r) for r in rows.tolist()]
        groups = {p: [j for j, q in enumerate(prompt_of) if q == p] for p in set(prompt_of)}
        self.assertEqual(set(groups), set(rows_of(prompts)))
        self.assertEqual(sorted(len(g) for g in groups.values()), [3] * 6)
        expected = torch.tensor([sum(0.5 if j == i else sig((scores[i] - scores[j]).item() / 0.3)
                                     for j in groups[prompt_of[i]]) / 3 for i in range(len(prompt_of))])
        win_prob = [c for c in losses.calls if len(c.a["win_prob"]) == 18][0].a["win_prob"]   # loss_before's
        for group in groups.values():
            self.assertAlmostEqual(win_prob[group].mean().item(), 0.5, places=5, msg="a prompt's K win rates: 1/2")
        self.assertGreater(win_prob.std().item(), 0.05)         # and they are not all 1/2
        torch.testing.assert_close(win_prob, expected, rtol=0, atol=1e-5)
        # and in every training batch: the row fitted, its target's win rate, its reference log-prob
        self.assertEqual(len(batches.calls), 3)
        for batch_call, loss_call in zip(batches.calls, losses.calls[:3]):
            ids, mask = batch_call.result
            want = [expected[samples.index(row)] for row in rows_of(ids)]
            torch.testing.assert_close(loss_call.a["win_prob"], torch.stack(want), rtol=0, atol=1e-5)
            torch.testing.assert_close(loss_call.a["ref_logps"], logps_of(pi_t, ids, mask), rtol=0, atol=1e-4)
            self.assertEqual(loss_call.a["eta"], 8.0)

    def test_fit_lowers_the_regression_loss(self):
        task = small_task(seed=0)
        torch.manual_seed(0)
        _, stats = self.play(model.GPT(SMALL), task.train_prompts[:8], [], k=2, eta=10.0, config=task.config,
                             steps=30, batch_size=16, lr=3e-3)
        # loss_before is (eta (P - 1/2))^2 averaged: the loss at pi_theta = pi_t
        self.assertTrue(stats["loss_before"] > 0.5 and stats["loss_after"] < 0.5 * stats["loss_before"], stats)


class TestSampleMixture(unittest.TestCase):
    def test_samples_each_iterate_equally_often(self):
        reviews, n = ["plot", "cast", "music"], 3000   # model i always writes review i: each sample says who drew it
        samples, pick = sppo.sample_mixture([writer_of(r) for r in reviews], small_task().eval_prompts(n),
                                            torch.Generator().manual_seed(0))
        for i, text in enumerate(reviews):
            self.assertAlmostEqual((pick == i).double().mean().item(), 1 / 3, delta=4 * math.sqrt(2 / 9 / n))
            self.assertTrue(all(data.decode(s) == text for s in samples[pick == i]))


class TestGameStats(unittest.TestCase):
    def test_the_average_of_the_iterates_on_held_out_prompts(self):
        """Three one-school iterates: their average plays each school a third of the time, whatever the last does."""
        task, iterates = small_task(judge="cyclic"), [writer_of(r) for r in ("plot", "cast", "music")]
        last = {"school_shares": [0.0, 0.0, 1.0, 0.0], "exploitability": 0.4}
        with Spy(sppo, "sample_mixture", lambda a: a["generator"].initial_seed()) as spy:
            stats = sppo.game_stats(iterates, last, task, CPU, 3000, 7)
        (call,) = spy.calls
        self.assertTrue(call.before == 20_000 + 7 and call.a["models"] is iterates)
        self.assertTrue(torch.equal(call.a["prompts"], task.eval_prompts(3000)))
        shares = data.school_shares(call.result[0])
        self.assertEqual(stats["school_shares_average"], shares.tolist())
        self.assertTrue(all(abs(s - 1 / 3) < 0.04 for s in shares[:3]), shares)
        self.assertLess(stats["exploitability_average"], 0.05)   # (its formula, and `last` passed on: TestSppoScript)


class TestSppoScript(ScriptChecks, unittest.TestCase):
    """sppo.py self-play under --judge cyclic: 2 iterations of 2 steps, K = 2, eta 10, tau 0.5 (not the defaults)."""
    run_name, title, log_keys, training_forwards = "sppo", "SPPO", ["loss", "logps/policy", "logps/ref"], 4
    reward_scale = 1 / 10.0     # the implicit reward (1/eta) log pi_theta/pi_sft

    def test_training_sees_training_pairs_only(self):
        self.assertEqual(self.r.spy["hard_fit"].calls, [])          # self-play: prompts, no pairs (held-out ones only)
        self.assertTrue(all(c.a["pairs"] is self.r.task.heldout_pairs for c in self.r.spy["pair_batch"].calls))

    def test_self_play_runs_on_the_training_prompts(self):
        """Each iteration samples K responses from pi_t per training prompt, with --k, --eta, the judge; pi_1 is SFT."""
        calls, run, m = self.r.spy["self_play_iteration"].calls, self.r, self.r.metrics
        self.assertEqual([c.a["iteration"] for c in calls], [1, 2])
        play = [c for c in run.spy["play_sample"].calls if c.caller != "sample_mixture"]
        for c in calls:
            a = c.a
            self.assertTrue(a["policy"] is run.policy and a["config"] is run.task.config)
            self.assertTrue(torch.equal(a["prompts"], run.task.train_prompts), "self-play must use task.train_prompts")
            self.assertEqual((a["k"], a["eta"], a["steps"], a["batch_size"], a["lr"], a["sampler"].initial_seed(),
                              a["batch_order"].initial_seed()), (2, 10.0, 2, 8, 1e-3, SEED, SEED))
            rows = torch.cat([p.a["prompts"] for p in play if p.a["model"] is c.result[0]])   # pi_t's: K per prompt
            self.assertTrue(torch.equal(rows, run.task.train_prompts.repeat_interleave(2, dim=0)))
        self.assertEqual((run.task.config.tau, run.task.config.judge), (0.5, "cyclic"))
        pi_1, pi_2 = (c.result[0] for c in calls)
        self.assertTrue(same_weights(pi_1, self.sft) and not same_weights(pi_2, self.sft))
        self.assertEqual([r["iteration"] for r in run.log], [1, 1, 2, 2])
        self.assertEqual((m["steps"], m["iterations"], m["k"], m["eta"], m["variant"]), (4, 2, 2, 10.0, "selfplay"))

    def test_each_iteration_against_the_one_before_and_the_average_of_the_iterates(self):
        """win_rate_vs_prev: pi_3 (seed 10_000 + seed) against pi_2 (10_001 + seed); each iteration's game: the average
        of pi_1 .. pi_{t+1} as a mixture (seed 20_000 + seed); the last iterate's numbers are the evaluation's."""
        run, m = self.r, self.r.metrics
        pis = [c.result[0] for c in run.spy["self_play_iteration"].calls][1:] + [run.trained]   # pi_2, pi_3
        (prev,) = run.spy["heldout_reviews"].by("main")
        self.assertEqual((prev.a["model"], prev.a["n_samples"], prev.a["seed"]), (pis[0], 16, SEED + 1))
        ours = data.heldout_reviews(run.trained, run.task, CPU, 16, SEED)[1]
        theirs = data.heldout_reviews(pis[0], run.task, CPU, 16, SEED + 1)[1]
        win = data.win_rate(ours, theirs, run.task.config)
        self.assertAlmostEqual(m["win_rate_vs_prev_per_iteration"][1], win, places=6)
        self.assertEqual(m["win_rate_vs_prev_per_iteration"][0], m["win_rate_vs_sft_per_iteration"][0])   # pi_1: SFT
        self.assertEqual(m["win_rate_vs_sft_per_iteration"][-1], m["win_rate_vs_sft"])
        calls, evaluations = run.spy["game_stats"].calls, run.spy["evaluate"].calls
        self.assertEqual(len(calls), 2)
        for t, call in enumerate(calls):
            iterates = call.before                           # the list as it was handed over: pi_1 .. pi_{t+1}
            self.assertEqual(len(iterates), t + 2)
            self.assertTrue(all(same_weights(got, want) for got, want in zip(iterates, [self.sft] + pis[:t + 1])))
            self.assertIs(call.a["result"], evaluations[t].result)
            self.assertEqual((call.a["n_samples"], call.a["seed"]), (16, SEED))
            seed = torch.Generator().manual_seed(20_000 + SEED)
            shares = data.school_shares(sppo.sample_mixture(iterates, run.task.eval_prompts(16), seed)[0])
            self.assertEqual(m["school_shares_average_per_iteration"][t], shares.tolist())
            self.assertAlmostEqual(m["exploitability_average"][t], data.school_exploitability(shares), places=12)
            self.assertEqual(m["school_shares_per_iteration"][t], evaluations[t].result["school_shares"])
            self.assertEqual(m["exploitability_last"][t], evaluations[t].result["exploitability"])


class TestHardFit(ScriptChecks, unittest.TestCase):
    """sppo.py --variant hard (sppo.hard_fit): [SPPO-9] on the offline pairs, pi_ref = the SFT model."""
    run_name, title, training_forwards, trains_on, reward_scale = "sppo_hard", "SPPO", 2, "hard_fit", 1 / 10.0

    def test_every_step_is_its_batch_against_the_sft_model(self):
        """Each step: the SFT model's log-probs of the batch as pi_ref, the policy's current, --eta; first eta^2/2."""
        (fit,) = self.r.spy["hard_fit"].calls
        self.assertTrue(fit.a["pairs"] is self.r.task.pairs and fit.a["policy"] is self.r.policy)
        self.assertTrue(fit.a["ref"] is not self.r.policy and same_weights(fit.a["ref"], self.sft))
        self.assertEqual((fit.a["eta"], fit.a["steps"], self.r.metrics["variant"], self.r.metrics["iterations"],
                          self.r.metrics["k"]), (10.0, 2, "hard", 1, None))
        batches, losses = self.r.spy["pair_batch"].by("hard_fit"), self.r.spy["sppo_hard_loss"].calls
        self.assertEqual((len(batches), len(losses)), (2, 2))
        for step, (bc, lc) in enumerate(zip(batches, losses)):
            a_w, a_l = self.step_log_ratios(step, bc, lc)
            self.assertEqual(lc.a["eta"], 10.0)
            want = ((a_w - 5.0) ** 2 + (a_l + 5.0) ** 2).mean().item()      # [SPPO-9], eta/2 = 5
            self.assertAlmostEqual(self.r.log[step]["loss"], want, places=3)
        first = self.r.log[0]      # TRL's names; policy = pi_ref: rewards 0, loss (0 - eta/2)^2 + (0 + eta/2)^2
        self.assertEqual((first["rewards/chosen"], first["rewards/rejected"], first["iteration"]), (0.0, 0.0, 1))
        self.assertAlmostEqual(first["loss"], 10.0 ** 2 / 2, places=3)


def mw_chain(ex, eta, iterations):
    """Multiplicative weights [SPPO-2] by hand, from the SFT table: pi_1, ..., pi_{T+1}."""
    chain = [ex.sft_probs]
    for _ in range(iterations):
        step = chain[-1] * torch.exp(eta * (ex.prefs @ chain[-1]))
        chain.append(step / step.sum())
    return chain


class TestSppoExact(unittest.TestCase):
    """python sppo.py --exact: [MW-exact], other fits, the game per iteration, [SPPO-Thm4.1] (cyclic: a process)."""

    @classmethod
    def setUpClass(cls):
        cls.bt, cls.files = exact_run(sppo, "--iterations", "6")
        cls.cyclic = script_process("sppo_exact").metrics()
        cls.runs = ((cls.bt, data.ExactTask()), (cls.cyclic, data.ExactTask(data.TaskConfig(judge="cyclic"))))

    def test_exact_log_z_fit_is_the_mw_step(self):
        """The exact-log-Z fit closes each MW step (within 1/1000 of not moving, or below 1e-13), along the MW chain."""
        c = self.cyclic
        self.assertEqual((self.files, c["eta"], c["iterations"], c["k"], c["seed"]), (["metrics.json"], 1.0, 40, 4, 0))
        for m, ex in self.runs:
            chain, fits = mw_chain(ex, m["eta"], m["iterations"]), m["mw_kl_exact_logz_per_iteration"]
            self.assertLess(m["mw_kl_exact_logz"], 1e-6)            # goal: 1e-4
            self.assertLess(data.kl(torch.tensor(m["policy_probs"]), chain[-1]), 1e-6)
            self.assertLess(data.kl(torch.tensor(m["average_probs"]), torch.stack(chain).mean(0)), 1e-6)
            for t, (fit, no_step) in enumerate(zip(fits, m["mw_kl_no_step"])):
                self.assertAlmostEqual(no_step, data.kl(chain[t], chain[t + 1]), delta=1e-9 * max(no_step, 1e-12))
                self.assertTrue(fit <= 1e-3 * no_step or fit < 1e-13, (m["judge"], t + 1, fit, no_step))
            self.assertEqual(m["mw_kl_exact_logz"], max(fits))
            ratio = max([f / n for f, n in zip(fits, m["mw_kl_no_step"]) if f >= 1e-13], default=0.0)
            self.assertAlmostEqual(m["mw_kl_ratio"], ratio, places=12)     # so <= 1e-3, by the loop above

    def test_the_game_numbers_of_every_iteration(self):
        """The last iterate and the average of pi_1 .. pi_{t+1} against the MW chain by hand, iteration by iteration."""
        for m, ex in self.runs:
            chain, best = mw_chain(ex, m["eta"], m["iterations"]), ex.best()
            self.assertAlmostEqual(m["exploitability_sft"], ex.exploitability(ex.sft_probs), places=12)
            self.assertAlmostEqual(m["best_mass_sft"], ex.sft_probs[best].sum().item(), places=12)
            for t in range(m["iterations"]):
                last, average = chain[t + 1], torch.stack(chain[:t + 2]).mean(0)
                got = [m["exploitability_last"][t], m["exploitability_average"][t], m["best_mass"][t],
                       *m["school_shares"][t], *m["school_shares_average"][t]]
                want = [ex.exploitability(last), ex.exploitability(average), last[best].sum().item(),
                        *ex.school_shares(last).tolist(), *ex.school_shares(average).tolist()]
                torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-6, rtol=0,
                                           msg=f"{m['judge']}, t {t + 1}")

    def test_half_and_sampled_fits_are_other_updates(self):
        """Iteration 1's eta/2 fit and K-sample fit (pi_1's draws with the run's seed), rebuilt here."""
        for m, _ in self.runs:
            self.assertEqual((len(m["mw_kl_half"]), len(m["mw_kl_k"])), (m["iterations"],) * 2)
            self.assertTrue(all(k > 1e-9 for k in m["mw_kl_half"][:5]))  # log Z != eta/2 away from equilibrium
            self.assertTrue(all(k > 1e-6 for k in m["mw_kl_k"][:5]))
        (m, ex), mw = self.runs[0], mw_chain(self.runs[0][1], self.bt["eta"], 1)[1]
        pi_1, eta, k = ex.table(), m["eta"], m["k"]
        half = sppo.fit_exact(ex, pi_1, torch.arange(ex.n), ex.prefs @ ex.sft_probs, ex.sft_probs, eta, 50)
        self.assertAlmostEqual(m["mw_kl_half"][0], data.kl(half, mw), delta=1e-6 * m["mw_kl_half"][0])
        prompts = ex.prompts.expand(sppo.EXACT_SAMPLE_PROMPTS * k, -1)
        draws = model.sample(pi_1, prompts, data.MAX_RESPONSE, data.EOS_ID, data.BANNED_IN_RESPONSE, use_cache=False,
                             generator=torch.Generator().manual_seed(m["seed"]), batch_size=prompts.shape[0])
        index = ex.index_of(draws).view(-1, k)                           # prompt i's K samples: rows i*K .. i*K+K-1
        prefs = ex.prefs[index[:, :, None], index[:, None, :]]
        win_k = (prefs.sum(-1) - prefs.diagonal(dim1=1, dim2=2) + 0.5) / k
        fit_k = sppo.fit_exact(ex, pi_1, index.view(-1), win_k.view(-1),
                               torch.full((index.numel(),), 1.0 / index.numel(), dtype=torch.float64), eta, 50)
        self.assertAlmostEqual(m["mw_kl_k"][0], data.kl(fit_k, mw), delta=1e-6 * m["mw_kl_k"][0])

    def test_bradley_terry_iterates_move_to_the_best(self):
        best, last = self.bt["best_mass"], self.bt["exploitability_last"]
        self.assertTrue(all(b > a for a, b in zip([self.bt["best_mass_sft"]] + best, best)), best)
        self.assertTrue(all(b < a for a, b in zip(last, last[1:])), last)

    def test_cyclic_last_iterate_circles_and_the_average_converges(self):
        m = self.cyclic
        last, average = m["exploitability_last"], m["exploitability_average"]
        self.assertEqual(len(last), 40)
        self.assertLessEqual(average[-1], 0.05)                          # goal: 0.05
        self.assertGreater(min(last[20:]), 0.1)                          # the last iterate never settles
        self.assertGreater(last[-1], m["exploitability_sft"])            # it spirals outward
        leaders = [max(range(3), key=lambda i: s[i]) for s in m["school_shares"]]
        self.assertGreaterEqual(sum(a != b for a, b in zip(leaders, leaders[1:])), 3)   # the leading school goes round
        self.assertGreater(min(last[20:]) - average[-1], 0.05)


# ====================================================================================================
# The run contract, students can skip: flags, devices, faults, output folder, checkpoints, SFT cache, memory, README
# ====================================================================================================

def exits(fn):
    """(the code of the SystemExit fn() ends in, what it wrote on stderr); it must end in one."""
    with quietly() as (_, err):
        try:
            fn()
        except SystemExit as e:
            return e.code, err.getvalue()
    raise AssertionError(f"no SystemExit; stderr: {err.getvalue()!r}")


class TestFlags(unittest.TestCase):
    def test_number_parsers_defaults_and_help(self):
        for parse, bad, good in [(model.positive_float, ["0", "-1", "abc", "nan", "inf", ""], [("0.5", 0.5)]),
                                 (model.positive_int, ["0", "-3", "1.5", "x"], [("7", 7)]),
                                 (model.bounded_int(0, 10), ["-1", "2.0", "11"], [("0", 0), ("10", 10)]),
                                 (model.nonneg_float, ["-0.1", "nan"], [("0", 0.0)])]:
            for text in bad:
                self.assertRaises(argparse.ArgumentTypeError, parse, text)
            self.assertEqual([parse(text) for text, _ in good], [value for _, value in good])
        self.assertRaisesRegex(argparse.ArgumentTypeError, r"^expected a whole number from 0 to 10, got '11'$",
                               model.bounded_int(0, 10), "11")
        for module in (dpo, simpo, sppo):
            args = module.parser.parse_args([])
            self.assertEqual((args.out, args.sft_dir, args.device, args.seed),
                             (f"out/{module.__name__}", "out/sft", "auto", 0))
            for action in module.parser._actions:      # every flag says what it does, and the optimiser's their default
                needs_default = action.dest in ("steps", "batch_size", "lr")
                self.assertTrue(action.help and ("default" in action.help or not needs_default), action.dest)
        self.assertEqual(simpo.parser.parse_args(["--seed", str(2**32 - 1)]).seed, 2**32 - 1)

    def test_bad_flags_exit_2_before_any_folder_is_made(self):
        d = scratch("flags")
        safe = ["--out", os.path.join(d, "out"), "--sft-dir", os.path.join(d, "sft"), "--device", "cpu", "--steps", "1",
                "--sft-steps", "1", "--eval-samples", "4", "--batch-size", "4"]
        # "FLAG VALUE": the last line names FLAG; ("FLAGS", words): it holds the words
        cases = {dpo: ["--beta -1", "--lr 0", "--steps -1", "--batch-size 0", "--lr abc", "--tau 0", "--tau nan",
                       "--tau inf", "--eval-samples 0", "--sft-steps 0", "--beta nan", f"--seed {2**64 - 1}",
                       "--judge linear", ("--eval-samples 1000000000", "65536")],
                 simpo: ["--gamma -1", "--beta 0", "--seed x", "--seed -2", "--pair-style 2", "--length-bias inf",
                         "--lr 1e400", "--device tpu", ("--batch-size 1000000000", "4096"), f"--seed {2**32}",
                         (f"--seed {2**64}", str(2**32 - 1)), "--n-layer 1000", "--n-embd 100000",
                         ("--n-embd 30 --n-head 4", "--n-embd (30) must be a multiple of --n-head (4)")],
                 sppo: [("--k 1000000000", "64"), "--eta 0", ("--k 1", "--k must be at least 2"), "--iterations abc"]}
        if not torch.cuda.is_available():
            cases[simpo].append(("--device cuda", "--device cuda, but this torch sees no CUDA device"))
        for module, flags in cases.items():
            for args, expect in (case if isinstance(case, tuple) else (case, case.split()[0]) for case in flags):
                code, _, err = run_main(module, safe + args.split())
                self.assertTrue(code == 2 and expect in err.strip().splitlines()[-1] and "Traceback" not in err,
                                (args, code, err))
        self.assertEqual(run_main(sppo, ["--exact", "--k", "1", "--out", os.path.join(d, "a", "b")])[0], 2)
        self.assertEqual(os.listdir(d), [])

    def test_model_size_flags_reach_the_checkpoint_and_key_the_cache(self):
        run = gpt_run("simpo_small")        # --n-layer 1 --n-head 4 --n-embd 32, its own SFT folder
        ckpt = torch.load(os.path.join(run.dir, "model.pt"), weights_only=True)
        self.assertEqual([ckpt["config"][k] for k in ("n_layer", "n_head", "n_embd")], [1, 4, 32])
        self.assertEqual((run.trained.config.n_head, len(run.trained.blocks)), (4, 1))
        self.assertEqual(model.model_config(simpo.parser.parse_args([])), model.GPTConfig())   # the default size
        self.assertNotEqual(os.path.basename(glob_one(run.sft_dir)), os.path.basename(glob_one(sft())))   # --n-head 2


class TestPickDevice(unittest.TestCase):
    def test_cuda_is_made_deterministic_and_the_gpu_model_keys_the_cache(self):
        calls, task, d = [], small_task(), scratch("cuda")

        def cache_path(device, name="-"):
            with mock.patch.object(torch.cuda, "get_device_name", return_value=name), quietly():
                with model.sft_cache(task, torch.device(device), d, 0, 5, model.GPTConfig()) as cache:
                    return cache.path

        record = lambda name: lambda *a, **k: calls.append((name, a, k))
        with mock.patch.object(torch.cuda, "is_available", return_value=True), \
                mock.patch.object(torch.cuda, "get_device_name", return_value="Fake GPU 80GB"), \
                mock.patch.object(torch, "use_deterministic_algorithms", record("det")), \
                mock.patch.multiple(torch.backends.cuda, enable_flash_sdp=record("flash"),
                                    enable_mem_efficient_sdp=record("mem"), enable_cudnn_sdp=record("cudnn")), \
                mock.patch.dict(os.environ, {}, clear=False), quietly() as (out, err):
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
            self.assertEqual(model.pick_device("cuda"), torch.device("cuda"))
            self.assertEqual(os.environ.get("CUBLAS_WORKSPACE_CONFIG"), ":4096:8")
        self.assertEqual((out.getvalue(), err.getvalue()), ("", "device: cuda (Fake GPU 80GB)\n"))   # stdout: the run's
        self.assertEqual(sorted(calls), [("cudnn", (False,), {}), ("det", (True,), {"warn_only": True}),
                                         ("flash", (False,), {}), ("mem", (False,), {})])
        paths = {cache_path("cuda", "Fake GPU 80GB"), cache_path("cuda", "Other GPU"), cache_path("cpu")}
        self.assertEqual(len(paths), 3)


class TestRun(unittest.TestCase):
    """model.run: each fault ends in one line on stderr and an exit code, and the previous run stays whole."""

    def test_ctrl_c_divergence_and_out_of_memory_in_a_run(self):
        """Ctrl-C in training or evaluation, a real divergence (--lr 10, n_embd 64), out of memory: one line each."""
        real, calls = data.pair_batch, []
        third_batch = lambda *a, **k: calls.append(1) or (real(*a, **k) if len(calls) < 3 else throw(KeyboardInterrupt))
        oom = RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried to allocate 999 bytes")
        cases = [(mock.patch.object(data, "pair_batch", third_batch), [], 130,
                  r"interrupted at step 1 of 3 \(training\); "),
                 (mock.patch.object(data, "evaluate", side_effect=KeyboardInterrupt), [], 130,
                  "interrupted during evaluation; "),
                 (contextlib.nullcontext(), ["--lr", "10", "--steps", "200", "--n-embd", "64"], 1,
                  r"error: the loss is (nan|inf|-inf) at step \d+ of 200 \(training\): the run diverged; lower the "
                  r"learning rate \(--lr is 10; try 1\); nothing was saved, "),
                 (mock.patch.object(dpo, "pair_logps", side_effect=oom), [], 1,
                  "error: out of memory .*--batch-size.*; ")]
        for patch, flags, want, line in cases:
            out = os.path.join(scratch("fault"), "out")
            previous, sft_dir = write_previous_run(out), scratch("sft-64") if flags else sft()   # (another size)
            with patch:
                code, _, err = run_main(dpo, TINY + ["--steps", "3", *flags, "--out", out, "--sft-dir", sft_dir])
            said = [line for line in err.splitlines() if line.startswith(("error", "interrupted"))]
            self.assertEqual((code, "Traceback" in err, len(said)), (want, False, 1), err)
            self.assertRegex(err.strip().splitlines()[-1], f"^{line}previous results in {re.escape(out)} untouched$")
            self.assertEqual(folder_state(out), (previous, []))     # untouched
        with mock.patch.object(dpo, "pair_logps", side_effect=RuntimeError("a bug, not memory")), \
                self.assertRaisesRegex(RuntimeError, "a bug"):          # any other error stays a traceback
            run_main(dpo, TINY + ["--out", os.path.join(scratch("fault"), "out"), "--sft-dir", sft()])

    def test_non_finite_loss_or_weights(self):
        m = sharp_gpt()
        model.check_loss(torch.tensor(1e30), 4, 10)                # large is not diverged
        m.lm_head.weight.data[0, 0] = float("inf")
        self.assertRaises(FloatingPointError, model.check_weights, m)
        model.progress.__dict__.update(out="out/x", phase="setup", step=None, total=None, lr=1e-3)
        nan_in_sft = lambda: model.check_loss(torch.tensor(float("nan")), 3, 5, phase="SFT training")
        self.assertEqual(exits(lambda: model.run(nan_in_sft)), (1, "error: the loss is nan at step 3 of 5 (SFT "
                         "training): the run diverged; try a smaller model (--n-layer, --n-embd) or another --seed; "
                         "nothing was saved, previous results in out/x untouched\n"))    # the SFT model's divergence

    def test_ctrl_c_after_the_save_says_the_run_was_saved(self):
        out = os.path.join(scratch("fault"), "out")
        model.progress.__dict__.update(out=out, phase="setup", step=2, total=3)
        saved_then_ctrl_c = lambda: model.save_files(out, {"metrics.json": b"new"}) or throw(KeyboardInterrupt)
        self.assertEqual(exits(lambda: model.run(saved_then_ctrl_c)),     # Ctrl-C while the charts print
                         (130, f"interrupted after the save; the run was saved in {out}\n"))
        self.assertEqual(folder_state(out)[0], {"metrics.json": b"new"})


class TestOutputFolder(unittest.TestCase):
    """model.prepare_out_dir and model.save_files: --out is the run's own folder, replaced whole or not at all."""
    NEW = {"metrics.json": b"new metrics", "log.jsonl": b"new log", "model.pt": b"new weights"}

    class Killed(BaseException):
        pass

    def setUp(self):
        self.handler, self.out = signal.getsignal(signal.SIGINT), os.path.join(scratch("out"), "run")
        self.previous = write_previous_run(self.out)

    def tearDown(self):   # a save killed between its renames leaves SIGINT ignored: a dead process would not care
        signal.signal(signal.SIGINT, self.handler)

    def mended(self, note=""):
        """The next run's prepare_out_dir: what it says, and the folder left whole with nothing beside it."""
        with quietly() as (_, err):
            model.prepare_out_dir(self.out)
        self.assertEqual((err.getvalue(), folder_state(self.out)[1]), (note, []))
        return folder_state(self.out)[0]

    def test_save_replaces_the_set(self):
        model.save_files(self.out, self.NEW)
        self.assertEqual((folder_state(self.out), model.progress.phase), ((self.NEW, []), "saved"))
        model.save_files(self.out, {"metrics.json": b"m2"})     # a run with no model.pt (--exact) removes the rest too
        self.assertEqual(folder_state(self.out)[0], {"metrics.json": b"m2"})

    def test_a_folder_holding_anything_else_is_refused_before_any_work(self):
        d = scratch("stranger")
        out = os.path.join(d, "notes")
        os.makedirs(out)
        pathlib.Path(out, "thesis.tex").write_text("mine")
        code, _, err = run_main(dpo, TINY + ["--out", out, "--sft-dir", os.path.join(d, "sft")])
        self.assertIn(f"--out {out!r} holds more than a run's metrics.json, log.jsonl and model.pt", err)
        self.assertEqual((code, os.listdir(d), folder_state(out)[0]), (2, ["notes"], {"thesis.tex": b"mine"}))
        pathlib.Path(self.out, ".DS_Store").touch()   # what Finder leaves is no stranger's file
        self.mended()

    def test_cannot_write_is_one_line_exit_2(self):
        d = scratch("blocked")
        pathlib.Path(d, "a-file").touch()
        sub = os.path.join(d, "a-file", "sub")                     # below a file: no folder can be made there
        for call in (lambda: model.prepare_out_dir(sub), lambda: model.fail("boom")):
            code, err = exits(call)
            self.assertTrue(code == 2 and err.startswith("error:"), err)
        code, _, err = run_main(dpo, TINY + ["--out", sub, "--sft-dir", os.path.join(d, "sft")])
        self.assertIn(f"cannot write to output folder {sub!r}", err.strip().splitlines()[-1])
        self.assertEqual((code, os.listdir(d)), (2, ["a-file"]))

    def test_killed_while_writing_leaves_the_previous_run(self):
        real = model.write
        killer = lambda p, c: throw(self.Killed()) if p.endswith("log.jsonl") else real(p, c)
        with mock.patch.object(model, "write", killer), mock.patch("shutil.rmtree"), self.assertRaises(self.Killed):
            model.save_files(self.out, self.NEW)                   # (a killed process cleans nothing up)
        self.assertEqual(folder_state(self.out)[1], ["run.incoming"])
        self.assertEqual(self.mended(), self.previous)

    def test_killed_between_the_two_renames_is_mended_by_the_next_run(self):
        real, renames = os.rename, []
        rename = lambda src, dst: throw(self.Killed()) if renames else renames.append(1) or real(src, dst)
        with mock.patch.object(os, "rename", rename), self.assertRaises(self.Killed):
            model.save_files(self.out, self.NEW)                   # dies after the first rename
        self.assertEqual(folder_state(self.out), (None, ["run.incoming", "run.previous"]))
        note = f"note: a save into {self.out} was cut short; the previous run is back in place\n"
        self.assertEqual(self.mended(note), self.previous)

    def test_killed_after_the_swap_keeps_the_new_run(self):
        with mock.patch("shutil.rmtree", side_effect=self.Killed()), self.assertRaises(self.Killed):
            model.save_files(self.out, self.NEW)                   # dies removing the previous run
        self.assertEqual(folder_state(self.out)[1], ["run.previous"])
        self.assertEqual(self.mended(), self.NEW)

    def test_full_disk_while_writing_leaves_the_previous_files(self):
        real, out = model.write, self.out
        full = lambda path: OSError(errno.ENOSPC, "No space left on device", path)
        write = lambda path, content: throw(full(path)) if path.endswith("model.pt") else real(path, content)
        model.progress.out = out
        with mock.patch.object(model, "write", write):       # metrics.json and log.jsonl are written by now
            code, err = exits(lambda: model.run(lambda: model.save_run(out, sharp_gpt(), argparse.Namespace(seed=1),
                                                                       {"method": "x"}, [{"step": 0}])))
        self.assertEqual((code, err), (1, f"error: No space left on device writing {out}/model.pt; nothing was saved, "
                                          f"previous results in {out} untouched\n"))
        self.assertEqual(folder_state(out), (self.previous, []))

    def test_ctrl_c_during_the_renames_waits_for_them(self):
        """SIGINT between the two renames is ignored, so the swap is never left half done; then Ctrl-C works again."""
        real, caught = os.rename, []
        handler = lambda *a: caught.append(a)                      # what would have raised KeyboardInterrupt
        signal.signal(signal.SIGINT, handler)
        with mock.patch.object(os, "rename", lambda src, dst: os.kill(os.getpid(), signal.SIGINT) or real(src, dst)):
            model.save_files(self.out, self.NEW)                   # Ctrl-C arrives in the middle of the swap
        self.assertEqual((caught, signal.getsignal(signal.SIGINT)), ([], handler))
        self.assertEqual(folder_state(self.out), (self.NEW, []))


class TestCheckpoint(unittest.TestCase):
    """model.save_run, model.load and model.load_checkpoint."""

    def test_round_trip_same_logits_plain_types(self):
        m, d = sharp_gpt(14), os.path.join(scratch("ckpt"), "run")
        model.save_run(d, m, argparse.Namespace(beta=0.1, out="x", flag=True, seed=3, nothing=None, odd=[1, 2]),
                       {"method": "test", "score": 0.5}, [{"step": 0, "loss": 0.7}])
        ckpt = torch.load(os.path.join(d, "model.pt"), weights_only=True)
        self.assertEqual((set(ckpt), model.GPTConfig(**ckpt["config"])), ({"model", "config", "args"}, m.config))
        self.assertEqual(ckpt["args"], {"beta": 0.1, "out": "x", "flag": True, "seed": 3, "nothing": None,
                                        "odd": "[1, 2]"})
        loaded, loaded_args = model.load_checkpoint(os.path.join(d, "model.pt"))
        self.assertEqual((loaded_args["beta"], loaded.training), (0.1, False))
        self.assertEqual((read_json(d, "metrics.json"), read_json(d, "log.jsonl")),
                         ({"method": "test", "score": 0.5}, [{"step": 0, "loss": 0.7}]))
        ids = small_task(seed=14).sft_ids[:4]
        with torch.no_grad():
            self.assertTrue(torch.equal(m(ids), loaded(ids)))

    def test_a_file_that_is_no_checkpoint_is_one_line_exit_2(self):
        d = scratch("ckpt")                       # (model.load's reasons in words: TestSftCache)
        pathlib.Path(d, "x.pt").write_bytes(b"garbage" * 20)
        for name, words in (("x.pt", "not a PyTorch file"), ("no.pt", "no such file")):
            path = os.path.join(d, name)
            code, err = exits(lambda: model.load_checkpoint(path))
            self.assertEqual((code, err.count("\n")), (2, 1), err)
            self.assertTrue(err.startswith(f"error: cannot load checkpoint {path!r}: ") and words in err, err)


class TestSftCache(unittest.TestCase):
    """model.sft_cache (through model.sft_model): a classroom on one --sft-dir trains each SFT model once."""

    def sft_model(self, task, d, steps=3, **patches):
        with quietly() as (_, err), mock.patch.multiple(model, **patches) if patches else contextlib.nullcontext():
            m, info = model.sft_model(task, CPU, d, 0, steps, SMALL, quiet=True)
        return m, info, err.getvalue()

    def test_reused_rebuilt_and_keyed(self):
        task, d = small_task(seed=13), scratch("cache")
        m1, info1, err = self.sft_model(task, d)
        path = info1["path"]
        self.assertEqual((info1["cached"], err), (False, f"note: no SFT cache at {path}; training the SFT model "
                                                         f"(3 steps, once)\n"))
        # reused: loaded, not retrained (an optimiser would mean training), same weights
        m2, info2, _ = self.sft_model(task, d, Adam=mock.Mock(side_effect=AssertionError("retrained")))
        self.assertEqual((info2["cached"], info2["path"], info2["ce_after"]), (True, path, info1["ce_after"]))
        self.assertTrue(same_weights(m1, m2))
        # a cache whose stored key disagrees with this run's settings is rebuilt, the same weights again
        ckpt = torch.load(path, weights_only=True)
        ckpt["key"]["steps"] = 999
        torch.save(ckpt, path)
        m3, info3, err = self.sft_model(task, d)
        self.assertEqual((info3["cached"], err), (False, f"note: SFT cache {path} is not an SFT cache of these "
                                                         f"settings (of this project); rebuilding it\n"))
        self.assertTrue(same_weights(m1, m3))
        self.assertEqual(torch.load(path, weights_only=True)["key"]["steps"], 3)
        # a different setting (steps, task, seed) is a different cache file; no .tmp left, the lock files stay
        info4 = self.sft_model(task, d, steps=2)[1]
        names = [os.path.basename(info["path"]) for info in (info1, info4)]
        self.assertEqual(sorted(os.listdir(d)), sorted(names + [n + ".lock" for n in names]))

    def test_corrupt_cache_notes_say_what_is_wrong(self):
        task, d = small_task(seed=24), scratch("cache")
        path = self.sft_model(task, d)[1]["path"]
        good, foreign, plain = pathlib.Path(path).read_bytes(), io.BytesIO(), io.BytesIO()
        torch.save(nn.Linear(2, 2), foreign)
        torch.save({"weights": torch.zeros(2)}, plain)
        for content, words in [(b"", "empty"), (good[:len(good) // 2], "truncated"),
                               (b"this is not a checkpoint\x00\xff" * 10, "not a PyTorch file (unreadable or corrupt)"),
                               (foreign.getvalue(), "not a file of this project"),
                               (plain.getvalue(), "not an SFT cache of these settings (of this project)")]:
            pathlib.Path(path).write_bytes(content)
            _, again, err = self.sft_model(task, d)
            self.assertFalse(again["cached"])
            self.assertTrue(err.startswith(f"note: SFT cache {path} is ") and err.endswith("; rebuilding it\n"), err)
            self.assertTrue(words in err and len(err.splitlines()) == 1 and "weights_only" not in err, err)
        self.assertTrue(self.sft_model(task, d)[1]["cached"])

    def test_a_folder_at_the_cache_path_is_a_clear_error(self):
        task, d = small_task(seed=23), scratch("cache")
        with quietly(), model.sft_cache(task, CPU, d, 0, 3, SMALL) as cache:
            os.makedirs(cache.path)
        self.assertEqual(exits(lambda: self.sft_model(task, d))[0], 2)

    def test_read_only_folder_is_read_and_a_failed_write_keeps_the_model(self):
        task, d = small_task(seed=22), scratch("cache")
        denied = OSError(errno.EACCES, "Permission denied")
        with mock.patch.object(os, "open", side_effect=denied):       # no lock file can be made: runs unlocked
            m, info, err = self.sft_model(task, d, write=mock.Mock(side_effect=denied))
        self.assertTrue(not info["cached"] and f"note: could not write the SFT cache {info['path']} (Permission "
                        f"denied); going on with the model just trained" in err, err)
        self.assertEqual(os.listdir(d), [])
        self.sft_model(task, d)                                       # now a writable folder: the cache is made
        with mock.patch.object(os, "open", side_effect=denied):       # read-only with a valid cache: read it
            m2, info2, _ = self.sft_model(task, d, write=mock.Mock(side_effect=denied),
                                          Adam=mock.Mock(side_effect=AssertionError))
        self.assertTrue(info2["cached"] and same_weights(m, m2))
        full = mock.Mock(side_effect=OSError(errno.ENOSPC, "No space left on device"))    # written, not moved in
        with mock.patch.object(os, "replace", full):
            _, info3, err = self.sft_model(task, d, steps=2)
        self.assertTrue(not info3["cached"] and "(No space left on device)" in err, err)
        self.assertFalse([f for f in os.listdir(d) if f.endswith(".tmp")])     # its temporary file removed

    def test_runs_starting_together_train_once(self):
        """Three runs on one empty --sft-dir: one trains (slowly), the others wait on its lock, load; it stays."""
        task, d, real, trained, results = small_task(seed=21), scratch("lock"), model.Adam, [], []
        slow_adam = lambda *a, **k: trained.append(1) or time.sleep(0.5) or real(*a, **k)   # an optimiser: training
        train = lambda: results.append(model.sft_model(task, CPU, d, 0, 3, SMALL, quiet=True))
        threads = [threading.Thread(target=train) for _ in range(3)]
        with mock.patch.object(model, "Adam", slow_adam), quietly() as (_, errors):
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        self.assertEqual(len(trained), 1, errors.getvalue())
        self.assertEqual(sorted(info["cached"] for _, info in results), [False, True, True])
        self.assertIn("note: another run is training this SFT model (lock", errors.getvalue())
        self.assertIn(".lock); waiting for it", errors.getvalue())
        self.assertTrue(all(same_weights(results[0][0], m) for m, _ in results[1:]))
        name = os.path.basename(results[0][1]["path"])
        self.assertEqual(sorted(os.listdir(d)), [name, name + ".lock"])


class TestPeakMemory(unittest.TestCase):
    """model.PeakMemory: what training adds to the memory in use, sampled after every training forward."""

    def test_samples_training_forwards_only(self):
        policy, ids = sharp_gpt(3).train(), torch.ones(2, 6, dtype=torch.long)
        before, rng = weights(policy), torch.get_rng_state()
        with Spy(model.PeakMemory, "sample") as spy:
            meter = model.PeakMemory(policy)
            self.assertTrue(torch.equal(torch.get_rng_state(), rng))      # the warm-up draws no random numbers,
            self.assertTrue(same_weights(before, policy))                  # leaves the weights and no gradients,
            self.assertTrue(all(p.grad is None for p in policy.parameters()) and spy.calls == [])   # is not sampled
            policy(ids)                                                   # training: sampled
            with torch.no_grad():
                policy(ids)                                               # no gradients: not
            model.frozen_copy(policy)(ids)                                # a frozen copy carries the hook: not
            policy.eval()(ids)                                            # evaluation: not
        self.assertEqual((len(spy.calls), meter.mb()), (1, (meter.peak - meter.base) / 2**20))

    def test_where_the_bytes_come_from(self):
        import resource
        meter = model.PeakMemory.__new__(model.PeakMemory)
        meter.device = torch.device("cuda")
        with mock.patch.object(torch.cuda, "memory_allocated", return_value=123) as allocated:   # CUDA: allocated
            self.assertEqual((meter.in_use(), allocated.call_args.args), (123, (meter.device,)))
        meter.device = CPU
        with mock.patch("ctypes.CDLL", side_effect=OSError("not glibc")), \
                mock.patch.object(resource, "getrusage", return_value=mock.Mock(ru_maxrss=1000)):
            for platform, want in (("darwin", 1000), ("linux", 1000 * 1024)):   # macOS: bytes; Linux: kilobytes
                with mock.patch.object(sys, "platform", platform):
                    self.assertEqual(meter.in_use(), want)
        try:
            import ctypes
            ctypes.CDLL("libc.so.6").mallinfo2
        except (OSError, AttributeError):
            return                                                        # not glibc: the peak resident set
        base = meter.in_use()
        big = torch.ones(8 * 2**20)                                       # 32 MB
        self.assertGreater(meter.in_use() - base, 30 * 2**20)
        del big
        self.assertLess(meter.in_use() - base, 2 * 2**20)                 # live bytes, not a high-water mark


CODE_FILES = ("model", "data", "dpo", "simpo", "sppo")
CITATION = re.compile(r"`(model|data|dpo|simpo|sppo)\.py:([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)`")   # `dpo.py:dpo_loss`
LABEL = re.compile(r"\[([A-Z][A-Za-z]+(?:-[A-Za-z0-9.]+)?)\](?![(\[])")     # [DPO-1], [Nash]; not a link's [text](...)
read = lambda path: pathlib.Path(REPO, path).read_text()


@functools.cache
def defined_names(file):
    """What a source file defines at its top level (functions, classes, constants) and Class.member."""
    names = set()
    for node in ast.parse(read(f"{file}.py")).body:
        for item in [node] + (node.body if isinstance(node, ast.ClassDef) else []):
            prefix = f"{node.name}." if item is not node else ""
            if isinstance(item, (ast.FunctionDef, ast.ClassDef)):
                names.add(prefix + item.name)
            for target in getattr(item, "targets", []) + [getattr(item, "target", None)]:
                names.update(prefix + n.id for n in (ast.walk(target) if target else ()) if isinstance(n, ast.Name))
    return names


def citation_problems(text):
    """Each `file.py:name` must be defined in that file and each [LABEL] appear in a source file."""
    code = "".join(read(f"{file}.py") for file in CODE_FILES)
    return ([f"`{file}.py:{name}` names nothing defined in {file}.py" for file, name in CITATION.findall(text)
             if name not in defined_names(file)]
            + [f"[{label}] appears in no source file" for label in LABEL.findall(text) if f"[{label}]" not in code])


def readme_block(containing):
    """The README's ```python block that contains `containing`."""
    found = [b.split("```", 1)[0] for b in read("README.md").split("```python\n")[1:] if containing in b]
    assert len(found) == 1, f"README: {len(found)} python blocks contain {containing!r}"
    return found[0]


class TestReadme(unittest.TestCase):
    """README.md cites code by name (`file.py:name`) and by equation label ([DPO-1]), never by line number."""

    def test_citations_name_what_the_code_defines_never_line_numbers(self):
        self.assertEqual(citation_problems(read("README.md")), [])
        self.assertEqual(re.findall(r"`[a-z_]+\.py`,? lines? \d+(?:-\d+)?|\blines \d+-\d+", read("README.md")), [])
        # the check itself: a citation of nothing and a label no file holds are found; a link is no label
        self.assertEqual(citation_problems("`dpo.py:dpo_loss`, `data.py:ExactTask.best`, `model.py:SFT_LR`, "
                                           "`model.py:GPTConfig.vocab_size`, `sppo.py:nothing_here`, [DPO-1], [Nash], "
                                           "[DPO-99], [Results](#results)"),
                         ["`sppo.py:nothing_here` names nothing defined in sppo.py",
                          "[DPO-99] appears in no source file"])

    def test_the_commands_it_gives_name_these_classes(self):
        named = set(re.findall(r"python -m unittest test_all\.(\w+)", read("README.md")))
        self.assertLessEqual({"TestDpoLoss", "TestSimpoLoss", "TestSppoLoss", "TestEstimateWinRates",
                              "TestSequenceLogps"}, named)
        self.assertTrue(all(isinstance(globals().get(name), type) for name in named), named)

    def test_the_sample_snippet_prints_what_the_command_prints(self):
        run_dir, snippet = gpt_run("dpo").dir, readme_block("model.load_checkpoint(")
        self.assertIn('"out/simpo/model.pt"', snippet)
        self.assertLessEqual(len([l for l in snippet.splitlines() if l.strip() and not l.startswith(" ")]), 6)
        with quietly() as (printed, _):
            exec(snippet.replace('"out/simpo/model.pt"', repr(os.path.join(run_dir, "model.pt"))), {})
        command = run_main(data, ["sample", run_dir, "-n", "5"])[1]
        self.assertEqual(printed.getvalue().splitlines(), command.splitlines()[:5])

    def test_the_matplotlib_recipe_plots_the_log(self):
        """matplotlib is not a dependency: a stand-in records what the README's recipe asks it to draw."""
        run, recipe, plt = gpt_run("dpo"), readme_block("matplotlib.pyplot"), mock.MagicMock()
        self.assertIn('"out/dpo/log.jsonl"', recipe)
        with mock.patch.dict(sys.modules, {"matplotlib": mock.MagicMock(pyplot=plt), "matplotlib.pyplot": plt}):
            exec(recipe.replace('"out/dpo/log.jsonl"', repr(os.path.join(run.dir, "log.jsonl"))), {})
        drawn = {c.kwargs.get("label"): tuple(map(list, c.args)) for c in plt.plot.call_args_list}
        self.assertEqual(drawn, {k: ([r["step"] for r in run.log], [r[k] for r in run.log])
                                 for k in ("logps/chosen", "logps/rejected")})
        plt.savefig.assert_called_once()


# Each script as a user types it, in its own process: a signal, a pipe, a terminal, a run from nothing. 2-3 s
# of torch import each: load_tests starts them first, in parallel; TestScriptProcesses waits at the end.

class ScriptProcess:
    """`python argv... --out OUT` in REPO, stdout block-buffered as on a terminal; finish() waits: (code, out, err).
    reader_leaves: stdout closed at once (| head); ctrl_c: stderr a pty, Ctrl-C once the bar shows a step."""

    def __init__(self, argv, out, reader_leaves=False, ctrl_c=False, **env):
        self.out, self.ctrl_c, self.seen, self.signalled = out, ctrl_c, b"", False
        stderr = subprocess.PIPE
        if ctrl_c:
            import fcntl, pty, struct, termios   # noqa: E401  (Unix only, like the signal)
            self.terminal, stderr = pty.openpty()
            fcntl.ioctl(stderr, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
        env = {**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}, **env}
        self.proc = subprocess.Popen([sys.executable, *argv, "--out", out], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=stderr)
        if reader_leaves:
            self.proc.stdout.close()
        if ctrl_c:
            os.close(stderr)
            self.watcher = threading.Thread(target=self.watch, daemon=True)
            self.watcher.start()

    def watch(self):
        while True:
            try:
                chunk = os.read(self.terminal, 4096)
            except OSError:                            # the process is gone and the terminal closed
                chunk = b""
            if not chunk:
                return os.close(self.terminal)
            self.seen += chunk
            if not self.signalled and re.search(rb"DPO:[^\r\n]*\| *[1-9][0-9]*/1000000", self.seen):
                self.proc.send_signal(signal.SIGINT)   # Ctrl-C, once a training step has run
                self.signalled = True

    @functools.cache
    def finish(self):
        try:        # a run that Ctrl-C never reaches would train for hours: stopped here, and the test says why
            out, err = self.proc.communicate(timeout=120 if self.ctrl_c else 600)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        if self.ctrl_c:
            self.watcher.join()
        err = (self.seen if self.ctrl_c else err).decode("utf-8", "replace").replace("\r\n", "\n")
        return argparse.Namespace(code=self.proc.returncode, out=(out or b"").decode("utf-8", "replace"), err=err)

    def metrics(self):
        self.finish()
        return read_json(self.out, "metrics.json")


_PROCESSES = {}


def script_process(name):
    """One of the script processes, started on first use (or by load_tests, first of all)."""
    if name not in _PROCESSES:
        out = os.path.join(scratch(name), "run")
        if name == "sppo_exact":   # the README's command, and a reader that leaves at once (| head, closed early)
            p = ScriptProcess(["sppo.py", "--exact", "--judge", "cyclic"], out, reader_leaves=True)
        elif name == "simpo":      # a first run (its SFT model trained in its own folder), on an ASCII terminal
            p = ScriptProcess(["simpo.py", *TINY, *GPT_RUNS["simpo"][1], "--sft-dir", scratch("sft-cold")], out,
                              PYTHONIOENCODING="ascii")
        elif name == "dpo":        # from the shared SFT cache, on a UTF-8 terminal
            p = ScriptProcess(["dpo.py", *TINY, *GPT_RUNS["dpo"][1], "--sft-dir", sft()], out, PYTHONIOENCODING="utf-8")
        else:                      # "ctrl_c": a long run into a folder that holds a previous run
            previous = write_previous_run(out)
            p = ScriptProcess(["dpo.py", *TINY, "--steps", "1000000", "--sft-dir", sft()], out, ctrl_c=True)
            p.previous = previous
        _PROCESSES[name] = p
    return _PROCESSES[name]


PROCESSES = ("sppo_exact", "simpo", "dpo", "ctrl_c")


class TestScriptProcesses(unittest.TestCase):
    """Each script as a user types it; a real Ctrl-C on a terminal; a closed pipe; an ASCII terminal."""

    @classmethod
    def setUpClass(cls):
        for name in PROCESSES:           # all at once (started already when the whole file runs)
            script_process(name)

    def same_numbers(self, proc, here):
        m, without_timing = proc.metrics(), lambda m: {k: v for k, v in m.items() if k not in TIMING_KEYS}
        self.assertEqual((m.keys(), without_timing(m)), (here.metrics.keys(), without_timing(here.metrics)))
        self.assertEqual(read_json(proc.out, "log.jsonl"), here.log)
        self.assertTrue(same_weights(torch.load(os.path.join(proc.out, "model.pt"), weights_only=True)["model"],
                                     here.trained))

    def test_dpo(self):
        p = (proc := script_process("dpo")).finish()
        self.assertEqual(p.code, 0, p.err[-2000:])
        lines = [line.split("; held-out")[0] for line in p.err.splitlines()
                 if not line.startswith("note: another run is training")]   # it may start while the fixture trains
        self.assertEqual(lines, ["device: cpu", f"SFT model (cache {glob_one(sft())}): loaded"])
        self.assertTrue(p.out.startswith("DPO loss [DPO-1] per step") and "│" in p.out)   # UTF-8: Unicode charts
        self.assertIn("logps/chosen and logps/rejected per step (batch means, nats)  (6 values; ", p.out)   # one scale
        self.assertIn("; w log pi(y_w|x); l log pi(y_l|x))", p.out)
        self.assertRegex(p.out.strip().splitlines()[-1], r"\| [\d.]+ s \(start-up [\d.]+, training [\d.]+, evaluation "
                                                         r"[\d.]+\) \| wrote " + re.escape(proc.out) + "/$")
        self.same_numbers(proc, gpt_run("dpo"))

    def test_simpo_first_run_on_an_ascii_terminal(self):
        """python simpo.py, empty --sft-dir, ASCII terminal: the shared cache's twin, ASCII charts, the same numbers."""
        p = (proc := script_process("simpo")).finish()
        self.assertTrue(p.code == 0 and "): trained; held-out cross-entropy" in p.err, p.err[-2000:])
        self.assertTrue(p.out.isascii() and "?" not in p.out)              # no character replaced: ASCII charts
        self.assertTrue("\n" + " " * 10 + "+---\n" in p.out and p.out.splitlines()[1][10] == "|", p.out[:300])
        self.same_numbers(proc, gpt_run("simpo"))
        cold, warm = (glob_one(d) for d in (proc.proc.args[proc.proc.args.index("--sft-dir") + 1], sft("cyclic")))
        self.assertEqual(os.path.basename(cold), os.path.basename(warm))
        self.assertTrue(same_weights(*(torch.load(path, weights_only=True)["model"] for path in (cold, warm))))

    def test_sppo_exact_cyclic_to_a_reader_that_leaves_at_once(self):
        p, m = (proc := script_process("sppo_exact")).finish(), proc.metrics()
        self.assertEqual((p.code, p.err, m["method"], m["judge"]), (0, "", "sppo", "cyclic"))
        self.assertEqual((sorted(os.listdir(proc.out)), folder_state(proc.out)[1]), (["metrics.json"], []))

    def test_ctrl_c_on_a_terminal(self):
        """A real SIGINT while the progress bar runs: exit 130, one line saying where, the previous run untouched."""
        p = (proc := script_process("ctrl_c")).finish()
        self.assertTrue(proc.signalled, "the progress bar never showed a training step:\n" + p.err[-2000:])
        lines = [line.split("\r")[-1] for line in p.err.splitlines() if line.split("\r")[-1].strip()]
        self.assertEqual((p.code, p.out, "Traceback" in p.err), (130, "", False), p.err[-2000:])  # stdout: after saving
        self.assertRegex(lines[-1], r"^interrupted at step \d+ of 1000000 \(training\); previous results in "
                                    + re.escape(proc.out) + " untouched$")
        self.assertEqual(folder_state(proc.out), (proc.previous, []))


def cleanup():
    for p in _PROCESSES.values():
        if p.proc.poll() is None:
            p.proc.kill()
    shutil.rmtree(SCRATCH, ignore_errors=True)


atexit.register(cleanup)


def load_tests(loader, tests, pattern):
    """`python -m unittest test_all`: the processes start first, then the classes in the order of this file."""
    for name in PROCESSES:
        script_process(name)
    classes = [obj for obj in globals().values()
               if isinstance(obj, type) and issubclass(obj, unittest.TestCase) and obj.__module__ == __name__]
    return unittest.TestSuite(map(loader.loadTestsFromTestCase, classes))


if __name__ == "__main__":
    unittest.main()
