"""
sppo.py: Self-Play Preference Optimization (Wu, Sun, Yuan, Ji, Yang and Gu 2024, arXiv 2405.00675), from scratch.

The method in five lines:
  1. Alignment is a two-player game judged by a preference oracle P(y > y'|x); the goal is its Nash policy  [SPPO-1]
  2. Play it by multiplicative weights: pi_{t+1}(y|x) ∝ pi_t(y|x) exp(eta P(y > pi_t|x)), from pi_1 = SFT  [SPPO-2]
  3. Each iteration samples K responses per prompt from the frozen pi_t and asks the oracle about every pair,
     which estimates each response's win rate against pi_t                                            [SPPO-5]
  4. Fit pi_{t+1} by regression, per sample: (log pi_theta(y|x)/pi_t(y|x) - eta (P_hat(y > pi_t|x) - 1/2))^2  [SPPO-6]
  5. Needs prompts and an oracle, no preference pairs; --variant hard is the offline, pairwise shortcut    [SPPO-9]

Run:       python sppo.py                     (CPU, 2 cores: seconds once out/sft holds the SFT model; README)
           python sppo.py --variant hard      (TRL's loss_type="sppo_hard" on data.py's offline pairs)
           python sppo.py --judge cyclic --eta 10 --iterations 10   (preferences in a circle, README)
           python sppo.py --exact             (the table version: [MW-exact] and Theorem 4.1, exactly)
Expected:  win rate against the SFT model >= 0.9 on held-out prompts, rising from one iteration to the next
           (seed 0: 0.70, 0.87, 0.95); --variant hard about 0.75 (one fit to noisy offline labels).
Departures from the paper:
  - the oracle is data.py's Bradley-Terry judge, not PairRM; a 0.1 M-parameter GPT, not Mistral-7B;
  - each of the K samples is regressed on its own target ([SPPO-6], Algorithm 1); the official code, per prompt,
    regresses only the best and the worst of its K = 5 samples;
  - the same 288 training prompts in every iteration (the paper: a fresh third of 60k prompts each time);
  - eta = 20, not the official 1000 (its --beta 0.001): our log-ratios are sums over ~10 tokens, not hundreds;
  - Adam with a fresh state and a fixed number of steps per iteration (official: RMSprop, 18 epochs);
    samples at temperature 1, so they are draws from pi_t itself.
"""

import argparse
import sys
import time

START = time.time()   # the run's clock starts before torch is imported: start-up includes it

import torch
from tqdm import tqdm

import data
from model import Adam, PeakMemory, add_run_args, bounded_int, check_loss, check_weights, frozen_copy, \
    minimise, pair_logps, positive_float, positive_int, run, sample, save_run, sequence_logps, \
    sequence_logps_all, trim

# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------

parser = argparse.ArgumentParser(description="SPPO on the toy sentiment task (arXiv 2405.00675)")
g = parser.add_argument_group("SPPO")
g.add_argument("--variant", choices=["selfplay", "hard"], default="selfplay",
               help="selfplay: Algorithm 1, sample from pi_t, oracle win rates, [SPPO-6]; hard: offline pairs "
                    "with P = 1 for y_w and 0 for y_l and pi_ref = SFT, [SPPO-9] (default: %(default)s)")
g.add_argument("--eta", type=positive_float, default=20.0,
               help="step size eta of [SPPO-2] (TRL's beta is 1/eta): a target log-ratio eta (P - 1/2) is SUMMED over "
                    "tokens, so 10 to 20 suits ~10-token reviews; the paper's runs use 1000 (default: %(default)s)")
g.add_argument("--iterations", type=positive_int, default=3,
               help="self-play iterations T (selfplay): each samples from pi_t, then fits pi_{t+1}; more get "
                    "closer to the game's equilibrium (default: %(default)s)")
g.add_argument("--k", type=bounded_int(1, 64), default=4,
               help="responses sampled per prompt and iteration (selfplay, >= 2): more give less noisy win rates "
                    "[SPPO-5] and cost sampling time (default: %(default)s)")
g.add_argument("--exact", action="store_true",
               help="check [SPPO-2] and [SPPO-Thm4.1] exactly on a table policy over 27 listed reviews (each iteration "
                    "fits sppo_loss with the exact log Z, with eta/2, and with K samples per prompt); defaults become "
                    "--eta 1 --iterations 40 --steps 50 (Newton steps per fit at most) --out out/sppo_exact")
STEPS = {"selfplay": 40, "hard": 200}   # --steps when not given: per iteration (selfplay), in all (hard)
add_run_args(parser, "sppo", steps=None, batch_size=64, lr=1e-3,
             steps_help=f"optimiser steps PER ITERATION with selfplay, in all with hard (default: {STEPS['selfplay']} "
                        f"per iteration, {STEPS['hard']} for hard)")
data.add_task_args(parser)

# ----------------------------------------------------------------------------------------------------
# The objective (the heart of this file)
# ----------------------------------------------------------------------------------------------------
#
# Derivation, SPPO paper sections 3 and 4, one equation per step. P(y > y'|x) is a preference oracle: the
# probability that response y is preferred to y' for prompt x (the paper: PairRM, a 0.4 B-parameter
# pairwise model; here data.py's judge). Against a whole policy pi, y wins with probability
#     P(y > pi|x) = E_{y'~pi(.|x)}[ P(y > y'|x) ]                      (the win rate of y against pi)
#
# 1. Alignment as a game (section 3). Two players each pick a policy; player one wins a round with
#    probability P(y > y'|x). As P(y > y') + P(y' > y) = 1 it is a constant-sum game, and its Nash
#    equilibrium is a policy that no other policy beats more than half of the time:                [SPPO-1]
#        (pi*, pi*) = argmax_pi min_pi' E_{x~X}[ E_{y~pi(.|x), y'~pi'(.|x)}[ P(y > y'|x) ] ]
#    No reward and no Bradley-Terry model are assumed: P may even be intransitive.
# 2. Play it against yourself with multiplicative weights (Freund and Schapire 1999; section 4.1): each
#    iteration reweights every response by how often it beats the current policy:                 [SPPO-2]
#        pi_{t+1}(y|x) = pi_t(y|x) exp( eta P(y > pi_t|x) ) / Z_{pi_t}(x),
#        Z_{pi_t}(x)   = sum_y pi_t(y|x) exp( eta P(y > pi_t|x) )
#    eta is the step size. The paper's Theorem 4.1: with eta of order 1/sqrt(T), the average of
#    pi_1..pi_T is within O(1/sqrt(T)) of the Nash equilibrium.
# 3. Take logs: the update sets a target for the log-ratio of the new policy to the old one:      [SPPO-3]
#        log( pi_{t+1}(y|x) / pi_t(y|x) ) = eta P(y > pi_t|x) - log Z_{pi_t}(x)
# 4. A network cannot be set to the right-hand side response by response, so fit it by least squares on
#    responses drawn from pi_t itself (the policy plays against its own samples: "self-play"):     [SPPO-4]
#        pi_{t+1} = argmin_pi E_{x~X, y~pi_t(.|x)}( log(pi(y|x)/pi_t(y|x)) - (eta P(y > pi_t|x) - log Z_{pi_t}(x)) )^2
#    When the policy class can express [SPPO-2], the loss reaches 0 there: its minimiser is [SPPO-2].
# 5. Finite samples (section 4.2): draw K responses y_1..y_K ~ pi_t(.|x) per prompt and let their
#    empirical distribution pi_hat_t^K stand in for the opponent pi_t:                             [SPPO-5]
#        P(y > pi_hat_t^K|x) = (1/K) sum_{k=1..K} P(y > y_k|x)
#    All K enter the mean, the response itself included (a tie, P(y_i > y_i|x) = 1/2), as in the official code's
#    K x K matrix. As P(y_i > y_j) + P(y_j > y_i) = 1, a prompt's K win rates average exactly 1/2: step 6's constant.
# 6. Replace log Z by eta/2 (section 4.2). If every comparison were a fair coin, each response's win rate
#    would tend to 1/2 as K grows, so Z -> exp(eta/2) and log Z -> eta/2:                             [SPPO-6]
#        pi_{t+1} = argmin_pi E_{x~X, y~pi_t(.|x)}( log( pi(y|x)/pi_t(y|x) ) - eta ( P(y > pi_hat_t^K|x) - 1/2 ) )^2
#    Read per sample: a response that beats pi_t more often than not (P > 1/2) gets its log-probability
#    raised by eta (P - 1/2) nats, one that loses gets it lowered, both relative to pi_t.
#    Correction: the SPPO write-up says "replace log Z by 2"; the eta was lost (eta/2 gives eta (P - 1/2)).
# 7. The policy-gradient reading (section 4, the connection to policy gradient). Divide what [SPPO-4]
#    squares by eta (the loss by eta^2; the minimiser is the same):                                [SPPO-7]
#        theta_{t+1} = argmin_theta E_{x, y~pi_theta_t}( P(y > pi_theta_t|x)
#                                    - eta^-1 log(pi_theta(y|x)/pi_theta_t(y|x)) - eta^-1 log Z_{pi_theta_t}(x) )^2
#    RLHF's policy gradient with reward r(y;x), KL coefficient eta^-1 and baseline b(x) is
#        grad J(theta) = E_{x, y~pi_theta}[ (r(y;x) - eta^-1 log(pi_theta(y|x)/pi_ref(y|x)) - b(x)) grad log pi_theta ]
#                      = -(eta/2) E_{x, y~pi_theta}[ grad (r(y;x) - eta^-1 log(pi_theta(y|x)/pi_ref(y|x)) - b(x))^2 ]
#    because grad (u)^2 = 2 u grad u and grad u = -eta^-1 grad log pi_theta. So one SPPO regression step at
#    theta = theta_t is a policy-gradient step with reward r = P(y > pi_t|x), KL coefficient 1/eta,
#    reference pi_t and baseline b(x) = eta^-1 log Z (the samples' average reward, 1/2, after step 6).
#    Correction: the write-up's last line reads "= eta E[-grad(...)^2]"; it dropped the factor 1/2.
# 8. The losses this file trains. Per sample, [SPPO-6] with pi_ref = pi_t is sppo_loss below. The
#    write-up's pairwise loss [SPPO-8] is that loss on y_w plus that loss on y_l:
#        L = ( log( pi_theta(y_w|x)/pi_ref(y_w|x) ) - eta ( P(y_w > pi_t|x) - 1/2 ) )^2
#          + ( log( pi_theta(y_l|x)/pi_ref(y_l|x) ) - eta ( P(y_l > pi_t|x) - 1/2 ) )^2
#    and with hard labels, P = 1 for y_w and P = 0 for y_l (--variant hard, pi_ref = SFT):          [SPPO-9]
#        L = ( log( pi_theta(y_w|x)/pi_ref(y_w|x) ) - eta/2 )^2 + ( log( pi_theta(y_l|x)/pi_ref(y_l|x) ) + eta/2 )^2
#    Corrections to the write-up's loss section: (a) it writes log(log pi_theta/pi_ref): there is ONE log, of the
#    ratio (a log of a log-ratio is undefined where pi_theta < pi_ref); (b) it writes eta^-1 (P - 1/2) and
#    +-1/(2 eta) where the derivation gives eta (P - 1/2) and +-eta/2: its "eta" there is TRL's beta.
#
# Convention: eta is the paper's step size of [SPPO-2]; TRL (loss_type="sppo_hard") and the official code write
# beta = 1/eta (their beta = 0.001 is eta = 1000). TRL SUMS the two squares of [SPPO-9], as sppo_hard_loss does;
# the official trainer halves them, which Adam (invariant to a constant factor on the loss) does not notice.
#
# log pi(y|x) is a SUM over the response tokens (model.sequence_logps), EOS included; the prompt and the
# padding never count. The loss is a plain square: its gradient 2 (log-ratio - target) grows linearly
# with the error and is finite for any finite log-probs (there is no exp or log to overflow).

def sppo_loss(policy_logps, ref_logps, win_prob, eta):
    """Per-sample SPPO losses [SPPO-6], shape [B].

    policy_logps  [B]  log pi_theta(y|x), summed over response tokens
    ref_logps     [B]  log pi_ref(y|x) under the frozen reference (pi_t in self-play, the SFT model in --variant hard)
    win_prob      [B]  the estimated win rate P(y > pi_t|x) of each sample (a tensor or a number)
    eta                the step size of [SPPO-2] (TRL's beta = 1/eta)
    """
    logratios = policy_logps - ref_logps                       # log pi_theta(y|x)/pi_ref(y|x)
    targets = eta * (torch.as_tensor(win_prob, dtype=logratios.dtype, device=logratios.device) - 0.5)
    return (logratios - targets) ** 2                          # the minimiser: log-ratio = eta (P - 1/2)


def sppo_hard_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, eta):
    """[SPPO-9]: sppo_loss on y_w with P = 1 plus sppo_loss on y_l with P = 0, i.e. per pair
    (a_w - eta/2)^2 + (a_l + eta/2)^2 with a = log pi_theta(y|x)/pi_ref(y|x). Shape [B]."""
    return (sppo_loss(policy_chosen_logps, ref_chosen_logps, 1.0, eta)
            + sppo_loss(policy_rejected_logps, ref_rejected_logps, 0.0, eta))


def estimate_win_rates(prefs):
    """[SPPO-5]: each sample's win rate against the K samples of its prompt, itself included (a tie, 1/2).

    prefs   [N, K, K]  P(y_i > y_j | x) of the K responses to each of N prompts (data.judge_prob of every pair)
    returns [N, K]     P_hat(y_i > pi_t|x) = (1/K) sum_j P(y_i > y_j|x); each row averages to exactly 1/2
    """
    prefs = prefs.clone()
    prefs.diagonal(dim1=1, dim2=2).fill_(0.5)   # a tie with itself (Bradley-Terry gives 1/2 anyway; any oracle must)
    return prefs.mean(-1)


# ----------------------------------------------------------------------------------------------------
# One self-play iteration (Algorithm 1's loop body) and the offline hard-label fit
# ----------------------------------------------------------------------------------------------------

def self_play_iteration(policy, prompts, *, iteration, k, eta, config, steps, batch_size, lr, device, sampler,
                        batch_order, log_rows):
    """One iteration t of Algorithm 1: freeze pi_t (= the policy as it stands), sample K responses per
    prompt from it, estimate win rates [SPPO-5], and fit the policy, which becomes pi_{t+1}, by minimising
    [SPPO-6] over those samples for `steps` Adam steps (a fresh optimiser, as each official iteration is a
    new training run). Appends one row per step to log_rows. Returns (pi_t, stats)."""
    t0 = time.time()
    pi_t = frozen_copy(policy)                                       # pi_t: frozen, no gradients
    rows = prompts.repeat_interleave(k, dim=0).to(device)            # prompt i's samples: rows i*K .. i*K+K-1
    responses = sample(pi_t, rows, data.MAX_RESPONSE, data.EOS_ID, data.BANNED_IN_RESPONSE, generator=sampler,
                       batch_size=512).cpu()
    by_prompt = responses.view(-1, k, responses.shape[1])            # [N, K, L]
    prefs = data.judge_prob(by_prompt[:, :, None], by_prompt[:, None], config)   # [N, K, K]: P(y_i > y_j | x)
    win_prob = estimate_win_rates(prefs).view(-1).to(device)        # [SPPO-5], [N*K]
    ids, mask = data.join(rows, responses.to(device))
    ref_logps, _ = sequence_logps_all(pi_t, ids, mask)               # pi_t is frozen: its log-probs once
    sampling_seconds = time.time() - t0

    optimizer = Adam(policy.parameters(), lr=lr)
    policy.train()
    for _ in tqdm(range(steps), desc=f"iteration {iteration}: fitting", disable=None, leave=False):
        idx = torch.randint(0, ids.shape[0], (batch_size,), generator=batch_order).to(device)
        policy_logps, _ = sequence_logps(policy, *trim(ids[idx], mask[idx]))
        losses = sppo_loss(policy_logps, ref_logps[idx], win_prob[idx], eta)   # [SPPO-6]
        loss = losses.mean()
        check_loss(loss, len(log_rows), phase=f"training, iteration {iteration}")   # a NaN stops the run here
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        logratios = (policy_logps.detach() - ref_logps[idx])
        above = win_prob[idx] > 0.5                       # samples that beat pi_t more often than not
        log_rows.append({
            "step": len(log_rows), "iteration": iteration, "loss": loss.item(),
            "logps/policy": policy_logps.mean().item(), "logps/ref": ref_logps[idx].mean().item(),
            "logratios/mean": logratios.mean().item(),
            # TRL's reward beta * log-ratio with beta = 1/eta: the fitted eta^-1 log-ratio, whose target is P - 1/2
            "rewards/above_half": (logratios[above] / eta).mean().item() if above.any() else 0.0,
            "rewards/below_half": (logratios[~above] / eta).mean().item() if (~above).any() else 0.0,
            # the share of samples whose log-ratio already has the sign of its target eta (P - 1/2)
            "rewards/accuracies": ((logratios > 0) == above).float().mean().item()})
    policy.eval()
    fitted, _ = sequence_logps_all(policy, ids, mask)
    return pi_t, {"iteration": iteration, "samples": ids.shape[0], "steps": steps,
                  "win_prob_mean": win_prob.mean().item(),          # 1/2 by construction (step 5 of the derivation)
                  "win_prob_std": win_prob.std().item(),            # how much the targets vary: the signal
                  "sample_score": data.score_responses(responses).mean().item(),
                  "loss_before": sppo_loss(ref_logps, ref_logps, win_prob, eta).mean().item(),   # pi_theta = pi_t
                  "loss_after": sppo_loss(fitted, ref_logps, win_prob, eta).mean().item(),
                  "train_seconds": time.time() - t0, "sampling_seconds": sampling_seconds}


def hard_fit(policy, ref, pairs, *, eta, steps, batch_size, lr, device, batch_order, log_rows):
    """--variant hard: [SPPO-9] on offline pairs, pi_ref = the SFT model (TRL's loss_type="sppo_hard")."""
    t0 = time.time()
    ref_chosen, ref_rejected = (logps.to(device) for logps in data.pair_logps_all(ref, pairs, device)[:2])
    optimizer = Adam(policy.parameters(), lr=lr)
    policy.train()
    n_pairs = pairs["chosen_ids"].shape[0]
    for _ in tqdm(range(steps), desc="SPPO (hard)", disable=None):
        idx = torch.randint(0, n_pairs, (batch_size,), generator=batch_order)
        batch = data.pair_batch(pairs, idx, device)
        idx = idx.to(device)
        policy_chosen, policy_rejected, _, _ = pair_logps(policy, **batch)
        losses = sppo_hard_loss(policy_chosen, policy_rejected, ref_chosen[idx], ref_rejected[idx], eta)
        loss = losses.mean()
        check_loss(loss, len(log_rows), steps)   # a NaN stops the run here, with one line (model.check_loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        chosen_rewards = (policy_chosen.detach() - ref_chosen[idx]) / eta       # TRL: beta * log-ratio, beta = 1/eta
        rejected_rewards = (policy_rejected.detach() - ref_rejected[idx]) / eta  # targets: +1/2 and -1/2
        log_rows.append({**data.pair_log_row(len(log_rows), loss, chosen_rewards, rejected_rewards, policy_chosen,
                                             policy_rejected), "iteration": 1})
    policy.eval()
    return {"iteration": 1, "samples": n_pairs, "steps": steps, "train_seconds": time.time() - t0,
            "sampling_seconds": 0.0}


# ----------------------------------------------------------------------------------------------------
# The game under --judge cyclic: the last iterate and the average of the iterates
# ----------------------------------------------------------------------------------------------------
#
# With preferences in a circle (--judge cyclic) there is no best review, only an equilibrium: school shares of 1/3
# each [Nash]. Multiplicative weights [SPPO-2] moves mass to the school that beats the current policy, so the LAST
# iterate goes round the circle; Theorem 4.1 [SPPO-Thm4.1] bounds the AVERAGE of the iterates (pick one of
# pi_1..pi_T at random, sample from it). Each iteration reports both: school shares and exploitability.

@torch.no_grad()
def sample_mixture(models, prompts, generator):
    """One response per prompt row from the AVERAGE of `models`: each row picks one model uniformly at random,
    then samples from it. Returns responses [N, MAX_RESPONSE] and the picks [N], on the CPU."""
    pick = torch.randint(len(models), (prompts.shape[0],), generator=generator, device=prompts.device)
    responses = torch.zeros(prompts.shape[0], data.MAX_RESPONSE, dtype=torch.long, device=prompts.device)
    for i, m in enumerate(models):
        rows = (pick == i).nonzero().squeeze(1)
        if len(rows):
            responses[rows] = sample(m, prompts[rows], data.MAX_RESPONSE, data.EOS_ID, data.BANNED_IN_RESPONSE,
                                     generator=generator)
    return responses.cpu(), pick.cpu()


def game_stats(iterates, result, task, device, n_samples, seed):
    """One iteration's game: the last iterate's shares and exploitability (from the evaluation `result`) and
    those of the average of `iterates` (pi_1..pi_{t+1}), from n_samples of the mixture on held-out prompts."""
    prompts, generator = task.eval_prompts(n_samples).to(device), torch.Generator(device).manual_seed(20_000 + seed)
    shares = data.school_shares(sample_mixture(iterates, prompts, generator)[0])
    return {"school_shares": result["school_shares"], "exploitability": result["exploitability"],
            "school_shares_average": shares.tolist(),
            "exploitability_average": data.school_exploitability(shares, task.config.cycle_prob)}


def print_game(table, metrics):
    """The school shares per iteration as charts (the last iterate, the average), then the numbers."""
    sft = metrics["sft_school_shares"]
    for key, title in (("school_shares", "school shares of the last iterate pi_{t+1}"),
                       ("school_shares_average", "school shares of the average of pi_1..pi_{t+1}")):
        series = [(letter, school, [shares[i] for shares in [sft] + [r[key] for r in table]])
                  for i, (letter, school) in enumerate(zip("sac", data.SCHOOLS))]
        print(*data.chart(series, f"\n{title}, by iteration (column 0: SFT)", height=11, lo=0.0, hi=1.0), sep="\n")
    shares = lambda v: " / ".join(f"{x:.2f}" for x in v[:3])
    start = {"iteration": 0, "school_shares": sft, "school_shares_average": sft,
             "exploitability": metrics["sft_exploitability"], "exploitability_average": metrics["sft_exploitability"]}
    data.print_table(["iteration", "last: story / acting / craft", "exploitability", "average: story / acting / craft",
                      "exploitability"], [[r["iteration"], shares(r["school_shares"]), f"{r['exploitability']:.3f}",
                                           shares(r["school_shares_average"]), f"{r['exploitability_average']:.3f}"]
                                          for r in [start] + table])


def main():
    args = parser.parse_args()
    if (args.exact or args.variant == "selfplay") and args.k < 2:
        parser.error("--k must be at least 2: one sample per prompt only ties with itself (P_hat = 1/2, no signal)")
    if args.exact:
        return run_exact()
    if args.steps is None:
        args.steps = STEPS[args.variant]

    # ------------------------------------------------------------------------------------------------
    # Data and models
    # ------------------------------------------------------------------------------------------------
    device, task, policy, sft_info = data.start_run(args)   # device, output folder, task, SFT model
    memory = PeakMemory(policy)            # from here on: what training adds to the SFT model
    sft = frozen_copy(policy)              # pi_1 (self-play) or pi_ref (hard), and the evaluation's baseline
    policy.eval()

    # ------------------------------------------------------------------------------------------------
    # Training loop: Algorithm 1, one self-play iteration after another, each one evaluated
    # ------------------------------------------------------------------------------------------------
    sampler = torch.Generator(device).manual_seed(args.seed)   # self-play sampling: its own RNG
    batch_order = torch.Generator().manual_seed(args.seed)     # CPU generator: same batches on any device
    iterations = args.iterations if args.variant == "selfplay" else 1
    log_rows, table, iterates, sft_side, eval_seconds = [], [], [sft], None, 0.0   # iterates: pi_1, pi_2, ...
    t0 = time.time()
    for t in range(1, iterations + 1):
        if args.variant == "selfplay":
            pi_t, stats = self_play_iteration(
                policy, task.train_prompts, iteration=t, k=args.k, eta=args.eta, config=task.config,
                steps=args.steps, batch_size=args.batch_size, lr=args.lr, device=device, sampler=sampler,
                batch_order=batch_order, log_rows=log_rows)
        else:
            pi_t, stats = sft, hard_fit(policy, sft, task.pairs, eta=args.eta, steps=args.steps,
                                        batch_size=args.batch_size, lr=args.lr, device=device,
                                        batch_order=batch_order, log_rows=log_rows)
        check_weights(policy)
        # Held-out evaluation of pi_{t+1}: against SFT, and against pi_t (did this iteration improve?): pi_{t+1}'s
        # reviews are the same in both, and so are the SFT's in every iteration; at t = 1, pi_t is the SFT model.
        t1 = time.time()
        sft_side = sft_side or data.evaluate_sft(sft, task, device, args.eval_samples, args.seed)
        result = data.evaluate(policy, sft, sft_side, task, device, args.eval_samples, args.seed)
        previous = data.heldout_reviews(pi_t, task, device, args.eval_samples, args.seed + 1)[1] if t > 1 else None
        stats.update(win_rate_vs_sft=result["win_rate_vs_sft"], score=result["score"], length=result["length"],
                     kl_to_sft=result["kl_to_sft"], win_rate_vs_prev=result["win_rate_vs_sft"] if t == 1 else
                     data.win_rate(result["samples"], previous, task.config))
        if "exploitability" in result:   # --judge cyclic: the game, the last iterate and the average
            iterates.append(frozen_copy(policy))
            stats.update(game_stats(iterates, result, task, device, args.eval_samples, args.seed))
        eval_seconds += time.time() - t1
        table.append(stats)
        tqdm.write(f"iteration {t}: win rate vs pi_{t} {stats['win_rate_vs_prev']:.3f}, vs SFT "
                   f"{stats['win_rate_vs_sft']:.3f}, score {stats['score']:+.3f}, KL to SFT {stats['kl_to_sft']:.2f}"
                   + (f", [SPPO-6] loss {stats['loss_before']:.2f} -> {stats['loss_after']:.2f}"
                      if "loss_before" in stats else ""), file=sys.stderr)

    # ------------------------------------------------------------------------------------------------
    # Evaluation and summary (`result` is the last iteration's evaluation against SFT)
    # ------------------------------------------------------------------------------------------------
    # The implicit reward (1/eta) log pi_theta/pi_sft on held-out pairs: after T iterations of [SPPO-2],
    # log pi_{T+1}/pi_1 = eta sum_t P(y > pi_t|x) - sum_t log Z_t, a cumulative win rate.
    t1 = time.time()
    heldout_policy = data.pair_logps_all(policy, task.heldout_pairs, device)
    heldout_sft = data.pair_logps_all(sft, task.heldout_pairs, device)
    ranking = data.ranking_metrics((heldout_policy[0] - heldout_sft[0]) / args.eta,
                                   (heldout_policy[1] - heldout_sft[1]) / args.eta, *heldout_policy)
    # The same for the SFT model, where training started: (1/eta) log pi_1/pi_1 is 0 for every response
    sft_ranking = data.ranking_metrics(torch.zeros_like(heldout_sft[0]), torch.zeros_like(heldout_sft[1]),
                                       *heldout_sft)
    train_seconds = sum(r["train_seconds"] for r in table)   # self-play's sampling and the judge included
    metrics = {"method": "sppo", "seed": args.seed, "device": device.type, "steps": len(log_rows),
               **result, **ranking, "eta": args.eta, "k": args.k if args.variant == "selfplay" else None,
               "iterations": iterations, "variant": args.variant, "steps_per_iteration": args.steps, "lr": args.lr,
               "batch_size": args.batch_size,
               "win_rate_vs_sft_per_iteration": [r["win_rate_vs_sft"] for r in table],
               "win_rate_vs_prev_per_iteration": [r["win_rate_vs_prev"] for r in table],
               "sft_ce_before": sft_info["ce_before"], "sft_ce_after": sft_info["ce_after"],
               "final_loss": log_rows[-1]["loss"] if log_rows else None,
               "startup_seconds": t0 - START, "train_seconds": train_seconds,
               "sampling_seconds": sum(r["sampling_seconds"] for r in table),
               "eval_seconds": eval_seconds + time.time() - t1,
               "seconds_per_step": train_seconds / max(len(log_rows), 1), "peak_memory_mb": memory.mb()}
    if "exploitability" in result:   # --judge cyclic: the game's numbers, per iteration
        metrics.update({name: [r[key] for r in table] for name, key in (
            ("exploitability_last", "exploitability"), ("exploitability_average", "exploitability_average"),
            ("school_shares_per_iteration", "school_shares"),
            ("school_shares_average_per_iteration", "school_shares_average"))})
    metrics["wall_seconds"] = time.time() - START
    save_run(args.out, policy, args, {k: v for k, v in metrics.items() if not torch.is_tensor(v)}, log_rows)

    loss = f"SPPO loss [{'SPPO-6' if args.variant == 'selfplay' else 'SPPO-9'}] per step ({iterations} iteration(s))"
    print(*data.chart([r["loss"] for r in log_rows], loss), sep="\n")
    print(*data.chart([0.5] + [r["win_rate_vs_sft"] for r in table],
                      "win rate vs SFT after each iteration (first column: SFT itself, 0.5)"), sep="\n")
    print("\nPer iteration. Samples: pi_t's own, on training prompts; their win rates P_hat average 1/2 by "
          "construction\n(derivation, step 5), their spread is the signal. Win rates: pi_{t+1} on held-out prompts.")
    columns = (("iteration", "iteration", "{}"), ("P_hat mean", "win_prob_mean", "{:.3f}"),
               ("P_hat std", "win_prob_std", "{:.3f}"), ("sample score", "sample_score", "{:+.3f}"),
               ("loss before", "loss_before", "{:.3f}"), ("loss after", "loss_after", "{:.3f}"),
               ("win vs pi_t", "win_rate_vs_prev", "{:.3f}"), ("win vs SFT", "win_rate_vs_sft", "{:.3f}"),
               ("score", "score", "{:+.3f}"), ("length", "length", "{:.2f}"), ("KL to SFT", "kl_to_sft", "{:.2f}"))
    data.print_table([name for name, _, _ in columns], [[spec.format(r[key]) if r.get(key) is not None else "-"
                                                         for _, key, spec in columns] for r in table])
    if "exploitability" in result:
        print_game(table, metrics)
    print()
    data.print_summary("SPPO", metrics, sft_ranking, args.out, "(1/eta) log pi_theta/pi_1")


# ----------------------------------------------------------------------------------------------------
# Exact mode (--exact): the same sppo_loss on a table policy, checked against [SPPO-2] and [SPPO-Thm4.1]
# ----------------------------------------------------------------------------------------------------
#
# Step 4 of the derivation says: over a policy class that can represent [SPPO-2], the minimiser of the
# regression [SPPO-4] IS the multiplicative-weights step                                         [MW-exact]
#     pi_{t+1}(y) = pi_t(y) exp( eta P(y > pi_t) ) / Z_t,     Z_t = sum_y pi_t(y) exp( eta P(y > pi_t) )
# because the loss is 0 there. On the 27-review table of data.ExactTask everything in it is a finite sum:
# P(y > pi_t) = sum_y' P(y > y') pi_t(y') from the judge's full matrix, log Z_t, and the expectation over
# y ~ pi_t. Each iteration fits three tables from the same frozen pi_t, with this file's sppo_loss, unchanged:
#   1. [SPPO-4], exact log Z. sppo_loss's target is eta (win_prob - 1/2); handing it the shifted win rate
#      P(y > pi_t) + 1/2 - log Z_t / eta makes that target eta P(y > pi_t) - log Z_t, [SPPO-3]'s right-hand side.
#      Expected over y ~ pi_t: the fit should be the MW step (mw_kl_exact_logz = KL(fit || MW step)).
#   2. [SPPO-6], log Z replaced by eta/2: win_prob = P(y > pi_t) itself. The targets then do not describe a
#      normalised distribution, so the fit is some other one: mw_kl_half measures how far from the MW step.
#   3. [SPPO-5] + [SPPO-6], what sppo.py does with the GPT: K responses per prompt sampled from pi_t by
#      model.sample (the table answers like a GPT), win rates against those K, the mean loss over the samples.
# The chain continues from fit 1 (the MW step): toward the best reviews on the Bradley-Terry judge; on the cyclic
# judge its last iterate circles (and slowly spirals out) while the average closes in (the game, above).

# eta ~ 1/sqrt(T), as in Theorem 4.1. steps: Newton steps per fit, at most (a fit takes 5 to 10)
EXACT_DEFAULTS = {"eta": 1.0, "iterations": 40, "steps": 50, "out": "out/sppo_exact"}
EXACT_SAMPLE_PROMPTS = 288        # prompts for the K-sample fit: as many as the GPT task's training prompts


def fit_exact(ex, pi_t, index, win_prob, weights, eta, steps):
    """Minimise sum_i weights[i] * sppo_loss(log pi(y_i), log pi_t(y_i), win_prob[i], eta) over a table policy
    that starts at the frozen pi_t (a TablePolicy); y_i is listed review index[i]. Returns its distribution."""
    policy = ex.table(pi_t.probs())
    ref_logps = pi_t.log_probs()                                     # [C] log pi_t(y|x), float64

    def expected_loss():
        policy_logps = policy.log_probs()                            # [C] log pi_theta(y|x): sequence_logps's sums
        return (weights * sppo_loss(policy_logps[index], ref_logps[index], win_prob, eta)).sum()

    minimise(policy.logits, expected_loss, steps)
    return policy.probs()


def run_exact():
    args, ex = data.start_exact(parser, EXACT_DEFAULTS)
    everyone = torch.arange(ex.n)
    sampler = torch.Generator().manual_seed(args.seed)
    prompts = ex.prompts.expand(EXACT_SAMPLE_PROMPTS * args.k, -1)   # K rows for each prompt
    pi_t = frozen_copy(ex.table())                                   # pi_1 = the SFT table
    iterates, rows = [pi_t.probs()], []
    for t in range(1, args.iterations + 1):
        probs_t = iterates[-1]
        win = ex.win_rates(probs_t)                                  # [C] P(y > pi_t), exact
        log_z = torch.logsumexp(probs_t.log() + args.eta * win, dim=0)             # log Z_t, exact
        mw_step = torch.softmax(probs_t.log() + args.eta * win, dim=0)             # [SPPO-2], exact
        # 1. [SPPO-4] with the exact log Z, expected over y ~ pi_t
        fit_exact_logz = fit_exact(ex, pi_t, everyone, win + 0.5 - log_z / args.eta, probs_t, args.eta, args.steps)
        # 2. [SPPO-6]: log Z -> eta/2
        fit_half = fit_exact(ex, pi_t, everyone, win, probs_t, args.eta, args.steps)
        # 3. [SPPO-5] + [SPPO-6]: K samples per prompt from pi_t, win rates against those K (the self-tie included)
        responses = sample(pi_t, prompts, data.MAX_RESPONSE, data.EOS_ID, data.BANNED_IN_RESPONSE, generator=sampler,
                           batch_size=prompts.shape[0], use_cache=False)
        index = ex.index_of(responses).view(-1, args.k)             # [N, K] which listed review each sample is
        win_k = estimate_win_rates(ex.prefs[index[:, :, None], index[:, None, :]])  # [N, K] P_hat(y_i > pi_t)
        fit_k = fit_exact(ex, pi_t, index.view(-1), win_k.view(-1),
                          torch.full((index.numel(),), 1.0 / index.numel(), dtype=torch.float64), args.eta, args.steps)
        iterates.append(fit_exact_logz)
        pi_t = frozen_copy(ex.table(fit_exact_logz))                 # pi_{t+1}
        average = torch.stack(iterates).mean(0)                      # (1/(t+1)) sum_{s <= t+1} pi_s
        rows.append({"iteration": t, "mw_kl_exact_logz": data.kl(fit_exact_logz, mw_step),
                     "mw_kl_no_step": data.kl(probs_t, mw_step),   # what a fit that never moved would score
                     "mw_kl_half": data.kl(fit_half, mw_step), "mw_kl_k": data.kl(fit_k, mw_step),
                     "exploitability_last": ex.exploitability(fit_exact_logz),
                     "exploitability_average": ex.exploitability(average),
                     "best_mass": fit_exact_logz[ex.best()].sum().item(),
                     "school_shares": ex.school_shares(fit_exact_logz).tolist(),
                     "school_shares_average": ex.school_shares(average).tolist()})
    keys = ("mw_kl_exact_logz", "mw_kl_no_step", "mw_kl_half", "mw_kl_k", "exploitability_last",
            "exploitability_average", "best_mass", "school_shares", "school_shares_average")
    metrics = {"method": "sppo", "exact": True, "judge": ex.config.judge, "eta": args.eta, "k": args.k,
               "iterations": args.iterations, "tau": ex.config.tau, "seed": args.seed,
               "mw_kl_exact_logz": max(r["mw_kl_exact_logz"] for r in rows),
               # the fit against not moving at all, at its worst iteration (a KL below 1e-13 counts as closed)
               "mw_kl_ratio": max([r["mw_kl_exact_logz"] / r["mw_kl_no_step"] for r in rows
                                   if r["mw_kl_exact_logz"] >= 1e-13], default=0.0),
               "exploitability_sft": ex.exploitability(iterates[0]),
               "best_mass_sft": iterates[0][ex.best()].sum().item(),
               "school_shares_sft": ex.school_shares(iterates[0]).tolist(),
               **{f"{key}_per_iteration" if key.startswith("mw_kl_exact") else key: [r[key] for r in rows]
                  for key in keys},
               "policy_probs": iterates[-1].tolist(), "average_probs": torch.stack(iterates).mean(0).tolist()}
    done = data.save_exact(args, ex, metrics, START)

    print(f"exact SPPO: a table over {ex.n} reviews, judge {ex.config.judge}, eta {args.eta}, {args.iterations} "
          f"iterations, K = {args.k} samples for each of {EXACT_SAMPLE_PROMPTS} prompts\n")
    series = [(c, name, [metrics["exploitability_sft"]] + metrics[key]) for c, name, key in (
        ("l", "the last iterate pi_{t+1}", "exploitability_last"), ("a", "the average", "exploitability_average"))]
    print(*data.chart(series, "exploitability (first value: SFT)"), sep="\n")
    print("\nPer iteration: KL(pi_t || the exact MW step [SPPO-2]), what not moving scores, and KL(fit || MW step) of\n"
          "the three fits; then the chain (it goes on from fit 1).")
    shown = [r for r in rows if r["iteration"] <= 5 or r["iteration"] % 5 == 0 or r["iteration"] == len(rows)]
    data.print_table(
        ["t", "no step", "exact log Z", "log Z = eta/2", f"K = {args.k} samples", "best mass",
         "shares (story/acting/craft)", "exploit. last", "exploit. average"],
        [[r["iteration"], f"{r['mw_kl_no_step']:.1e}", f"{r['mw_kl_exact_logz']:.1e}", f"{r['mw_kl_half']:.1e}",
          f"{r['mw_kl_k']:.1e}", f"{r['best_mass']:.3f}", " / ".join(f"{x:.2f}" for x in r["school_shares"]),
          f"{r['exploitability_last']:.3f}", f"{r['exploitability_average']:.3f}"] for r in shown])
    print(f"\nfit with the exact log Z: KL to the MW step at most {metrics['mw_kl_exact_logz']:.1e}; above 1e-13, at "
          f"most {metrics['mw_kl_ratio']:.1e} of what not moving scores (goal <= 1e-3)")
    last, average = metrics["exploitability_last"][-1], metrics["exploitability_average"][-1]
    print(f"exploitability: SFT {metrics['exploitability_sft']:.3f}, last iterate {last:.3f}, average {average:.3f}")
    print(done)


if __name__ == "__main__":
    run(main)   # model.run: a fault (Ctrl-C, NaN, full disk) ends in one line, not a traceback
