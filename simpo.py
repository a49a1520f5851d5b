"""
simpo.py: Simple Preference Optimization (Meng, Xia and Chen 2024, arXiv 2405.14734), from scratch.

The method in five lines:
  1. Start from the SFT model; there is NO reference model, frozen or otherwise.
  2. For a preference pair (x, y_w, y_l), sum log pi_theta(y|x) over the response tokens and count |y|.
  3. The reward is the generation metric itself, length-normalised: r(x, y) = (beta/|y|) log pi_theta(y|x)  [SimPO-2]
  4. Ask the chosen reward to win by a margin gamma: L = -log sigma(r(x, y_w) - r(x, y_l) - gamma)  [SimPO-4]
  5. One forward pass per step instead of DPO's two, and the reward orders responses as decoding does.

Run:       python simpo.py                    (CPU, 2 cores: seconds once out/sft holds the SFT model; README)
           python simpo.py --no-length-norm --length-bias 0.3   (watch the length grow)
Expected:  win rate against the SFT model >= 0.9 on held-out prompts (README, "Results").
Departures from the paper: a toy judge instead of human-preference data (data.py), a 0.1 M-parameter GPT,
beta and gamma re-tuned for 0.1 M parameters (see --beta); the loss itself is the paper's equation 6 exactly.
"""

import argparse
import time

START = time.time()   # the run's clock starts before torch is imported: start-up includes it

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
from model import Adam, PeakMemory, add_run_args, check_loss, check_weights, minimise, nonneg_float, pair_logps, \
    positive_float, run, save_run

# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------

parser = argparse.ArgumentParser(description="SimPO on the toy sentiment task (arXiv 2405.14734)")
g = parser.add_argument_group("SimPO")
g.add_argument("--beta", type=positive_float, default=2.0,
               help="reward scale beta in [SimPO-2]; the paper uses 2 to 2.5 and so do we: larger sharpens "
                    "the preference and moves the policy faster (default: %(default)s)")
g.add_argument("--gamma", type=nonneg_float, default=1.0,
               help="target reward margin gamma in [SimPO-3]; official gamma/beta 0.1 to 0.8 (their README: start at "
                    "0.5), ours 0.5; larger keeps pushing pairs already ordered (default: %(default)s)")
g.add_argument("--no-length-norm", action="store_true",
               help="ablation: reward beta * log pi_theta(y|x), summed, not averaged; with --length-bias > 0 "
                    "the policy learns that long is good")
g.add_argument("--exact", action="store_true",
               help="where SimPO ends, exactly: a table policy over 27 listed reviews, trained by the same simpo_loss "
                    "to its minimum from two starts; defaults become --steps 100 (Newton steps at most) "
                    "--out out/simpo_exact")
add_run_args(parser, "simpo", steps=200, batch_size=64, lr=3e-4)
data.add_task_args(parser)

# ----------------------------------------------------------------------------------------------------
# The objective (the heart of this file)
# ----------------------------------------------------------------------------------------------------
#
# Derivation, SimPO paper section 2.
#
# 1. What generation optimises. Decoding (greedy, beam search, nucleus sampling) looks for responses with
#    a high AVERAGE log-likelihood per token, the generation metric                              [SimPO-1]
#        p_theta(y|x) = (1/|y|) log pi_theta(y|x) = (1/|y|) sum_{i=1..|y|} log pi_theta(y_i | x, y_<i)
# 2. DPO's implicit reward, beta log pi_theta(y|x)/pi_ref(y|x) (dpo.py, [DPO-2]), is a different quantity:
#    r(x, y_w) > r(x, y_l) need not mean p_theta(y_w|x) > p_theta(y_l|x). The SimPO paper found the two
#    orderings agree on only about half of the training pairs of a DPO model. DPO also needs pi_ref at
#    every step: a second forward pass and a second copy of the weights.
# 3. So take the generation metric itself as the reward, scaled by beta: no pi_ref at all      [SimPO-2]
#        r_SimPO(x, y) = (beta/|y|) log pi_theta(y|x)
#    Why 1/|y| matters: log pi_theta(y|x) is a sum of negative terms, so a longer response has a lower
#    summed log-likelihood. With a summed reward, a long chosen response can only beat a short rejected one
#    if the model inflates the probability of long responses: it learns to write longer (the
#    --no-length-norm ablation shows this on the length-biased pairs of --length-bias).
# 4. Bradley-Terry with a target reward margin gamma > 0: the winner must win by at least gamma [SimPO-3]
#        p(y_w > y_l | x) = sigma( r(x, y_w) - r(x, y_l) - gamma )
#    Without gamma (gamma = 0) the loss of an ordered pair fades as soon as r_w > r_l; with it, pairs keep
#    being pushed apart until the margin exceeds gamma, which the paper found generalises better.
# 5. The loss, the negative log-likelihood of the preferences under [SimPO-3]:                  [SimPO-4]
#        L_SimPO(pi_theta) = -E_{(x, y_w, y_l)~D}[ log sigma( (beta/|y_w|) log pi_theta(y_w|x)
#                                                            - (beta/|y_l|) log pi_theta(y_l|x) - gamma ) ]
#    Correction: the SimPO write-up (section 2.3) labels this loss "L_DPO"; it is SimPO's, with no pi_ref.
#
# log pi(y|x) is a SUM over the response tokens and |y| counts them, EOS included (model.sequence_logps);
# the prompt and the padding never count. F.logsigmoid keeps the loss and its gradient finite for any margin.

def simpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, beta, gamma):
    """Per-example SimPO losses and rewards, each [B].

    policy_*_logps  [B]  log pi_theta(y|x) summed over response tokens, for y_w (chosen) and y_l (rejected)
    *_lengths       [B]  |y|, response tokens counted; all ones turns the length normalisation off
    beta, gamma          reward scale and target reward margin
    """
    chosen_rewards = beta * policy_chosen_logps / chosen_lengths          # [SimPO-2] (beta/|y_w|) log pi(y_w|x)
    rejected_rewards = beta * policy_rejected_logps / rejected_lengths    # [SimPO-2] (beta/|y_l|) log pi(y_l|x)
    logits = chosen_rewards - rejected_rewards - gamma                    # [SimPO-3] margin minus the target
    losses = -F.logsigmoid(logits)                                        # [SimPO-4]
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def main():
    args = parser.parse_args()
    if args.exact:
        return run_exact()

    # ------------------------------------------------------------------------------------------------
    # Data and model (one model: the policy, initialised from SFT)
    # ------------------------------------------------------------------------------------------------
    device, task, policy, sft_info = data.start_run(args)   # device, output folder, task, SFT model
    lengths_or_ones = (lambda n: torch.ones_like(n)) if args.no_length_norm else (lambda n: n)
    # There is no reference model, so the evaluation's SFT side is measured now, while the policy still IS
    # the SFT model, and the SFT weights are kept (a state_dict, not a network) for the KL at the end.
    t1 = time.time()
    sft_side = data.evaluate_sft(policy, task, device, args.eval_samples, args.seed)
    heldout_sft = data.pair_logps_all(policy, task.heldout_pairs, device)     # the SFT model's own SimPO reward
    _, sft_chosen, sft_rejected = simpo_loss(heldout_sft[0], heldout_sft[1], lengths_or_ones(heldout_sft[2]),
                                             lengths_or_ones(heldout_sft[3]), args.beta, args.gamma)
    sft_weights = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    sft_eval_seconds = time.time() - t1
    memory = PeakMemory(policy)            # from here on: what training adds to the SFT model
    policy.train()
    optimizer = Adam(policy.parameters(), lr=args.lr)

    # ------------------------------------------------------------------------------------------------
    # Training loop
    # ------------------------------------------------------------------------------------------------
    batch_order = torch.Generator().manual_seed(args.seed)   # CPU generator: same batches on any device
    n_pairs = task.pairs["chosen_ids"].shape[0]
    log_rows = []
    t0 = time.time()
    for step in tqdm(range(args.steps), desc="SimPO", disable=None):
        idx = torch.randint(0, n_pairs, (args.batch_size,), generator=batch_order)
        batch = data.pair_batch(task.pairs, idx, device)
        policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths = pair_logps(policy, **batch)
        losses, chosen_rewards, rejected_rewards = simpo_loss(
            policy_chosen_logps, policy_rejected_logps, lengths_or_ones(chosen_lengths),
            lengths_or_ones(rejected_lengths), args.beta, args.gamma)
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
    # the policy's network computing with the SFT weights (tie_weights=False: the state_dict holds the tied
    # embedding twice, as wte.weight and lm_head.weight, two equal copies)
    sft = lambda ids: torch.func.functional_call(policy, sft_weights, (ids,), tie_weights=False)
    result = data.evaluate(policy, sft, sft_side, task, device, args.eval_samples, args.seed)
    heldout = data.pair_logps_all(policy, task.heldout_pairs, device)
    _, chosen_rewards, rejected_rewards = simpo_loss(heldout[0], heldout[1], lengths_or_ones(heldout[2]),
                                                     lengths_or_ones(heldout[3]), args.beta, args.gamma)
    metrics = {"method": "simpo", "seed": args.seed, "device": device.type, "steps": args.steps,
               **result, **data.ranking_metrics(chosen_rewards, rejected_rewards, *heldout),
               "beta": args.beta, "gamma": args.gamma, "length_norm": not args.no_length_norm,
               "lr": args.lr, "batch_size": args.batch_size, "sft_ce_before": sft_info["ce_before"],
               "sft_ce_after": sft_info["ce_after"], "final_loss": log_rows[-1]["loss"] if log_rows else None,
               "startup_seconds": t0 - START - sft_eval_seconds, "train_seconds": train_seconds,
               "eval_seconds": time.time() - t1 + sft_eval_seconds,
               "seconds_per_step": train_seconds / max(args.steps, 1), "peak_memory_mb": memory.mb(),
               "wall_seconds": time.time() - START}
    save_run(args.out, policy, args, {k: v for k, v in metrics.items() if not torch.is_tensor(v)}, log_rows)

    print(*data.chart([r["loss"] for r in log_rows], "SimPO loss [SimPO-4] per step"), sep="\n")
    print(*data.chart([r["rewards/margins"] for r in log_rows], "reward margin r(y_w) - r(y_l) per step"), sep="\n")
    print()
    data.print_summary("SimPO", metrics, data.ranking_metrics(sft_chosen, sft_rejected, *heldout_sft), args.out)


# ----------------------------------------------------------------------------------------------------
# Exact mode (--exact): the same simpo_loss on a table policy, and where it ends
# ----------------------------------------------------------------------------------------------------
#
# DPO's loss comes with a promise, the closed-form optimum pi* (dpo.py, [DPO-opt]); SimPO's does not: with no
# pi_ref and a margin gamma, nothing says where its minimum is. What can be shown exactly, on the 27-review
# table of data.ExactTask trained by this file's simpo_loss on the population of pairs (all pairs, weighted
# as the data draws them, minimised by Newton's method: see dpo.py's exact mode):
#   1. its end does not depend on where it starts: from the SFT table and from the uniform table, the ends
#      agree (start_gap = KL between them): the data alone anchors it.
#   2. how far that end is from DPO's pi* on the same data (kl_to_dpo_optimum, at dpo.py --exact's beta 1).
#   3. what the length normalisation does when responses differ in length. With gamma = 0 the end is in
#      closed form, and it says it all: the labels' Bradley-Terry likelihood is maximised by rewards equal
#      to the true ones up to a constant, r_SimPO(y) = (beta/|y|) log pi(y) = r(y) + c, so
#          pi(y) = exp( |y| (r(y) + c) / beta )        (c < -max r: it makes pi sum to 1)
#      Two reviews of EQUAL reward get the same log-probability PER TOKEN, (r + c)/beta < 0 (|y| counts the EOS),
#      so each extra token multiplies the mass by the same factor below 1. Without the 1/|y| (--no-length-norm,
#      beta log pi(y)) the same argument gives pi(y) proportional to exp(r(y)/beta): length plays no part.
#      The run checks the closed form (kl_to_closed_form_gamma0) and reports each end's mean length in words.

EXACT_DEFAULTS = {"steps": 100, "out": "out/simpo_exact"}   # steps: Newton steps per fit, at most; beta, gamma as given
DPO_EXACT_BETA = 1.0              # dpo.py --exact's default beta: the pi* the SimPO end is compared with


def fit_exact(ex, pairs, beta, gamma, start, steps, length_norm=True):
    """Minimise the expected simpo_loss over `pairs` (ExactTask.population_pairs: chosen, rejected, weights)
    for a table policy that starts at the distribution `start` [C]; returns its distribution [C]. |y| counts
    a review's tokens, EOS included, as sequence_logps does."""
    policy = ex.table(start)
    chosen, rejected, weights = pairs
    lengths = ex.words.double() + 1 if length_norm else torch.ones(ex.n, dtype=torch.float64)   # [C] |y|

    def expected_loss():
        policy_logps = policy.log_probs()                             # [C] log pi_theta(y|x)
        losses, _, _ = simpo_loss(policy_logps[chosen], policy_logps[rejected], lengths[chosen], lengths[rejected],
                                  beta, gamma)
        return (weights * losses).sum()   # E_D[ -log sigma(...) ], the pairs weighted as the data draws them

    minimise(policy.logits, expected_loss, steps)
    return policy.probs()


def run_exact():
    args, ex = data.start_exact(parser, EXACT_DEFAULTS)
    pairs = ex.population_pairs()           # drawn from the SFT table, as the GPT task draws its pairs
    uniform = torch.full((ex.n,), 1.0 / ex.n, dtype=torch.float64)
    norm = not args.no_length_norm
    from_sft = fit_exact(ex, pairs, args.beta, args.gamma, ex.sft_probs, args.steps, norm)
    from_uniform = fit_exact(ex, pairs, args.beta, args.gamma, uniform, args.steps, norm)
    other = fit_exact(ex, pairs, args.beta, args.gamma, ex.sft_probs, args.steps, not norm)   # the other reward
    best = ex.best()
    metrics = {"method": "simpo", "exact": True, "judge": ex.config.judge, "beta": args.beta, "gamma": args.gamma,
               "length_norm": norm, "tau": ex.config.tau, "start_gap": data.kl(from_sft, from_uniform),
               "exploitability": ex.exploitability(from_sft), "exploitability_sft": ex.exploitability(ex.sft_probs),
               "school_shares": ex.school_shares(from_sft).tolist(),
               "best_mass": from_sft[best].sum().item(), "best_mass_sft": ex.sft_probs[best].sum().item(),
               "mean_words": ex.mean_words(from_sft), "mean_words_sft": ex.mean_words(ex.sft_probs),
               f"mean_words_length_norm_{'off' if norm else 'on'}": ex.mean_words(other),
               "policy_probs": from_sft.tolist()}
    columns = {"SFT": ex.sft_probs, "SimPO from SFT": from_sft, "SimPO from uniform": from_uniform,
               f"SimPO, length norm {'off' if norm else 'on'}": other}
    if ex.reward is not None:   # the Bradley-Terry judge: DPO's pi* and the gamma = 0 closed form exist
        optimum = columns[f"DPO pi* (beta {DPO_EXACT_BETA:g})"] = ex.dpo_optimum(DPO_EXACT_BETA)
        gamma0 = fit_exact(ex, pairs, args.beta, 0.0, ex.sft_probs, args.steps, length_norm=True)
        metrics.update(kl_to_dpo_optimum=data.kl(from_sft, optimum), mean_words_dpo_optimum=ex.mean_words(optimum),
                       kl_to_closed_form_gamma0=data.kl(gamma0, ex.simpo_optimum_gamma0(args.beta)))
    done = data.save_exact(args, ex, metrics, START)

    print(f"exact SimPO: a table over {ex.n} reviews, judge {ex.config.judge}, beta {args.beta}, gamma {args.gamma}, "
          f"length normalisation {'on' if norm else 'off'}\n")
    data.print_exact_groups(ex, columns, by="length" if ex.reward is not None else "school")   # cyclic: schools matter
    print(f"\nstart_gap = KL(end from SFT || end from uniform) = {metrics['start_gap']:.2e} nats: one end, "
          f"whatever the start")
    words = f"mean length (words): SFT {metrics['mean_words_sft']:.2f}, SimPO {metrics['mean_words']:.2f}, " + \
        (f"without length norm {metrics['mean_words_length_norm_off']:.2f}" if norm else
         f"with length norm {metrics['mean_words_length_norm_on']:.2f}")
    if ex.reward is not None:
        print(f"KL(SimPO end || DPO's pi*, beta {DPO_EXACT_BETA:g}) = {metrics['kl_to_dpo_optimum']:.3f} nats; "
              f"gamma = 0 (length-normalised): KL(end || closed form) = {metrics['kl_to_closed_form_gamma0']:.2e}")
        words += f", DPO's pi* {metrics['mean_words_dpo_optimum']:.2f}"
    print(words)
    print(done)


if __name__ == "__main__":
    run(main)   # model.run: a fault (Ctrl-C, NaN, full disk) ends in one line, not a traceback
