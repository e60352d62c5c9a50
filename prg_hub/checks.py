"""How PRG reports a bad parameter: each check raises a ValueError naming the value and what is allowed.

The numeric checks live here (`num_steps`, `feature_t`, `feature_times`); `check_choice` serves the registries,
each of which checks its own names where they are used (`backbones.check_backbone_type`,
`paths.check_probability_path`, `solvers.check_solver`, `PRGConfig.check_head`). A value is
checked where it is used: a `PRGConfig` checks its fields when it is made, and `solvers.integrate`,
`paths.get_path` and `backbones.build_backbone` check what they are given, once per call.
"""

from __future__ import annotations

from collections.abc import Sequence


def check_choice(parameter: str, value: str, allowed: Sequence[str], allowed_description: str) -> None:
    """`value` of `parameter` must be one of `allowed`; the error lists them as "allowed <allowed_description>"."""
    if value not in allowed:
        raise ValueError(f"Unknown {parameter} {value!r}: allowed {allowed_description} are {list(allowed)}.")


def check_num_steps(num_steps: int) -> None:
    """`num_steps`, the number of solver grid intervals, must be an integer >= 1."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}.")


def check_feature_t(feature_t: float) -> None:
    """`feature_t`, the time at which x_t is read as the representation, must satisfy 0 < feature_t <= 1."""
    if isinstance(feature_t, bool) or not isinstance(feature_t, (int, float)) or not 0 < feature_t <= 1:
        raise ValueError(f"feature_t must be in (0, 1] (t = 0 is data, t = 1 is noise), got {feature_t!r}.")


def check_feature_times(feature_times) -> None:
    """`feature_times`, the times at which block outputs are read, must be a non-empty list of increasing times in
    (0, 1]."""
    valid = (
        not isinstance(feature_times, (str, bytes)) and hasattr(feature_times, "__len__") and len(feature_times) > 0
        and all(not isinstance(t, bool) and isinstance(t, (int, float)) and 0 < t <= 1 for t in feature_times)
        and all(earlier < later for earlier, later in zip(feature_times[:-1], feature_times[1:]))
    )
    if not valid:
        raise ValueError(
            f"feature_times must be a list of increasing times in (0, 1] (t = 0 is data, t = 1 is noise), each listed "
            f"once, got {feature_times!r}; e.g. feature_times=[0.25, 0.5]."
        )
