"""The divergence guard: skip steps whose gradients are not finite, and back the learning rate off when they repeat."""
import math


class Guard:
    """Skips a step whose grads contain NaN or inf (params, state and step count untouched) and counts it;
    after ``patience`` skips in a row the learning rate is multiplied by ``backoff`` (cumulatively).

    The check is one parallel pass over the grads (sum of squares and count of non-finite values) before the
    update; the scale multiplies every group's lr inside the update kernel. ``skipped_steps``,
    ``consecutive_skips`` and ``lr_factor`` are live state, saved in the optimizer's state dict.
    """

    def __init__(self, skip_nonfinite=True, backoff=0.5, patience=3):
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(f"Guard: skip_nonfinite must be a bool, got {skip_nonfinite!r}")
        if isinstance(backoff, bool) or not isinstance(backoff, (int, float)) or not 0.0 < backoff <= 1.0:
            raise ValueError(f"Guard: backoff must be in (0, 1], got {backoff!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"Guard: patience must be an int >= 1, got {patience!r}")
        self.skip_nonfinite = skip_nonfinite
        self.backoff = float(backoff)
        self.patience = patience
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.lr_factor = 1.0

    def admit(self, nonfinite_count):
        """Record one step's check; True if the step may go ahead."""
        if nonfinite_count == 0 or not self.skip_nonfinite:
            self.consecutive_skips = 0
            return True
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.patience:
            self.lr_factor *= self.backoff
            self.consecutive_skips = 0
        return False

    def state_dict(self):
        return {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
                "lr_factor": self.lr_factor}

    def load_state_dict(self, state):
        skipped, consecutive, factor = (int(state["skipped_steps"]), int(state["consecutive_skips"]),
                                        float(state["lr_factor"]))
        if skipped < 0 or consecutive < 0 or not (math.isfinite(factor) and 0.0 < factor <= 1.0):
            raise ValueError(f"invalid guard state {state!r}")
        self.skipped_steps, self.consecutive_skips, self.lr_factor = skipped, consecutive, factor

    def __repr__(self):
        return (f"Guard(skip_nonfinite={self.skip_nonfinite}, backoff={self.backoff}, patience={self.patience}; "
                f"skipped_steps={self.skipped_steps}, lr_factor={self.lr_factor})")
