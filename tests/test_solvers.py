"""Solvers: convergence order, reversibility, exact gradients, checkpointing and torchdiffeq methods."""

import math

import pytest
import torch
from torch import nn

from prg_hub.solvers import SOLVERS, integrate

RATE = -1.3  # dx/dt = RATE·x has the solution x(t) = x(0)·exp(RATE·t)


def linear_velocity(x, t):
    return RATE * x


def _error_at_one(solver, num_steps):
    x0 = torch.ones(1, 1, dtype=torch.float64)
    x1 = integrate(linear_velocity, x0, 0.0, 1.0, num_steps, solver=solver)
    return abs(x1.item() - math.exp(RATE))


@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2), ("midpoint", 2)])
def test_measured_convergence_order(solver, order):
    errors = [_error_at_one(solver, n) for n in (16, 32, 64)]
    measured = [math.log2(coarse / fine) for coarse, fine in zip(errors, errors[1:])]
    for value in measured:
        assert value == pytest.approx(order, abs=0.1), f"{solver}: measured orders {measured}"


class SmoothField(nn.Module):
    """v(x, t) = W·tanh(x)·(1 + t) + b: smooth and Lipschitz, so the flow is invertible."""

    def __init__(self, dim=4, dtype=torch.float64):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(0.5 * torch.randn(dim, dim, generator=generator, dtype=dtype))
        self.bias = nn.Parameter(0.1 * torch.randn(dim, generator=generator, dtype=dtype))

    def forward(self, x, t):
        return torch.tanh(x) @ self.weight.T * (1 + t.view(-1, 1)) + self.bias


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint"])
def test_generating_from_the_reversed_point_gives_back_x(solver):
    field = SmoothField()
    x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        noise_end = integrate(field, x, 0.0, 1.0, 2000, solver=solver)
        back = integrate(field, noise_end, 1.0, 0.0, 2000, solver=solver)
    tolerance = 2e-3 if solver == "euler" else 1e-7
    assert (back - x).abs().max().item() < tolerance
    assert (noise_end - x).abs().max().item() > 0.1  # the flow really moved the points


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint"])
def test_fixed_grid_gradients_pass_gradcheck(solver):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = (0.5 * torch.randn(3, 3, dtype=torch.float64, generator=generator)).requires_grad_(True)
    bias = (0.1 * torch.randn(3, dtype=torch.float64, generator=generator)).requires_grad_(True)

    def solve(x, weight, bias):
        def velocity(state, t):
            return torch.tanh(state) @ weight.T * (1 + t.view(-1, 1)) + bias

        return integrate(velocity, x, 0.0, 0.8, 4, solver=solver)

    assert torch.autograd.gradcheck(solve, (x, weight, bias))


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint"])
def test_checkpointed_gradients_equal_plain_backprop(solver):
    field = SmoothField()
    x = torch.randn(5, 4, dtype=torch.float64)
    gradients = []
    for checkpoint in (False, True):
        field.zero_grad()
        integrate(field, x, 0.0, 1.0, 10, solver=solver, checkpoint=checkpoint).square().sum().backward()
        gradients.append([p.grad.clone() for p in field.parameters()])
    for plain, checkpointed in zip(*gradients):
        torch.testing.assert_close(checkpointed, plain, rtol=0, atol=1e-12)


class ReusedOutputBuffer:
    """A velocity that writes every result into the same output tensor, as a network replayed from a CUDA graph
    (torch.compile's "reduce-overhead" mode) does: each result holds only until the next evaluation."""

    def __init__(self, velocity):
        self.velocity = velocity
        self.output = None

    def __call__(self, x, t):
        value = self.velocity(x, t)
        if self.output is None:
            self.output = torch.empty_like(value)
        return self.output.copy_(value)


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint"])
def test_fixed_grid_steps_use_each_velocity_before_the_next_evaluation(solver):
    field = SmoothField()
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = integrate(field, x, 0.0, 1.0, 8, solver=solver, return_trajectory=True)
        reused = integrate(ReusedOutputBuffer(field), x, 0.0, 1.0, 8, solver=solver, return_trajectory=True)
    assert all(torch.equal(state, expected_state) for state, expected_state in zip(reused, expected))


def test_trajectory_holds_every_grid_point():
    x0 = torch.ones(2, 1, dtype=torch.float64)
    trajectory = integrate(linear_velocity, x0, 0.0, 1.0, 5, solver="euler", return_trajectory=True)
    assert len(trajectory) == 6
    assert torch.equal(trajectory[0], x0)
    for k, state in enumerate(trajectory):
        torch.testing.assert_close(state, x0 * (1 + RATE / 5) ** k)


@pytest.mark.parametrize("solver", ["euler", "rk4"])  # our fixed-grid loop, torchdiffeq
def test_integrate_returns_the_final_state_or_the_whole_trajectory(solver):
    x0 = torch.ones(2, 1, dtype=torch.float64)
    final = integrate(linear_velocity, x0, 0.0, 1.0, 5, solver=solver)
    trajectory = integrate(linear_velocity, x0, 0.0, 1.0, 5, solver=solver, return_trajectory=True)
    assert final.shape == x0.shape and len(trajectory) == 6
    assert torch.equal(trajectory[0], x0) and torch.equal(trajectory[-1], final)


def test_adaptive_torchdiffeq_method_is_accurate():
    x0 = torch.ones(1, 1, dtype=torch.float64)
    x1 = integrate(linear_velocity, x0, 0.0, 1.0, 1, solver="dopri5", rtol=1e-9, atol=1e-9)
    assert x1.item() == pytest.approx(math.exp(RATE), rel=1e-7)


def test_adjoint_gradients_are_close_to_exact_backprop():
    field = SmoothField()
    x = torch.randn(3, 4, dtype=torch.float64)
    gradients = []
    for adjoint in (False, True):
        field.zero_grad()
        integrate(field, x, 0.0, 1.0, 50, solver="heun", adjoint=adjoint).square().sum().backward()
        gradients.append(torch.cat([p.grad.flatten() for p in field.parameters()]))
    exact, adjoint = gradients
    assert ((adjoint - exact).norm() / exact.norm()).item() < 1e-3


def bfloat16_linear_velocity(x, t):
    """RATE·x computed in bfloat16 and returned in the state's dtype, as `backbones.VelocityBackbone` runs a bfloat16
    network: each evaluation is off by bfloat16's rounding, at most 2⁻⁸ relative."""
    return (RATE * x.to(torch.bfloat16)).to(x.dtype)


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint", "rk4"])
def test_a_float32_state_keeps_a_bfloat16_velocity_error_from_growing_with_the_steps(solver):
    """Against the float64 solution on the same grid: the float32 state's error stays within the velocity's own
    error integrated along the path, 2⁻⁸·‖x(1) − x(0)‖, at 10 steps as at 1000; a bfloat16 state rounds away the
    increments h·v once they fall below its resolution (2.7 relative error at 1000 steps)."""
    x0 = torch.linspace(0.5, 2.0, 64).reshape(1, 64)
    error, bfloat16_state_error = {}, {}
    for num_steps in (10, 100, 1000):
        exact = integrate(linear_velocity, x0.double(), 0.0, 1.0, num_steps, solver=solver)
        state = integrate(bfloat16_linear_velocity, x0, 0.0, 1.0, num_steps, solver=solver)
        bfloat16_state = integrate(bfloat16_linear_velocity, x0.bfloat16(), 0.0, 1.0, num_steps, solver=solver)
        assert state.dtype == torch.float32 and bfloat16_state.dtype == torch.bfloat16
        error[num_steps] = ((state.double() - exact).norm() / exact.norm()).item()
        bfloat16_state_error[num_steps] = ((bfloat16_state.double() - exact).norm() / exact.norm()).item()
    velocity_scale = 2**-8 * ((exact - x0.double()).norm() / exact.norm()).item()
    assert max(error.values()) <= velocity_scale
    assert error[1000] <= 1.5 * error[10]
    assert bfloat16_state_error[1000] > 100 * error[1000] and bfloat16_state_error[1000] > velocity_scale


@pytest.mark.parametrize("solver", SOLVERS)
def test_every_listed_solver_solves_a_linear_ode(solver):
    """Every name that PRGConfig and integrate accept is a working method: x(1) = exp(RATE) ≈ 0.27 within 0.01."""
    assert _error_at_one(solver, 64) < 1e-2
