"""LAMB: the rule (kernels: kernels/cpu/rules/lamb.py, kernels/cuda/rules/lamb.cuh)."""
import numpy as np

from ..optimizer import Optimizer
from ..reference import as_stored


def trust_ratio(param_norm, update_norm, max_trust_ratio):
    """||p|| / ||u|| clamped to [0, max_trust_ratio]; 1 where either norm is 0."""
    if param_norm == 0 or update_norm == 0:
        return 1.0
    return min(param_norm / update_norm, max_trust_ratio)


def lamb(param, grad, state, *, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True,
         max_trust_ratio=10.0, maximize=False, lr_scale=1.0, state_dtype=None):
    r"""The float64 reference of one tensor's step.

    .. math::
        m = \beta_1 m + (1 - \beta_1) g, \quad v = \beta_2 v + (1 - \beta_2) g^2, \quad
        u = \frac{m / (1 - \beta_1^t)}{\sqrt{v / (1 - \beta_2^t)} + \epsilon} + \lambda p, \quad
        p = p - \eta s \,\mathrm{trust}\, u, \quad \mathrm{trust} = \min(\|p\| / \|u\|, \tau)

    ``state_dtype``: the dtype the moments are stored in (or "8bit"), if u is to be computed from them as stored (the
    kernels' second pass reads them back; the reference backend passes it).
    """
    beta1, beta2 = betas
    step = state["step"] = state.get("step", 0) + 1
    g = -grad if maximize else grad
    m = beta1 * state.get("exp_avg", 0.0) + (1 - beta1) * g
    v = beta2 * state.get("exp_avg_sq", 0.0) + (1 - beta2) * g * g
    if state_dtype is not None:
        m, v = as_stored(m, "exp_avg", state_dtype), as_stored(v, "exp_avg_sq", state_dtype)
    state["exp_avg"], state["exp_avg_sq"] = m, v
    if bias_correction:
        m, v = m / (1 - beta1 ** step), v / (1 - beta2 ** step)
    update = m / (np.sqrt(v) + eps) + weight_decay * param
    trust = trust_ratio(np.linalg.norm(param), np.linalg.norm(update), max_trust_ratio)
    param -= lr * lr_scale * trust * update


class LAMB(Optimizer):
    r"""LAMB, layer-wise adaptive moments (You et al. 2020, "Large Batch Optimization for Deep Learning: Training
    BERT in 76 minutes"): Adam's direction with decoupled decay, and each tensor's step scaled by the ratio of the
    param's norm to the direction's.

    .. math::
        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        u_t = \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon} + \lambda p_{t-1}, \quad
        r_t = \mathrm{clamp}\Big(\frac{\|p_{t-1}\|}{\|u_t\|}, 0, \tau\Big) \;(1 \text{ where either norm is } 0) \\
        p_t = p_{t-1} - \eta_t s\, r_t\, u_t

    Without ``bias_correction`` :math:`m_t` and :math:`v_t` stand in for their corrections; :math:`\tau` is
    ``max_trust_ratio``. Norms are over each whole param tensor (its float32 master copy, where it has one), in
    float64; ``lr_scale`` (:math:`s`) scales the step, not the norms.

    Relation to the others: the paper's Algorithm 2 clips the ratio's numerator with a function :math:`\phi` and
    applies :math:`\eta\, \phi(\|p\|) / \|u\|`; here :math:`\phi` is the identity and the ratio is clamped to
    :math:`\tau` instead, as NVIDIA's and DeepSpeed's implementations do. apex's ``FusedLAMB`` differs in three ways:
    it clips the grads by their global norm first (here: ``max_grad_norm``), it uses the ratio only for params whose
    decay is nonzero (``use_nvlamb=False``), and it does not clamp the ratio.

    The norms need a reduction over each tensor before any of it can move: the step is two fused passes. The first
    updates the moments (reads p, g, m, v; writes m, v) and sums the squares of p and u per chunk; the second
    recomputes u from the new moments and moves p (reads p, m, v; writes p): 40 bytes per float32 param, against
    28 for AdamW. The chunks' sums are added in chunk order, so the result does not depend on the thread count. With
    16-bit states, u is computed from the moments as stored, in both passes.
    """

    KERNEL = "lamb"
    DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True,
                    max_trust_ratio=10.0, maximize=False)
    STATE_SLOTS = ("exp_avg", "exp_avg_sq")
    COLUMNS = ("beta1", "beta2", "eps", "weight_decay", "bias_correction", "max_trust_ratio")
    REFERENCE = staticmethod(lamb)
    ELEMENTWISE = False  # the trust ratio needs each whole tensor's norms

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, *, bias_correction=True,
                 max_trust_ratio=10.0, maximize=False, backend="auto", guard=None, **options):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      bias_correction=bias_correction, max_trust_ratio=max_trust_ratio,
                                      maximize=maximize), backend=backend, guard=guard, **options)

    @classmethod
    def reference_step(cls, param, grad, state, group, lr, lr_scale, state_dtype=None):
        cls.REFERENCE(param, grad, state, lr=lr, lr_scale=lr_scale, state_dtype=state_dtype,
                      **{key: group[key] for key in cls.DEFAULTS if key != "lr"})

    @classmethod
    def validate_hyperparameters(cls, group, where):
        super().validate_hyperparameters(group, where)
        cls.check_betas(group["betas"], where)
        cls.check_number(group["eps"], "eps", where, low=0.0)
        cls.check_flag(group["bias_correction"], "bias_correction", where)
        cls.check_number(group["max_trust_ratio"], "max_trust_ratio", where, low=0.0, low_open=True)
