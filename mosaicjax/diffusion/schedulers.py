"""Diffusion samplers (DDIM, Euler, DPM-Solver++ 2M) as pure functions over a float32 array state.

Semantics are diffusers' (`DDIMScheduler`, `EulerDiscreteScheduler`, `DPMSolverMultistepScheduler`) read from the
same `scheduler_config.json`, so a diffusers folder samples the same trajectory here as there. The split:

- `set_timesteps(num_steps)` runs once per request on the host in numpy, reproducing diffusers' float32 arithmetic
  (torch's FMA linspace, its float64-accumulated cumprod, numpy's interp), and returns a `SchedulerState` of
  arrays: the timesteps the UNet sees plus every per-step scalar coefficient the update needs.
- `scale_model_input(state, x, i)` / `step(state, model_out, i, x)` are elementwise JAX functions of a step index
  `i` that may be traced, so the whole sampling loop fits in one `jax.lax.fori_loop`/`scan` under `jax.jit`
  with the state as an argument (a new step count or schedule never needs new constants, only new arrays).

Per-step scalars are precomputed with the same operation order diffusers uses on its 0-d float32 tensors, and the
elementwise updates keep diffusers' expression order, so results agree to float32 rounding.

The state is always float32: the samplers divide by small sigmas and difference consecutive model outputs, which
bf16 cannot carry (NaNs / black images); callers cast UNet outputs to float32 before `step`.

Usage:
    sched = make_scheduler('dpmpp_2m', json.load(open('scheduler/scheduler_config.json')))
    state = sched.set_timesteps(30)
    state = sched.prepare(state, latents)           # allocates the multistep history for lax loops
    x = latents * state.init_noise_sigma
    for i in range(30):                             # or inside jax.lax.fori_loop
        eps = unet(sched.scale_model_input(state, x, i), state.timesteps[i])
        x, state = sched.step(state, eps, i, x)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# Our short names and the diffusers class each reproduces (the `_class_name` in scheduler_config.json).
SCHEDULER_CLASSES = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}
_NAME_OF_CLASS = {v: k for k, v in SCHEDULER_CLASSES.items()}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The union of the diffusers scheduler options we honour; names and meanings are diffusers'.

    Defaults here are those shared by the three classes; `make_scheduler` applies each class's own defaults for
    keys the json leaves out (e.g. DDIM's timestep_spacing is 'leading' but Euler's is 'linspace'), exactly as
    diffusers' `from_config` does. Frozen and hashable so a scheduler can be a static jit argument / cache key.
    """
    # Length of the training noise schedule (timesteps 0..N-1).
    num_train_timesteps: int = 1000
    # First and last beta of the training schedule.
    beta_start: float = 0.0001
    beta_end: float = 0.02
    # 'linear' (betas evenly spaced), 'scaled_linear' (sqrt(betas) evenly spaced: SD), 'squaredcos_cap_v2'.
    beta_schedule: str = "linear"
    # Explicit betas overriding the three fields above (tuple of floats), or None.
    trained_betas: tuple | None = None
    # What the UNet predicts: 'epsilon' (noise), 'v_prediction' (SD2-768, v = a*eps - s*x0), 'sample' (x0).
    prediction_type: str = "epsilon"
    # How inference timesteps are picked from the training range: 'leading', 'trailing' or 'linspace'.
    timestep_spacing: str = "linspace"
    # Added to 'leading' timesteps (SD1/SD2 configs use 1).
    steps_offset: int = 0
    # Rescale betas to zero terminal SNR (arXiv 2305.08891).
    rescale_betas_zero_snr: bool = False
    # DDIM: clip the predicted x0 to [-clip_sample_range, clip_sample_range] (SD configs turn it off).
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    # DDIM: the alpha product "before" the last step is 1 (True) or alphas_cumprod[0] (False; SD uses False).
    set_alpha_to_one: bool = True
    # Dynamic thresholding (Imagen); unsupported here, rejected when set.
    thresholding: bool = False
    # Euler: 'linear' interpolation of sigmas at fractional timesteps ('log_linear' is rejected).
    interpolation_type: str = "linear"
    # Euler/DPM: Karras et al. sigma spacing (rho = 7) between sigma_min and sigma_max.
    use_karras_sigmas: bool = False
    # Euler: overrides of the Karras endpoints (None: the training schedule's extremes).
    sigma_min: float | None = None
    sigma_max: float | None = None
    # Euler/DPM: last sigma of the schedule: 'zero' (land on the clean sample) or 'sigma_min'.
    final_sigmas_type: str = "zero"
    # DPM: multistep order (1 or 2; 3 is rejected) and algorithm ('dpmsolver++' only).
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    # DPM: second-order update form, 'midpoint' or 'heun'.
    solver_type: str = "midpoint"
    # DPM: use first order on the last step when there are fewer than 15 steps (stabilises few-step sampling).
    lower_order_final: bool = True
    # DPM: always use first order (Euler) on the last step.
    euler_at_final: bool = False
    # DPM: clip lambda(t) from below (drops the noisiest timesteps); -inf keeps them all.
    lambda_min_clipped: float = -math.inf
    # Options that exist in diffusers but are not implemented; a truthy value is rejected with a clear error.
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    timestep_type: str = "discrete"
    variance_type: str | None = None


# diffusers' per-class constructor defaults that differ from the dataclass defaults, and the keys each accepts.
_CLASS_DEFAULTS = {
    "ddim": {"timestep_spacing": "leading", "clip_sample": True},
    "euler": {},
    "dpmpp_2m": {},
}
_COMMON_KEYS = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "prediction_type", "timestep_spacing", "steps_offset", "rescale_betas_zero_snr"}
_CLASS_KEYS = {
    "ddim": _COMMON_KEYS | {"clip_sample", "clip_sample_range", "set_alpha_to_one", "thresholding"},
    "euler": _COMMON_KEYS | {"interpolation_type", "use_karras_sigmas", "sigma_min", "sigma_max",
                             "final_sigmas_type", "use_exponential_sigmas", "use_beta_sigmas", "timestep_type"},
    "dpmpp_2m": _COMMON_KEYS | {"use_karras_sigmas", "final_sigmas_type", "solver_order", "algorithm_type",
                                "solver_type", "lower_order_final", "euler_at_final", "lambda_min_clipped",
                                "thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                                "use_flow_sigmas", "variance_type"},
}


@flax.struct.dataclass
class SchedulerState:
    """Everything one sampling run needs, as arrays (a pytree: pass it into jit, carry it through lax loops).

    timesteps: float32 [N] the timestep value the UNet is conditioned on at step i (integers for DDIM/DPM).
    init_noise_sigma: float32 [] the pure-noise latents are multiplied by this before the first step.
    coefs: dict of float32 [N] per-step scalars of the update, precomputed on the host; Euler and DPM also
      keep 'sigmas' [N+1] (the noise level before step i, and 0 or sigma_min after the last).
    prev: float32 multistep history (DPM's previous x0 prediction); [] until `prepare` shapes it like x.
    """
    timesteps: jax.Array
    init_noise_sigma: jax.Array
    coefs: dict
    prev: jax.Array

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


def scheduler_name(class_name: str) -> str | None:
    """Our short name for a diffusers scheduler class name, or None when we do not implement it."""
    return _NAME_OF_CLASS.get(class_name)


def make_scheduler(name: str, config: Mapping[str, Any] | None = None) -> "Scheduler":
    """A scheduler of kind `name` ('ddim' | 'euler' | 'dpmpp_2m', or the diffusers class name) from a
    scheduler_config.json dict. Keys the class does not take are ignored and missing keys get the class's
    defaults, as diffusers' `<Class>.from_config(other_scheduler.config)` does."""
    name = _NAME_OF_CLASS.get(name, name)
    if name not in SCHEDULER_CLASSES:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULER_CLASSES)}")
    values = dict(_CLASS_DEFAULTS[name])
    for key, value in (config or {}).items():
        if key in _CLASS_KEYS[name]:
            values[key] = tuple(value) if isinstance(value, list) else value
    if values.get("lambda_min_clipped") is None:
        values.pop("lambda_min_clipped", None)
    cfg = SchedulerConfig(**values)
    cls = {"ddim": DDIMScheduler, "euler": EulerScheduler, "dpmpp_2m": DPMSolverPlusPlus2M}[name]
    return cls(cfg)


# ----------------------------------------------------------------------------------------------------------------
# Host-side schedule arithmetic, bit-compatible with diffusers' torch float32 code.

def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32) on CPU: float32 endpoints and step, the first half counted
    up from start and the second half down from end, each value one fused multiply-add (rounded once)."""
    a, b = np.float32(start), np.float32(end)
    step = np.float64(np.float32((b - a) / np.float32(steps - 1)))
    idx = np.arange(steps)
    up = (np.float64(a) + step * idx).astype(np.float32)
    down = (np.float64(b) - step * (steps - 1 - idx)).astype(np.float32)
    return np.where(idx < steps // 2, up, down)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    # torch's CPU cumprod of float32 accumulates in float64 and rounds each partial product.
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _betas_for_alpha_bar(n: int, max_beta: float = 0.999) -> np.ndarray:
    fn = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731 (the cosine schedule)
    return np.asarray([min(1 - fn((i + 1) / n) / fn(i / n), max_beta) for i in range(n)], np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    alphas_bar_sqrt = np.sqrt(_cumprod_f32(np.float32(1.0) - betas))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """float32 [num_train_timesteps] cumulative products of (1 - beta), as diffusers computes them."""
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        betas = np.asarray(cfg.trained_betas, np.float32)
    elif cfg.beta_schedule == "linear":
        betas = _torch_linspace_f32(cfg.beta_start, cfg.beta_end, n)
    elif cfg.beta_schedule == "scaled_linear":
        betas = _torch_linspace_f32(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n) ** 2
    elif cfg.beta_schedule == "squaredcos_cap_v2":
        betas = _betas_for_alpha_bar(n)
    else:
        raise ValueError(f"beta_schedule {cfg.beta_schedule!r} is not one of linear, scaled_linear, "
                         "squaredcos_cap_v2")
    if cfg.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return _cumprod_f32(np.float32(1.0) - betas)


def _spaced_timesteps(cfg: SchedulerConfig, num_steps: int, dtype, last: int | None = None) -> np.ndarray:
    """diffusers' timestep_spacing rules (DDIM/Euler form: N points; DPM passes `last` and trims itself)."""
    n = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        if dtype == np.float32:  # Euler builds a float32 linspace and keeps fractions
            return np.linspace(0, n - 1, num_steps, dtype=np.float32)[::-1].copy()
        return np.linspace(0, n - 1, num_steps).round()[::-1].copy().astype(np.int64)
    if cfg.timestep_spacing == "leading":
        ratio = n // num_steps
        return (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(dtype) + cfg.steps_offset
    if cfg.timestep_spacing == "trailing":
        ratio = n / num_steps
        return np.round(np.arange(n, 0, -ratio)).astype(dtype) - 1
    raise ValueError(f"timestep_spacing {cfg.timestep_spacing!r} is not one of leading, trailing, linspace")


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep whose log-sigma interpolates to `sigma` (diffusers' `_sigma_to_t`)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def _karras(sigma_lo: float, sigma_hi: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho, max_inv_rho = sigma_lo ** (1 / rho), sigma_hi ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float32)


def _state(timesteps, init_noise_sigma, coefs) -> SchedulerState:
    return SchedulerState(
        timesteps=jnp.asarray(np.asarray(timesteps, np.float32)),
        init_noise_sigma=jnp.asarray(np.float32(init_noise_sigma)),
        coefs={k: jnp.asarray(_f32(v)) for k, v in coefs.items()},
        prev=jnp.zeros((), jnp.float32))


# ----------------------------------------------------------------------------------------------------------------
# The schedulers.

@dataclasses.dataclass(frozen=True)
class Scheduler:
    """Base: a hashable config plus the functional sampling API (see the module docstring)."""
    config: SchedulerConfig
    name = "base"

    def __post_init__(self):
        c = self.config
        if c.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type {c.prediction_type!r} is not one of epsilon, v_prediction, sample")
        unsupported = {"thresholding": c.thresholding, "use_exponential_sigmas": c.use_exponential_sigmas,
                       "use_beta_sigmas": c.use_beta_sigmas, "use_lu_lambdas": c.use_lu_lambdas,
                       "use_flow_sigmas": c.use_flow_sigmas, "variance_type": c.variance_type,
                       "timestep_type": c.timestep_type != "discrete",
                       "interpolation_type": c.interpolation_type != "linear"}
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise NotImplementedError(f"{type(self).__name__}: scheduler options {bad} are not supported "
                                      f"(config: { {k: getattr(c, k) for k in bad} })")

    def set_timesteps(self, num_steps: int) -> SchedulerState:
        raise NotImplementedError

    def prepare(self, state: SchedulerState, x: jax.Array) -> SchedulerState:
        """Shapes the multistep history like the sample so the state can be a fixed-shape loop carry."""
        return state

    def scale_model_input(self, state: SchedulerState, x: jax.Array, i) -> jax.Array:
        return x

    def step(self, state: SchedulerState, model_out: jax.Array, i, x: jax.Array):
        raise NotImplementedError

    def _check_steps(self, num_steps: int):
        if not 1 <= num_steps <= self.config.num_train_timesteps:
            raise ValueError(f"num_inference_steps={num_steps} must be in [1, {self.config.num_train_timesteps}]")


class DDIMScheduler(Scheduler):
    """Deterministic DDIM (eta = 0), diffusers' `DDIMScheduler`."""
    name = "ddim"

    def set_timesteps(self, num_steps: int) -> SchedulerState:
        c = self.config
        self._check_steps(num_steps)
        ac = alphas_cumprod(c)
        t = _spaced_timesteps(c, num_steps, np.int64)
        # diffusers steps back by a fixed stride whatever the spacing, so reproduce that (not t[i+1]).
        prev_t = t - c.num_train_timesteps // num_steps
        final = np.float32(1.0) if c.set_alpha_to_one else ac[0]
        a_t = ac[t]
        a_prev = np.where(prev_t >= 0, ac[np.maximum(prev_t, 0)], final).astype(np.float32)
        beta_t = np.float32(1) - a_t
        return _state(t, 1.0, {
            "sqrt_a": np.sqrt(a_t), "sqrt_b": np.sqrt(beta_t), "sqrt_a_prev": np.sqrt(a_prev),
            # eta = 0: std_dev_t is 0, so the direction coefficient is sqrt(1 - a_prev - 0).
            "sqrt_dir": np.sqrt(np.float32(1) - a_prev - np.float32(0))})

    def step(self, state, model_out, i, x):
        k = {n: v[i] for n, v in state.coefs.items()}
        m = model_out.astype(jnp.float32)
        x = x.astype(jnp.float32)
        pt = self.config.prediction_type
        if pt == "epsilon":
            x0, eps = (x - k["sqrt_b"] * m) / k["sqrt_a"], m
        elif pt == "v_prediction":
            x0, eps = k["sqrt_a"] * x - k["sqrt_b"] * m, k["sqrt_a"] * m + k["sqrt_b"] * x
        else:
            x0, eps = m, (x - k["sqrt_a"] * m) / k["sqrt_b"]
        if self.config.clip_sample:
            x0 = jnp.clip(x0, -self.config.clip_sample_range, self.config.clip_sample_range)
        return k["sqrt_a_prev"] * x0 + k["sqrt_dir"] * eps, state


def _sigma_schedule(c: SchedulerConfig, num_steps: int, timesteps: np.ndarray, ac: np.ndarray, karras_from: str):
    """Sigmas at the inference timesteps (+ the final sigma) and the possibly Karras-respaced timesteps.

    `karras_from`: where Karras spacing takes its endpoints, which differs between the diffusers classes:
    'inference' (Euler: the interpolated sigmas at the first/last inference timestep, or config sigma_min/max)
    or 'train' (DPM: the extremes of the training schedule, timesteps then rounded to integers).
    """
    sigmas_train = np.sqrt((np.float32(1) - ac) / ac)  # float32 [num_train]
    log_sigmas = np.log(sigmas_train)
    sigmas = np.interp(timesteps, np.arange(0, len(sigmas_train)), sigmas_train)
    if c.use_karras_sigmas:
        if karras_from == "inference":
            lo = c.sigma_min if c.sigma_min is not None else float(sigmas[-1])
            hi = c.sigma_max if c.sigma_max is not None else float(sigmas[0])
        else:
            lo, hi = float(sigmas_train[0]), float(sigmas_train[-1])
        sigmas = _karras(lo, hi, num_steps)
        timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        if karras_from == "train" and c.beta_schedule != "squaredcos_cap_v2":
            timesteps = timesteps.round()
    if c.final_sigmas_type == "sigma_min":
        last = np.sqrt((np.float32(1) - ac[0]) / ac[0])
    elif c.final_sigmas_type == "zero":
        last = 0
    else:
        raise ValueError(f"final_sigmas_type {c.final_sigmas_type!r} is not one of zero, sigma_min")
    return np.concatenate([sigmas, [last]]).astype(np.float32), timesteps, sigmas_train


class EulerScheduler(Scheduler):
    """Euler sampler of Karras et al. in sigma space (s_churn = 0), diffusers' `EulerDiscreteScheduler`."""
    name = "euler"

    def set_timesteps(self, num_steps: int) -> SchedulerState:
        c = self.config
        self._check_steps(num_steps)
        ac = alphas_cumprod(c)
        if c.rescale_betas_zero_snr:
            ac = ac.copy()
            ac[-1] = 2.0 ** -24  # diffusers keeps the last sigma finite
        t = _spaced_timesteps(c, num_steps, np.float32)
        sigmas, t, _ = _sigma_schedule(c, num_steps, t, ac, karras_from="inference")
        smax = sigmas.max()
        init = smax if c.timestep_spacing in ("linspace", "trailing") else np.sqrt(smax * smax + np.float32(1))
        s = sigmas[:-1]
        return _state(t, init, {
            "sigmas": sigmas, "sigma": s, "sigma_next": sigmas[1:],
            "denom": np.sqrt(s * s + np.float32(1)),       # (sigma^2 + 1)^0.5: scale_model_input divides by it
            "sigma_sq1": s * s + np.float32(1),            # v-prediction's sample / (sigma^2 + 1)
            "neg_sigma_over_denom": -s / np.sqrt(s * s + np.float32(1))})

    def scale_model_input(self, state, x, i):
        return x.astype(jnp.float32) / state.coefs["denom"][i]

    def step(self, state, model_out, i, x):
        k = {n: v[i] for n, v in state.coefs.items()}
        m = model_out.astype(jnp.float32)
        x = x.astype(jnp.float32)
        sigma_hat = k["sigma"]  # gamma = 0 (no churn): sigma_hat == sigma
        pt = self.config.prediction_type
        if pt == "epsilon":
            x0 = x - sigma_hat * m
        elif pt == "v_prediction":
            x0 = m * k["neg_sigma_over_denom"] + x / k["sigma_sq1"]
        else:
            x0 = m
        derivative = (x - x0) / sigma_hat
        dt = k["sigma_next"] - sigma_hat
        return x + derivative * dt, state


class DPMSolverPlusPlus2M(Scheduler):
    """Multistep DPM-Solver++ (data prediction), order <= 2, diffusers' `DPMSolverMultistepScheduler`."""
    name = "dpmpp_2m"

    def __post_init__(self):
        super().__post_init__()
        c = self.config
        if c.algorithm_type != "dpmsolver++":
            raise NotImplementedError(f"algorithm_type {c.algorithm_type!r}: only 'dpmsolver++' is implemented")
        if c.solver_order not in (1, 2):
            raise NotImplementedError(f"solver_order={c.solver_order}: only orders 1 and 2 are implemented")
        if c.solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type {c.solver_type!r} is not one of midpoint, heun")

    def set_timesteps(self, num_steps: int) -> SchedulerState:
        c = self.config
        self._check_steps(num_steps)
        n = c.num_train_timesteps
        ac = alphas_cumprod(c)
        if c.rescale_betas_zero_snr:
            ac = ac.copy()
            ac[-1] = 2.0 ** -24
        lambda_t = np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1) - ac))
        last_t = n - int(np.searchsorted(lambda_t[::-1], c.lambda_min_clipped))
        if c.timestep_spacing == "linspace":
            t = np.linspace(0, last_t - 1, num_steps + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif c.timestep_spacing == "leading":
            ratio = last_t // (num_steps + 1)
            t = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + c.steps_offset
        elif c.timestep_spacing == "trailing":
            t = np.arange(last_t, 0, -n / num_steps).round().copy().astype(np.int64) - 1
        else:
            raise ValueError(f"timestep_spacing {c.timestep_spacing!r} is not one of leading, trailing, linspace")
        sigmas, t, _ = _sigma_schedule(c, num_steps, t, ac, karras_from="train")
        t = t.astype(np.int64)
        steps = len(t)

        # Per-step scalars in diffusers' 0-d float32 arithmetic (sigma -> alpha_t, sigma_t -> lambda).
        with np.errstate(divide="ignore", invalid="ignore"):
            alpha = np.float32(1) / np.sqrt(sigmas * sigmas + np.float32(1))   # [steps + 1]
            sig = sigmas * alpha
            lam = np.log(alpha) - np.log(sig)                                  # +inf where sigma = 0
            h = lam[1:] - lam[:-1]                                             # [steps]
            ratio = sig[1:] / sig[:-1]
            c0 = alpha[1:] * (np.exp(-h) - np.float32(1))                      # D0 coefficient (subtracted)
            h_prev = np.concatenate([[np.float32(1)], lam[1:-1] - lam[:-2]]).astype(np.float32)
            inv_r0 = np.float32(1) / (h_prev / h)                              # D1 = inv_r0 * (m0 - m1)
            if c.solver_type == "midpoint":
                c1 = np.float32(0.5) * c0                                      # x -= c1 * D1
            else:
                c1 = -(alpha[1:] * ((np.exp(-h) - np.float32(1)) / h + np.float32(1)))
        # Which steps fall back to first order: the first (no history) and, by diffusers' rule, the last.
        idx = np.arange(steps)
        last_first = c.euler_at_final or (c.lower_order_final and steps < 15) or c.final_sigmas_type == "zero"
        first = (idx == 0) | ((idx == steps - 1) & last_first) | (c.solver_order == 1)
        return _state(t, 1.0, {
            "sigmas": sigmas, "alpha_s": alpha[:-1], "sigma_s": sig[:-1], "ratio": ratio, "c0": c0,
            "c1": np.where(first, 0, c1), "inv_r0": np.where(first, 0, inv_r0),
            "first_order": first.astype(np.float32)})

    def prepare(self, state, x):
        return state.replace(prev=jnp.zeros(x.shape, jnp.float32))

    def step(self, state, model_out, i, x):
        k = {n: v[i] for n, v in state.coefs.items()}
        m = model_out.astype(jnp.float32)
        x = x.astype(jnp.float32)
        pt = self.config.prediction_type
        if pt == "epsilon":
            x0 = (x - k["sigma_s"] * m) / k["alpha_s"]
        elif pt == "v_prediction":
            x0 = k["alpha_s"] * x - k["sigma_s"] * m
        else:
            x0 = m
        prev = jnp.broadcast_to(state.prev, x0.shape)  # [] before `prepare` (plain Python loops)
        first = x * k["ratio"] - k["c0"] * x0
        second = first - k["c1"] * (k["inv_r0"] * (x0 - prev))
        # where, not arithmetic blending: the unused second-order branch can be inf/nan at the ends.
        out = jnp.where(k["first_order"] > 0, first, second)
        return out, state.replace(prev=x0)
