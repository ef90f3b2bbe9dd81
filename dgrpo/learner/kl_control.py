"""The KL budget: an adaptive kl_coef that holds KL(policy || reference) per sequence near a target.

Ziegler et al. (2019), "Fine-Tuning Language Models from Human Preferences", section 2.2: after each
measurement of the KL,

    e = clip(KL / target - 1, -0.2, 0.2)
    kl_coef <- kl_coef * (1 + e * n / horizon)

with n the steps since the previous update (at most `horizon`, so a long gap cannot take the factor to 0 or
below). The coefficient grows while the KL is above the target and shrinks while it is below; the clip
bounds each move to a factor 1 +- 0.2 n / horizon, so one noisy measurement cannot swing it.
Pure Python: the learner feeds it the KL it measures each step and saves its state with its
checkpoint.
"""

from __future__ import annotations

import math

ERROR_CLIP = 0.2


class AdaptiveKLController:
    def __init__(self, init_coef: float, target: float, horizon: float):
        if not init_coef > 0:
            raise ValueError(f"an adaptive kl_coef moves by factors and needs a start value > 0, got {init_coef}")
        if not target > 0 or not horizon >= 1:
            raise ValueError(f"the KL target must be > 0 and the horizon >= 1 step, got target {target}, "
                             f"horizon {horizon}")
        self.coef = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)
        self.last_step: int | None = None

    def update(self, kl: float, step: int) -> float:
        """Feed the KL per sequence measured at `step`; returns the new coefficient. A non-finite KL is ignored
        (the next finite one then counts the steps in between)."""
        if not math.isfinite(kl):
            return self.coef
        n = 1 if self.last_step is None else min(max(step - self.last_step, 1), self.horizon)
        error = min(max(kl / self.target - 1.0, -ERROR_CLIP), ERROR_CLIP)
        self.coef *= 1.0 + error * n / self.horizon
        self.last_step = step
        return self.coef

    def state_dict(self) -> dict:
        return {"coef": self.coef, "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.coef = float(state["coef"])
        self.last_step = state["last_step"]
