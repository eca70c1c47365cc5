"""The preference losses on sequence log-probabilities, as their papers define them.

Inputs are per-example sums of the answer tokens' log-probabilities (`policy_*`, `reference_*`) and the
answer lengths in tokens. Each function returns (per-example losses, chosen rewards, rejected rewards); the
rewards are detached. tests/test_preference.py checks each against TRL's implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("dpo", "ipo", "orpo", "kto")
WITHOUT_REFERENCE = ("orpo",)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * margin of log-ratios). With label smoothing eps the
    pair's label is taken as flipped with probability eps (conservative DPO, Mitchell 2023)."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    logits = beta * (chosen_ratio - rejected_ratio)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    chosen_length: torch.Tensor,
    rejected_length: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO (Azar et al. 2023): the squared distance of the margin of per-token log-ratios from 1/(2 beta),
    which bounds how far the policy is pushed where DPO's margin grows without limit."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    margin = chosen_ratio / chosen_length - rejected_ratio / rejected_length
    losses = (margin - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def orpo_odds_ratio(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_length: torch.Tensor,
    rejected_length: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term (Hong et al. 2024), reference-free: -beta * log sigmoid(log odds(chosen) -
    log odds(rejected)) on length-averaged log-probabilities; the ORPO loss is the chosen answer's NLL plus
    this term. Rewards are beta times the averaged log-probabilities."""
    chosen = (policy_chosen / chosen_length).float()
    rejected = (policy_rejected / rejected_length).float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    losses = -beta * F.logsigmoid(log_odds)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, computed stably on both sides of -log 2 (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def kto_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024): a desirable answer's value is sigmoid(beta (log-ratio - z0)), an
    undesirable one's sigmoid(beta (z0 - log-ratio)); z0 is the policy's KL from the reference, estimated
    on mismatched prompt/answer pairs (`kl`, detached). Returns the weighted per-example losses in batch
    order, and the rewards of the desirable and the undesirable examples."""
    ratio = policy - reference
    value = torch.where(desirable, beta * (ratio - kl), beta * (kl - ratio))
    weights = torch.where(desirable, desirable_weight, undesirable_weight).to(ratio.dtype)
    losses = weights * (1 - torch.sigmoid(value))
    rewards = beta * ratio.detach()
    return losses, rewards[desirable], rewards[~desirable]


def kl_estimate(policy_kl: torch.Tensor, reference_kl: torch.Tensor) -> torch.Tensor:
    """KTO's z0: the mean log-ratio of the mismatched pairs over every rank, never below zero."""
    kl = (policy_kl - reference_kl).detach().mean()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(kl)
        kl = kl / torch.distributed.get_world_size()
    return kl.clamp(min=0)
