"""ODE solvers for dx/dt = v(x, t) on a uniform time grid.

Two families, one entry point (`integrate`):

* **Fixed-grid** `euler`, `heun` and `midpoint`, written as plain torch loops. Backpropagating through them
  gives the exact gradient of the discrete solution. With `checkpoint=True` each step is recomputed in the
  backward pass (`torch.utils.checkpoint`), so activation memory is that of one network evaluation plus the
  (B, C, H, W) states at the grid points, whatever the number of steps.
* **torchdiffeq**, for every method it implements (adaptive `dopri5`, `bosh3`, …, and fixed `rk4`, …), and for
  `adjoint=True` (`odeint_adjoint`: memory independent of the steps, gradients approximate to solver tolerance).

With h = t_{k+1} − t_k (negative when integrating towards t = 0), the fixed-grid updates are

    euler:     x_{k+1} = x_k + h·v(x_k, t_k)                                             order 1
    heun:      x̃ = x_k + h·v(x_k, t_k);  x_{k+1} = x_k + h/2·(v(x_k, t_k) + v(x̃, t_{k+1}))   order 2
    midpoint:  x̃ = x_k + h/2·v(x_k, t_k); x_{k+1} = x_k + h·v(x̃, t_k + h/2)                order 2

Each fixed-grid step uses up every velocity it evaluates before the next evaluation, so a network whose output
buffer is reused from one call to the next (replayed as a CUDA graph: torch.compile's "reduce-overhead" mode) gives
the same steps. torchdiffeq's methods hold several velocities at once and need a network that returns new tensors.

Precision: the state keeps the dtype of the x it starts from, and the time grid is float64 for a float64 state,
float32 otherwise. The velocity must return the state's dtype: a network computing in bfloat16 is called through
`backbones.VelocityBackbone`, which casts its output back, so the updates above are summed in float32 and the error of
x at the end stays that of the network's own rounding however many steps are taken. A bfloat16 state would round
every sum instead: an increment h·v smaller than 2⁻⁹·|x| is lost entirely.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torchdiffeq
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint
from torchdiffeq._impl.odeint import SOLVERS as TORCHDIFFEQ_METHODS

from .checks import check_choice, check_num_steps

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _slope(velocity: VelocityFn, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v(x, t) for a scalar time t: the velocity sees t repeated for each sample, shape (B,)."""
    return velocity(x, t.expand(x.shape[0]))


def _euler_step(velocity: VelocityFn, x: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
    return x + (t1 - t0) * _slope(velocity, x, t0)


def _heun_step(velocity: VelocityFn, x: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
    h = t1 - t0
    slope_start = _slope(velocity, x, t0)
    x_euler = x + h * slope_start
    x_half_update = x + 0.5 * h * slope_start  # slope_start used up before the next evaluation
    return x_half_update + 0.5 * h * _slope(velocity, x_euler, t1)


def _midpoint_step(velocity: VelocityFn, x: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
    h = t1 - t0
    x_half = x + 0.5 * h * _slope(velocity, x, t0)
    return x + h * _slope(velocity, x_half, t0 + 0.5 * h)


FIXED_GRID_STEPS = {"euler": _euler_step, "heun": _heun_step, "midpoint": _midpoint_step}
# Our fixed-grid solvers take precedence over torchdiffeq's methods of the same name; torchdiffeq's equivalent
# is used when the adjoint is requested.
ADJOINT_EQUIVALENT = {"euler": "euler", "heun": "heun2", "midpoint": "midpoint"}
# torchdiffeq's fixed-grid `explicit_adams` diverges on dx/dt = -x (x(1) = 3.41 instead of e^-1 with 64 steps,
# torchdiffeq 0.2.5), so it is not offered.
UNRELIABLE_METHODS = ("explicit_adams",)
SOLVERS: tuple[str, ...] = tuple(FIXED_GRID_STEPS) + tuple(
    m for m in TORCHDIFFEQ_METHODS if m not in FIXED_GRID_STEPS and m not in UNRELIABLE_METHODS
)


def check_solver(solver: str) -> None:
    """`solver` must name a method of `SOLVERS`: our fixed-grid ones first, then torchdiffeq's."""
    check_choice("solver", solver, SOLVERS, "solvers")


def time_grid(
    t_start: float, t_end: float, num_steps: int, device=None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Uniform grid of `num_steps` + 1 times from t_start to t_end, shape (num_steps + 1,)."""
    return torch.linspace(t_start, t_end, num_steps + 1, device=device, dtype=dtype)


def segment_steps(times: list[float], num_steps: int) -> list[int]:
    """Grid intervals of each segment [τ_{k−1}, τ_k] (τ_0 = 0) when integrating through increasing `times`, so that
    `num_steps` intervals span [0, τ_K] at a uniform spacing where the times allow it:

        n_k = max(1, ⌊num_steps · (τ_k − τ_{k−1}) / τ_K + 1/2⌋)

    With one time τ this is `num_steps` intervals over [0, τ]; times on the uniform grid of `num_steps` intervals over
    [0, τ_K] give exactly that grid (e.g. times (0.25, 1.0), 4 steps: 1 + 3 intervals)."""
    check_num_steps(num_steps)
    bounds = [0.0, *times]
    return [max(1, math.floor(num_steps * (end - start) / times[-1] + 0.5)) for start, end in zip(bounds, times)]


class _TorchdiffeqField(nn.Module):
    """Adapts v(x, t) with t of shape (B,) to torchdiffeq's f(t, x) with a scalar t."""

    def __init__(self, velocity: nn.Module):
        super().__init__()
        self.velocity = velocity

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.velocity(x, t.expand(x.shape[0]))


def integrate(
    velocity: VelocityFn,
    x: torch.Tensor,
    t_start: float,
    t_end: float,
    num_steps: int,
    solver: str = "euler",
    checkpoint: bool = False,
    adjoint: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    return_trajectory: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Solve dx/dt = v(x, t) from t_start to t_end on a uniform grid of `num_steps` intervals.

    Args:
        velocity: v(x, t) with x of shape (B, ...) and t of shape (B,); returns a tensor shaped like x.
            With `adjoint=True` it must be an `nn.Module` (its parameters get adjoint gradients).
        x: the state at t_start, shape (B, ...).
        t_start, t_end: integration limits, in either order (t = 0 data, t = 1 noise).
        num_steps: number of grid intervals, an integer >= 1. Adaptive methods report the state at these grid times.
        solver: a name from `SOLVERS`.
        checkpoint: recompute each fixed-grid step in the backward pass instead of storing its activations.
        adjoint: use `torchdiffeq.odeint_adjoint` (memory independent of steps, approximate gradients).
        rtol, atol: tolerances of adaptive torchdiffeq methods.
        return_trajectory: return the state at every grid time instead of only the last one.

    Raises:
        ValueError naming `num_steps` or `solver` when it is not allowed.

    Returns:
        The state at t_end, shaped like x; with `return_trajectory`, the tuple of the num_steps + 1 states at the
        grid times t_0 = t_start, …, t_num_steps = t_end.
    """
    check_num_steps(num_steps)
    check_solver(solver)
    grid_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    grid = time_grid(t_start, t_end, num_steps, device=x.device, dtype=grid_dtype)

    if solver in FIXED_GRID_STEPS and not adjoint:
        step = FIXED_GRID_STEPS[solver]
        states = [x]
        for t0, t1 in zip(grid[:-1], grid[1:]):
            if checkpoint and torch.is_grad_enabled():
                x = activation_checkpoint(step, velocity, x, t0, t1, use_reentrant=False)
            else:
                x = step(velocity, x, t0, t1)
            if return_trajectory:
                states.append(x)
        return tuple(states) if return_trajectory else x

    method = ADJOINT_EQUIVALENT.get(solver, solver)
    field = _TorchdiffeqField(velocity)
    if adjoint:
        if not isinstance(velocity, nn.Module):
            raise TypeError("adjoint=True needs the velocity to be an nn.Module so its parameters get gradients.")
        solution = torchdiffeq.odeint_adjoint(
            field, x, grid, method=method, rtol=rtol, atol=atol, adjoint_params=tuple(velocity.parameters())
        )
    else:
        solution = torchdiffeq.odeint(field, x, grid, method=method, rtol=rtol, atol=atol)
    return solution.unbind(0) if return_trajectory else solution[-1]
