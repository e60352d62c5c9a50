"""Probability paths for flow matching: GVP, ICFM and OT-CFM.

Convention (one for the whole package): time t ∈ [0, 1], **t = 0 is data and t = 1 is noise**.
Every path is an interpolant between a data sample x and Gaussian noise ε ~ N(0, I):

    x_t = α_t · x + σ_t · ε,        u_t = dx_t/dt = α'_t · x + σ'_t · ε

| path    | α_t          | σ_t          | coupling of (x, ε)                                |
|---------|--------------|--------------|---------------------------------------------------|
| `icfm`  | 1 − t        | t            | independent                                       |
| `otcfm` | 1 − t        | t            | exact minibatch optimal transport, squared L2     |
| `gvp`   | cos(πt/2)    | sin(πt/2)    | independent                                       |

The flow-matching loss regresses a velocity network v_θ(x_t, t) onto u_t:

    L_FM = mean over batch, channels and pixels of (v_θ(x_t, t) − u_t)²,    t ~ U[0, 1]

i.e. the mean over *all* elements. The released PRG code takes half the squared error summed over channels,
averaged over batch and pixels: (C/2) times this loss (1.5 for RGB). A constant factor of the loss changes no
Adam(W) update (up to Adam's ε; gradient clipping, which the release does not use, would see it), and in finetuning
β = `fm_loss_weight` absorbs it: β here = β released · C/2.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from scipy.optimize import linear_sum_assignment

from .checks import check_choice

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ProbabilityPath:
    """Base class: subclasses define α_t, σ_t and their time derivatives; coupling defaults to independent."""

    name: str = ""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _broadcast(coefficient: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Reshape a per-sample coefficient of shape (B,) to (B, 1, 1, 1) so it scales images (B, C, H, W)."""
        return coefficient.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)

    def interpolate(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = α_t·x + σ_t·ε. Shapes: x, noise (B, C, H, W); t (B,). Returns (B, C, H, W)."""
        return self._broadcast(self.alpha(t), x) * x + self._broadcast(self.sigma(t), x) * noise

    def target_velocity(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """u_t = α'_t·x + σ'_t·ε, the time derivative of `interpolate`. Same shapes as `interpolate`."""
        return self._broadcast(self.d_alpha(t), x) * x + self._broadcast(self.d_sigma(t), x) * noise

    def couple(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pair data with noise. Independent paths keep the pairing as drawn."""
        return x, noise

    def sample_time(
        self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """t ~ U[0, 1], shape (B,), on `device`; drawn on the generator's device when one is given."""
        draw_device = device if generator is None else generator.device
        return torch.rand(batch_size, device=draw_device, generator=generator).to(device)

    def flow_matching_loss(
        self,
        velocity: VelocityFn,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """L_FM for a batch of data x (B, C, H, W): draw ε and t, couple, and regress v(x_t, t) onto u_t.

        `noise`: ε (B, C, H, W) already coupled with x (`prg_hub.noise_pairing`); drawn and coupled here when None.
        """
        if noise is None:
            noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x, noise = self.couple(x, noise)
        t = self.sample_time(x.shape[0], x.device, generator)
        x_t = self.interpolate(x, noise, t)
        target = self.target_velocity(x, noise, t)
        return torch.mean((velocity(x_t, t) - target) ** 2)


class ICFMPath(ProbabilityPath):
    """Independent conditional flow matching: straight lines x_t = (1 − t)·x + t·ε, u_t = ε − x."""

    name = "icfm"

    def alpha(self, t):
        return 1.0 - t

    def sigma(self, t):
        return t

    def d_alpha(self, t):
        return -torch.ones_like(t)

    def d_sigma(self, t):
        return torch.ones_like(t)


class OTCFMPath(ICFMPath):
    """ICFM's straight lines with an exact minibatch optimal-transport coupling.

    The batch's noise is permuted by π = argmin_π Σ_i ‖x_i − ε_π(i)‖², solved exactly with the Hungarian algorithm
    (`scipy.optimize.linear_sum_assignment`). Each data point keeps exactly one noise sample: a permutation,
    never the with-replacement sampling from a transport plan that reference implementations use.
    """

    name = "otcfm"

    def couple(self, x, noise):
        return x, noise[optimal_transport_permutation(x, noise)]


class GVPPath(ProbabilityPath):
    """Generalised variance-preserving path: α_t = cos(πt/2), σ_t = sin(πt/2), so α_t² + σ_t² = 1."""

    name = "gvp"

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * t)

    def sigma(self, t):
        return torch.sin(0.5 * math.pi * t)

    def d_alpha(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def d_sigma(self, t):
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)


def optimal_transport_permutation(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The permutation π (shape (B,), long) minimising Σ_i ‖x_i − noise_π(i)‖² over flattened samples."""
    cost = torch.cdist(x.detach().flatten(1).double(), noise.detach().flatten(1).double()) ** 2
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    permutation = np.empty_like(cols)
    permutation[rows] = cols
    return torch.as_tensor(permutation, device=x.device, dtype=torch.long)


PATHS: dict[str, type[ProbabilityPath]] = {cls.name: cls for cls in (GVPPath, ICFMPath, OTCFMPath)}


def check_probability_path(name: str) -> None:
    """`name` must name a flow-matching path of `PATHS` ("gvp", "icfm", "otcfm")."""
    check_choice("probability_path", name, sorted(PATHS), "probability paths")


def get_path(name: str) -> ProbabilityPath:
    """Instantiate the path `name`, one of `PATHS`; a ValueError lists them for any other name."""
    check_probability_path(name)
    return PATHS[name]()
