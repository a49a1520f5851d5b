"""
dpo.py: Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290), from scratch.

The method in five lines:
  1. Start from the SFT model pi_sft and keep a frozen copy of it as the reference, pi_ref.
  2. For a preference pair (x, y_w, y_l), sum log pi(y|x) over the response tokens under pi_theta and pi_ref.
  3. Read a reward off the policy itself: r(x, y) = beta log pi_theta(y|x) / pi_ref(y|x)   [DPO-2]
  4. Fit it to the preferences by Bradley-Terry maximum likelihood: L = -log sigma(r(x, y_w) - r(x, y_l))  [DPO-1]
  5. No reward model and no sampling during training: one supervised loss on offline pairs.

Run:       python dpo.py                      (CPU, 2 cores: seconds once out/sft holds the SFT model; README)
           python dpo.py --beta 0.5 --device cuda
Expected:  win rate against the SFT model >= 0.9 on held-out prompts (README, "Results").
Departures from the paper: a toy judge instead of a sentiment classifier (data.py), a 0.1 M-parameter GPT,
Adam without warm-up; the loss itself is the paper's equation 7 exactly.
"""

import argparse
import dataclasses
import time

START = time.time()   # the run's clock starts before torch is imported: start-up includes it

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
from model import Adam, PeakMemory, add_run_args, check_loss, check_weights, frozen_copy, minimise, pair_logps, \
    positive_float, run, save_run

# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------

parser = argparse.ArgumentParser(description="DPO on the toy sentiment task (arXiv 2305.18290)")
g = parser.add_argument_group("DPO")
g.add_argument("--beta", type=positive_float, default=0.1,
               help="KL strength beta in [DPO-1]: smaller lets the policy move further from pi_ref "
                    "(higher score, larger KL); larger keeps it close (default: %(default)s)")
g.add_argument("--reference-free", action="store_true",
               help="exercise: drop pi_ref from the loss (log pi_ref = 0), so the reward is beta log pi_theta(y|x), "
                    "summed; pi_ref is still kept to evaluate against the SFT model")
g.add_argument("--precompute-ref", action="store_true",
               help="log pi_ref(y|x) of every training pair computed once, before the first step, not in every step "
                    "(TRL's precompute_ref_log_probs): pi_ref is frozen, so the numbers are the same")
g.add_argument("--exact", action="store_true",
               help="check [DPO-opt] exactly on a table policy over 27 listed reviews, trained by the same dpo_loss "
                    "to its minimum; defaults become --beta 1 --steps 100 (Newton steps at most) --out out/dpo_exact")
add_run_args(parser, "dpo", steps=200, batch_size=64, lr=3e-4)
data.add_task_args(parser)

# ----------------------------------------------------------------------------------------------------
# The objective (the heart of this file)
# ----------------------------------------------------------------------------------------------------
#
# Derivation, DPO paper section 4, one equation per step.
#
# 1. RLHF maximises reward while staying close to the reference (KL-regularised):
#        max_pi  E_{x~D, y~pi(.|x)}[ r(x, y) ]  -  beta KL( pi(.|x) || pi_ref(.|x) )
# 2. For any reward r this has a closed-form optimum (the Gibbs distribution):
#        pi_r(y|x) = pi_ref(y|x) exp( r(x, y) / beta ) / Z(x),    Z(x) = sum_y pi_ref(y|x) exp( r(x, y) / beta )
# 3. Take logs and solve for r: the reward is written through the policy it induces      [DPO-2]
#        r(x, y) = beta log pi_r(y|x) / pi_ref(y|x) + beta log Z(x)
#    Z(x) sums over every possible response: intractable. The next step removes it.
# 4. Bradley-Terry says preferences depend only on reward DIFFERENCES:
#        p(y_w > y_l | x) = sigma( r(x, y_w) - r(x, y_l) )
#    Put [DPO-2] in: beta log Z(x) appears in both rewards and cancels (same x).
# 5. Parameterise pi_r by the network pi_theta and maximise the likelihood of the preferences:   [DPO-1]
#        L_DPO(pi_theta; pi_ref) = -E_{(x, y_w, y_l)~D}[ log sigma( beta log pi_theta(y_w|x)/pi_ref(y_w|x)
#                                                                  - beta log pi_theta(y_l|x)/pi_ref(y_l|x) ) ]
#    It is a logistic regression whose logit is the implicit reward margin.
#
# Gradient (paper section 4, "What does the DPO update do?"): with r_hat = beta log pi_theta/pi_ref,
#     grad L = -beta E[ sigma(r_hat(y_l) - r_hat(y_w)) (grad log pi_theta(y_w|x) - grad log pi_theta(y_l|x)) ]
# Each pair is weighted by how WRONG the implicit reward orders it; ordered pairs stop pulling.
#
# log pi(y|x) is a SUM over the response tokens (model.sequence_logps): the prompt and the padding never
# count. F.logsigmoid(z) stays finite for any z, where torch.log(torch.sigmoid(z)) gives -inf below
# z ~ -104 in float32 and its gradient becomes NaN.

def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """Per-example DPO losses and implicit rewards, each [B].

    *_logps  [B]  log pi(y|x) summed over response tokens, for y_w (chosen) and y_l (rejected)
    beta     the KL strength of step 1
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps         # log pi_theta(y_w|x)/pi_ref(y_w|x)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps   # log pi_theta(y_l|x)/pi_ref(y_l|x)
    logits = beta * (chosen_logratios - rejected_logratios)           # r(x, y_w) - r(x, y_l), Z cancelled
    losses = -F.logsigmoid(logits)                                    # [DPO-1]
    chosen_rewards = beta * chosen_logratios.detach()                 # [DPO-2] without beta log Z(x)
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def main():
    args = parser.parse_args()
    if args.precompute_ref and args.reference_free:
        parser.error("--precompute-ref with --reference-free: there is no reference to precompute")
    if args.exact:
        return run_exact()

    # ------------------------------------------------------------------------------------------------
    # Data and models
    # ------------------------------------------------------------------------------------------------
    device, task, policy, sft_info = data.start_run(args)   # device, output folder, task, SFT model
    memory = PeakMemory(policy)            # from here on: what training adds to the SFT model
    ref = frozen_copy(policy)              # pi_ref: the SFT model, frozen (eval mode, no gradients)
    policy.train()
    optimizer = Adam(policy.parameters(), lr=args.lr)

    # ------------------------------------------------------------------------------------------------
    # Training loop
    # ------------------------------------------------------------------------------------------------
    batch_order = torch.Generator().manual_seed(args.seed)   # CPU generator: same batches on any device
    n_pairs = task.pairs["chosen_ids"].shape[0]
    log_rows = []
    t0 = time.time()
    if args.precompute_ref:
        # pi_ref never changes, so log pi_ref(y|x) of each pair is a constant: compute all of them in one
        # pass (no gradients, large batches) and look them up by index in the loop. Its time counts as training.
        ref_chosen_all, ref_rejected_all, _, _ = data.pair_logps_all(ref, task.pairs, device)   # [n_pairs] each
        ref_chosen_all, ref_rejected_all = ref_chosen_all.to(device), ref_rejected_all.to(device)
    precompute_seconds = time.time() - t0 if args.precompute_ref else None
    for step in tqdm(range(args.steps), desc="DPO", disable=None):
        idx = torch.randint(0, n_pairs, (args.batch_size,), generator=batch_order)
        batch = data.pair_batch(task.pairs, idx, device)
        policy_chosen_logps, policy_rejected_logps, _, _ = pair_logps(policy, **batch)
        if args.reference_free:   # exercise: log pi_ref(y|x) := 0
            ref_chosen_logps = torch.zeros_like(policy_chosen_logps)
            ref_rejected_logps = torch.zeros_like(policy_rejected_logps)
        elif args.precompute_ref:   # looked up: no reference forward pass in the step
            ref_chosen_logps, ref_rejected_logps = ref_chosen_all[idx.to(device)], ref_rejected_all[idx.to(device)]
        else:
            with torch.no_grad():   # the reference forward: DPO's extra cost per step
                ref_chosen_logps, ref_rejected_logps, _, _ = pair_logps(ref, **batch)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, args.beta)
        loss = losses.mean()
        check_loss(loss, step, args.steps)   # a NaN stops the run here, with one line (model.check_loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        log_rows.append(data.pair_log_row(step, loss, chosen_rewards, rejected_rewards,
                                          policy_chosen_logps, policy_rejected_logps))
    train_seconds = time.time() - t0
    check_weights(policy)

    # ------------------------------------------------------------------------------------------------
    # Evaluation and summary
    # ------------------------------------------------------------------------------------------------
    policy.eval()
    t1 = time.time()
    sft_side = data.evaluate_sft(ref, task, device, args.eval_samples, args.seed)   # ref is the SFT model
    result = data.evaluate(policy, ref, sft_side, task, device, args.eval_samples, args.seed)
    heldout_policy = data.pair_logps_all(policy, task.heldout_pairs, device)
    heldout_sft = data.pair_logps_all(ref, task.heldout_pairs, device)
    heldout_ref = tuple(torch.zeros_like(t) for t in heldout_sft) if args.reference_free else heldout_sft
    _, chosen_rewards, rejected_rewards = dpo_loss(heldout_policy[0], heldout_policy[1],
                                                   heldout_ref[0], heldout_ref[1], args.beta)
    # the same for the SFT model, where training started (pi_theta = pi_ref: its reward is 0 everywhere)
    _, sft_chosen, sft_rejected = dpo_loss(heldout_sft[0], heldout_sft[1], heldout_ref[0], heldout_ref[1], args.beta)
    metrics = {"method": "dpo", "seed": args.seed, "device": device.type, "steps": args.steps,
               **result, **data.ranking_metrics(chosen_rewards, rejected_rewards, *heldout_policy),
               "beta": args.beta, "reference_free": args.reference_free, "precompute_ref": args.precompute_ref,
               "ref_precompute_seconds": precompute_seconds, "lr": args.lr, "batch_size": args.batch_size,
               "sft_ce_before": sft_info["ce_before"], "sft_ce_after": sft_info["ce_after"],
               "final_loss": log_rows[-1]["loss"] if log_rows else None,
               "startup_seconds": t0 - START, "train_seconds": train_seconds, "eval_seconds": time.time() - t1,
               "seconds_per_step": train_seconds / max(args.steps, 1), "peak_memory_mb": memory.mb(),
               "wall_seconds": time.time() - START}
    save_run(args.out, policy, args, {k: v for k, v in metrics.items() if not torch.is_tensor(v)}, log_rows)

    print(*data.chart([r["loss"] for r in log_rows], "DPO loss [DPO-1] per step"), sep="\n")
    print(*data.chart([r["rewards/margins"] for r in log_rows], "reward margin r(y_w) - r(y_l) per step"), sep="\n")
    # Both log-likelihoods can FALL: the loss only asks the chosen one to end above the rejected one, relative
    # to pi_ref (README, "Reading your logs")
    print(*data.chart([("w", "log pi(y_w|x)", [r["logps/chosen"] for r in log_rows]),
                       ("l", "log pi(y_l|x)", [r["logps/rejected"] for r in log_rows])],
                      "logps/chosen and logps/rejected per step (batch means, nats)"), sep="\n")
    print()
    data.print_summary("DPO", metrics, data.ranking_metrics(sft_chosen, sft_rejected, *heldout_sft), args.out,
                       None if args.reference_free else "beta log pi_theta/pi_ref")


# ----------------------------------------------------------------------------------------------------
# Exact mode (--exact): the same dpo_loss on a table policy, checked against [DPO-opt]
# ----------------------------------------------------------------------------------------------------
#
# The derivation above ends in a promise: with enough data, the minimiser of L_DPO is the optimum of the
# KL-regularised RLHF problem of step 1,                                                          [DPO-opt]
#     pi*(y|x) = pi_ref(y|x) exp( r(x, y) / beta ) / Z(x)
# (DPO paper, section 4 and Theorem 1), where r is the reward of the Bradley-Terry model the labels come
# from: data.py's judge draws P(a > b) = sigma((s_a - s_b)/tau), so r = s/tau up to a constant, which Z absorbs.
# A GPT cannot be checked against that: it cannot represent every distribution, and its responses cannot be
# listed. data.ExactTask lists 27 reviews; model.TablePolicy holds one logit per review, and dpo_loss trains it
# unchanged, on the log-probs of the chosen and rejected reviews. What changes is the data and the optimiser:
#   - the POPULATION loss: every ordered pair (y_w, y_l) weighted by its probability in the data (two reviews
#     from pi_ref, the judge picks), E_D[...] as a finite sum; then the same with n_pairs sampled pairs;
#   - Newton's method on that deterministic loss (model.minimise), in float64, instead of Adam on minibatches:
#     we want the minimiser to the digits float64 can see, not a good policy in 200 steps.
# The IPO paper's point (arXiv 2310.12036, section 4.2) [IPO-4.2]: pi* depends on tau and beta only through
# their product (r/beta = s/(tau beta)): as the labels become deterministic (tau -> 0) the optimum puts all its
# mass on the best responses WHATEVER beta is, and with P exactly 0 or 1 the loss has no minimum (it falls for as
# long as float64 can see). beta regularises only through the label noise; the beta sweep shows both sides.
# Under --judge cyclic there is no reward and no pi*: the run reports its fit's exploitability in the game.

EXACT_DEFAULTS = {"beta": 1.0, "steps": 100, "out": "out/dpo_exact"}   # beta 0.1, tau 0.2: pi* near a point mass
IPO_BETAS = (0.1, 0.3, 1.0, 3.0)
DETERMINISTIC_TAU = 1e-3                        # P = sigmoid(0.5 / 1e-3) = 1 - 1e-217: no label is ever wrong


def fit_exact(ex, pairs, beta, steps):
    """Minimise the expected dpo_loss over `pairs` (chosen, rejected, weights: ExactTask.population_pairs or
    .sampled_pairs) for a table policy that starts at pi_ref = the SFT table. Returns its distribution [C]."""
    policy, ref = ex.table(), frozen_copy(ex.table())
    chosen, rejected, weights = pairs
    ref_logps = ref.log_probs()                                       # [C] log pi_ref(y|x), float64

    def expected_loss():
        policy_logps = policy.log_probs()                             # [C] log pi_theta(y|x): sequence_logps's sums
        losses, _, _ = dpo_loss(policy_logps[chosen], policy_logps[rejected],
                                ref_logps[chosen], ref_logps[rejected], beta)
        return (weights * losses).sum()   # E_D[ -log sigma(...) ], D = the pairs, weighted as the data draws them

    minimise(policy.logits, expected_loss, steps)
    return policy.probs()


def run_exact():
    args, ex = data.start_exact(parser, EXACT_DEFAULTS)
    best, cfg = ex.best(), ex.config
    # the population loss (all pairs, weighted as drawn) and n_pairs sampled pairs, both drawn from pi_ref
    trained = fit_exact(ex, ex.population_pairs(), args.beta, args.steps)
    finite = fit_exact(ex, ex.sampled_pairs(cfg.n_pairs, args.seed), args.beta, args.steps)
    metrics = {"method": "dpo", "exact": True, "judge": cfg.judge, "beta": args.beta, "tau": cfg.tau,
               "seed": args.seed, "n_pairs": cfg.n_pairs,
               "exploitability": ex.exploitability(trained), "exploitability_finite_data": ex.exploitability(finite),
               "exploitability_sft": ex.exploitability(ex.sft_probs),
               "school_shares": ex.school_shares(trained).tolist(),
               "school_shares_sft": ex.school_shares(ex.sft_probs).tolist(),
               "best_mass": trained[best].sum().item(), "best_mass_sft": ex.sft_probs[best].sum().item(),
               "mean_words": ex.mean_words(trained), "mean_words_sft": ex.mean_words(ex.sft_probs),
               "policy_probs": trained.tolist()}
    columns = {"pi_ref (SFT)": ex.sft_probs, "DPO, all pairs": trained, f"DPO, {cfg.n_pairs} pairs": finite}
    if ex.reward is not None:   # the Bradley-Terry judge: pi* exists
        optimum = columns["pi* [DPO-opt]"] = ex.dpo_optimum(args.beta)
        metrics.update(kl_to_optimum=data.kl(trained, optimum), kl_to_optimum_finite_data=data.kl(finite, optimum),
                       best_mass_optimum=optimum[best].sum().item())
        # [IPO-4.2]: the beta sweep, with this tau's noisy labels, and with deterministic ones (tau -> 0)
        sharp = data.ExactTask(dataclasses.replace(cfg, tau=DETERMINISTIC_TAU))
        sweep = [(b, fit_exact(ex, ex.population_pairs(), b, args.steps)[best].sum().item(),
                  ex.dpo_optimum(b)[best].sum().item(),
                  fit_exact(sharp, sharp.population_pairs(), b, args.steps)[best].sum().item()) for b in IPO_BETAS]
        metrics.update(ipo_betas=list(IPO_BETAS), deterministic_tau=DETERMINISTIC_TAU,
                       best_mass_noisy=[r[1] for r in sweep], best_mass_noisy_optimum=[r[2] for r in sweep],
                       best_mass_deterministic=[r[3] for r in sweep])
    done = data.save_exact(args, ex, metrics, START)

    print(f"exact DPO: a table over {ex.n} reviews, judge {cfg.judge}, beta {args.beta}, tau {cfg.tau}\n")
    data.print_exact_groups(ex, columns)
    if ex.reward is not None:
        print(f"\nKL(trained || pi*) = {metrics['kl_to_optimum']:.2e} nats on the population loss (goal <= 1e-3); "
              f"{metrics['kl_to_optimum_finite_data']:.2e} from {cfg.n_pairs} sampled pairs")
        print(f"\n[IPO-4.2] mass on the best reviews (score {ex.scores.max():+.1f}) at the minimum, by beta:")
        data.print_table(["beta", f"tau {cfg.tau}: trained", "pi* (closed form)",
                          f"deterministic labels (tau {DETERMINISTIC_TAU}): trained"],
                         [[b, f"{n:.4f}", f"{o:.4f}", f"{d:.4f}"] for b, n, o, d in sweep])
    print(done)


if __name__ == "__main__":
    run(main)   # model.run: a fault (Ctrl-C, NaN, full disk) ends in one line, not a traceback
