"""Probability paths: boundary values, velocity = d/dt interpolant, and the exact OT coupling."""

import itertools

import pytest
import torch

from prg_hub.paths import PATHS, get_path, optimal_transport_permutation


@pytest.mark.parametrize("name", sorted(PATHS))
def test_alpha_sigma_at_the_ends(name):
    path = get_path(name)
    ends = torch.tensor([0.0, 1.0])
    torch.testing.assert_close(path.alpha(ends), torch.tensor([1.0, 0.0]), atol=1e-7, rtol=0)
    torch.testing.assert_close(path.sigma(ends), torch.tensor([0.0, 1.0]), atol=1e-7, rtol=0)


@pytest.mark.parametrize("name", sorted(PATHS))
def test_interpolant_hits_data_at_zero_and_noise_at_one(name):
    path = get_path(name)
    x, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(path.interpolate(x, noise, torch.zeros(3)), x)
    torch.testing.assert_close(path.interpolate(x, noise, torch.ones(3)), noise, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(PATHS))
def test_target_velocity_is_the_time_derivative_of_the_interpolant(name):
    path = get_path(name)
    x, noise = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randn(5, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95], dtype=torch.float64)
    h = 1e-6
    finite_difference = (path.interpolate(x, noise, t + h) - path.interpolate(x, noise, t - h)) / (2 * h)
    torch.testing.assert_close(path.target_velocity(x, noise, t), finite_difference, atol=1e-8, rtol=1e-7)


def _pairing_cost(x, noise):
    return ((x - noise) ** 2).flatten(1).sum(1).sum().item()


def test_ot_coupling_never_costs_more_than_independent_pairing():
    path = get_path("otcfm")
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(16, 3, 8, 8, generator=generator)
        noise = torch.randn(16, 3, 8, 8, generator=generator)
        coupled_x, coupled_noise = path.couple(x, noise)
        assert torch.equal(coupled_x, x)
        assert _pairing_cost(coupled_x, coupled_noise) <= _pairing_cost(x, noise) + 1e-9


def test_ot_coupling_is_a_permutation_equal_to_the_brute_force_optimum():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, 3, 3, generator=generator, dtype=torch.float64)
    noise = torch.randn(6, 2, 3, 3, generator=generator, dtype=torch.float64)
    permutation = optimal_transport_permutation(x, noise)
    assert sorted(permutation.tolist()) == list(range(6))
    brute_force = min(_pairing_cost(x, noise[list(p)]) for p in itertools.permutations(range(6)))
    assert _pairing_cost(x, noise[permutation]) == pytest.approx(brute_force, rel=1e-12)


def test_independent_paths_keep_the_pairing():
    x, noise = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    for name in ("icfm", "gvp"):
        coupled_x, coupled_noise = get_path(name).couple(x, noise)
        assert torch.equal(coupled_x, x) and torch.equal(coupled_noise, noise)


def test_flow_matching_loss_is_the_mean_squared_error_against_the_target_velocity():
    """A velocity that returns u_t + 1 everywhere must give a loss of exactly 1 (the mean over all elements)."""
    path = get_path("icfm")
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)

    def velocity_off_by_one(x_t, t):
        # x_t = (1 − t)·x + t·ε, so u_t = ε − x = (x_t − x)/t for the known data x.
        return (x_t - x) / t.view(-1, 1, 1, 1) + 1.0

    loss = path.flow_matching_loss(velocity_off_by_one, x, generator=torch.Generator().manual_seed(3))
    assert loss.item() == pytest.approx(1.0, rel=1e-9)


def test_flow_matching_loss_takes_noise_already_paired_with_the_batch():
    """Given ε, the loss uses it as it is (no second coupling) and draws only t."""
    path = get_path("otcfm")
    x, noise = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    t = path.sample_time(5, x.device, torch.Generator().manual_seed(3))
    velocity = lambda x_t, time: torch.zeros_like(x_t)  # noqa: E731
    loss = path.flow_matching_loss(velocity, x, torch.Generator().manual_seed(3), noise=noise)
    assert loss.item() == pytest.approx(torch.mean(path.target_velocity(x, noise, t) ** 2).item(), rel=1e-6)
