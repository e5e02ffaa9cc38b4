"""Quickstart: DP-FedAvg of a small classifier on synthetic federated data with dpfl's primitives.

Each round: Poisson-sample a cohort, train each user locally with plain torch SGD, clip and sum
the updates (DPAggregator = PerLayerClip + GaussianMechanism), add noise once, divide by the
expected cohort size, take a plain server step, and account for the round with RDP.

Run: ``python examples/quickstart.py`` (about 10 s on a laptop CPU).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dpfl.accounting import PoissonRound, RDPAccountant
from dpfl.aggregate import DPAggregator
from dpfl.clip import PerLayerClip
from dpfl.noise import GaussianMechanism

POPULATION, COHORT, ROUNDS, DIM, CLASSES = 1000, 40, 30, 10, 4
CLIP, NOISE_MULTIPLIER, LOCAL_LR, LOCAL_STEPS, SERVER_LR, DELTA = 0.5, 1.0, 0.1, 5, 1.0, 1e-5


def make_users(gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every user holds 16 points of a shared 4-class Gaussian mixture, shifted per user."""
    centers = 0.8 * torch.randn(CLASSES, DIM, generator=gen)
    users = []
    for _ in range(POPULATION):
        y = torch.randint(CLASSES, (16,), generator=gen)
        shift = 0.3 * torch.randn(DIM, generator=gen)
        users.append((centers[y] + shift + torch.randn(16, DIM, generator=gen), y))
    return users


def train_local(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Plain local SGD on a copy; returns the update Δ = θ_user − θ_server."""
    local = copy.deepcopy(model)
    opt = torch.optim.SGD(local.parameters(), lr=LOCAL_LR)
    for _ in range(LOCAL_STEPS):
        opt.zero_grad()
        nn.functional.cross_entropy(local(x), y).backward()
        torch.nn.utils.clip_grad_norm_(local.parameters(), 1.0)
        opt.step()
    server = dict(model.named_parameters())
    return {k: (p - server[k]).detach() for k, p in local.named_parameters()}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = model(x)
    loss = float(nn.functional.cross_entropy(logits, y))
    return loss, float((logits.argmax(1) == y).float().mean())


def main() -> None:
    torch.set_num_threads(1)  # a tiny model: extra threads only add overhead
    torch.manual_seed(0)  # model initialisation only; dpfl itself never touches the global RNG
    gen = torch.Generator().manual_seed(0)
    users = make_users(gen)
    test_x = torch.cat([x for x, _ in users[:200]])
    test_y = torch.cat([y for _, y in users[:200]])
    model = nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, CLASSES))

    q = COHORT / POPULATION
    clipper = PerLayerClip(CLIP, allocation="dim")
    mechanism = GaussianMechanism(NOISE_MULTIPLIER, clipper.sensitivity)  # OS-entropy noise
    aggregator = DPAggregator(clipper, mechanism, expected_cohort_size=COHORT)
    accountant = RDPAccountant()

    loss, acc = evaluate(model, test_x, test_y)
    print(f"round  0: loss {loss:.3f}  accuracy {acc:.3f}")
    for t in range(1, ROUNDS + 1):
        cohort = (torch.rand(POPULATION, generator=gen) < q).nonzero().flatten().tolist()
        # Charge the round before its result exists (write-ahead): nothing uncharged can leak.
        accountant.add_rounds(PoissonRound(noise_multiplier=NOISE_MULTIPLIER, sample_rate=q))
        for u in cohort:
            aggregator.add(train_local(model, *users[u]))
        # The second value (ReleaseStats: realised count, clipped fraction) is not private: it
        # depends on who took part, so it is neither printed nor published here.
        mean_update, _ = aggregator.release(allow_empty=True)
        with torch.no_grad():  # plain server step: θ += lr_server · noised mean update
            for name, p in model.named_parameters():
                p.add_(mean_update[name], alpha=SERVER_LR)
        if t % 5 == 0:
            loss, acc = evaluate(model, test_x, test_y)
            print(
                f"round {t:2d}: loss {loss:.3f}  accuracy {acc:.3f}  "
                f"epsilon {accountant.epsilon(DELTA):.2f} (delta={DELTA:g})"
            )


if __name__ == "__main__":
    main()
