"""Step-by-step parity of mosaicjax.diffusion.schedulers with diffusers' schedulers (float32).

Both sides start from the same noise and are fed the same random "model outputs" at every step; timesteps,
init_noise_sigma, scaled model inputs and every intermediate sample must agree.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from mosaicjax.diffusion import schedulers as S  # noqa: E402

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
TOL = 1e-6  # about 8 float32 ulps of the step's largest value
CLASSES = {"ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler,
           "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}


def _run_reference(name, config, num_steps, x0, outs, sigmas=None):
    ref = CLASSES[name].from_config(config)
    ref.set_timesteps(num_steps)
    if sigmas is not None:  # run diffusers' step code on a given sigma schedule
        ref.sigmas = torch.from_numpy(np.array(sigmas, np.float32))
    x = torch.from_numpy(x0) * ref.init_noise_sigma
    trace = [x.numpy().copy()]
    scaled = []
    for i, t in enumerate(ref.timesteps):
        scaled.append(ref.scale_model_input(x, t).numpy().copy())
        x = ref.step(torch.from_numpy(outs[i]), t, x).prev_sample
        trace.append(x.numpy().copy())
    return ref, np.stack(trace), np.stack(scaled)


def _run_ours_eager(sched, state, x0, outs):
    x = jnp.asarray(x0) * state.init_noise_sigma
    trace, scaled = [np.asarray(x)], []
    for i in range(state.num_steps):
        scaled.append(np.asarray(sched.scale_model_input(state, x, i)))
        x, state = sched.step(state, jnp.asarray(outs[i]), i, x)
        trace.append(np.asarray(x))
    return np.stack(trace), np.stack(scaled)


def _check(name, config, num_steps=7, seed=0, sigmas_from_ours=False, running_scale=False):
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    outs = rng.standard_normal((num_steps + 3, 2, 4, 8, 8), dtype=np.float32)
    sched = S.make_scheduler(name, dict(CLASSES[name].from_config(config).config))
    state = sched.set_timesteps(num_steps)
    sigmas = None
    if sigmas_from_ours:
        sigmas = np.asarray(state.coefs["sigmas"])
    ref, ref_trace, ref_scaled = _run_reference(name, config, num_steps, x0, outs, sigmas)
    ref_t = ref.timesteps.numpy().astype(np.float32)
    if np.all(ref_t == np.round(ref_t)):
        np.testing.assert_array_equal(np.asarray(state.timesteps), ref_t)
    else:  # Euler+Karras: fractional timesteps from log-sigmas, within an ulp of torch's float32 sqrt
        np.testing.assert_allclose(np.asarray(state.timesteps), ref_t, rtol=1e-6)
    # 2 ulp: torch's float32 sqrt on this CPU is not always correctly rounded (numpy's is).
    np.testing.assert_allclose(float(state.init_noise_sigma), float(ref.init_noise_sigma), rtol=2.5e-7)
    trace, scaled = _run_ours_eager(sched, state, x0, outs)
    # Tight: the per-step scalars are computed as diffusers does; only elementwise rounding may differ.
    # Errors are judged against each step's scale: late steps subtract large, nearly equal terms. With
    # running_scale, against the largest sample so far (an ulp of it survives a later cancellation).
    for i in range(len(trace)):
        scale = np.abs(ref_trace[:i + 1] if running_scale else ref_trace[i]).max()
        np.testing.assert_allclose(trace[i], ref_trace[i], rtol=0, atol=TOL * scale,
                                   err_msg=f"{name} sample after step {i}")
    for i in range(len(scaled)):  # scaled[i] is trace[i] times a constant: same relative scale
        scale = np.abs(ref_trace[:i + 1] if running_scale else ref_trace[i]).max()
        scale *= np.abs(ref_scaled[i]).max() / np.abs(ref_trace[i]).max()
        np.testing.assert_allclose(scaled[i], ref_scaled[i], rtol=0, atol=TOL * scale,
                                   err_msg=f"{name} scaled input at step {i}")
    return sched, state, x0, outs, trace


SPACINGS = ["leading", "trailing", "linspace"]
PREDICTIONS = ["epsilon", "v_prediction"]


@pytest.mark.parametrize("name,prediction,spacing",
                         list(itertools.product(["ddim", "euler", "dpmpp_2m"], PREDICTIONS, SPACINGS)))
def test_parity_sd_schedule(name, prediction, spacing):
    config = dict(SD_BETAS, prediction_type=prediction, timestep_spacing=spacing, steps_offset=1,
                  set_alpha_to_one=False, clip_sample=False)
    _check(name, config)


@pytest.mark.parametrize("name,extra", [
    ("ddim", dict(beta_schedule="linear", set_alpha_to_one=True, clip_sample=True, steps_offset=0)),
    ("ddim", dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing", prediction_type="v_prediction",
                  clip_sample=False)),
    ("ddim", dict(prediction_type="sample", clip_sample=False)),
    ("euler", dict(use_karras_sigmas=True)),
    ("euler", dict(use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1)),
    ("euler", dict(final_sigmas_type="sigma_min", timestep_spacing="trailing")),
    ("euler", dict(prediction_type="sample", beta_schedule="linear")),
    ("dpmpp_2m", dict(use_karras_sigmas=True)),
    ("dpmpp_2m", dict(use_karras_sigmas=True, prediction_type="v_prediction", timestep_spacing="trailing")),
    ("dpmpp_2m", dict(final_sigmas_type="sigma_min", lower_order_final=True)),
    ("dpmpp_2m", dict(solver_type="heun", euler_at_final=True)),
    ("dpmpp_2m", dict(solver_order=1)),
    ("dpmpp_2m", dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", final_sigmas_type="sigma_min",
                      prediction_type="v_prediction")),
])
def test_parity_options(name, extra):
    _check(name, dict(SD_BETAS, **extra))


def test_dpm_many_steps_uses_second_order_to_the_end():
    # >= 15 steps with final_sigmas_type sigma_min: diffusers keeps the second-order update on the last step.
    _check("dpmpp_2m", dict(SD_BETAS, final_sigmas_type="sigma_min", timestep_spacing="leading", steps_offset=1),
           num_steps=16)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m"])
def test_jitted_fori_loop_matches_eager(name):
    """The functional API runs inside one jitted lax loop with the state as an argument, no recompilation."""
    config = dict(SD_BETAS, steps_offset=1, timestep_spacing="leading")
    sched, state, x0, outs, trace = _check(name, config, num_steps=6)

    @jax.jit
    def sample(state, x, outs):
        state = sched.prepare(state, x)
        x = x * state.init_noise_sigma

        def body(i, carry):
            x, st = carry
            x_in = sched.scale_model_input(st, x, i)
            model_out = outs[i] + 0.0 * x_in  # stand-in for the UNet, depends on its input
            return sched.step(st, model_out, i, x)

        return jax.lax.fori_loop(0, st_len(state), body, (x, state))[0]

    def st_len(state):
        return state.timesteps.shape[0]

    out = sample(state, jnp.asarray(x0), jnp.asarray(outs[:6]))
    np.testing.assert_allclose(np.asarray(out), trace[-1], rtol=1e-5, atol=1e-5 * np.abs(trace[-1]).max())
    # A different schedule of the same length reuses the compiled program.
    other = S.make_scheduler(name, dict(config, timestep_spacing="trailing")).set_timesteps(6)
    before = sample._cache_size()
    sample(other, jnp.asarray(x0), jnp.asarray(outs[:6]))
    assert sample._cache_size() == before


def test_class_defaults_and_errors():
    # Missing keys take each class's defaults, as from_config does (DDIM: leading spacing, clip_sample on).
    assert S.make_scheduler("ddim", {}).config.timestep_spacing == "leading"
    assert S.make_scheduler("DDIMScheduler", {}).config.clip_sample is True
    assert S.make_scheduler("euler", {"skip_prk_steps": True}).config.timestep_spacing == "linspace"
    assert S.scheduler_name("PNDMScheduler") is None
    with pytest.raises(ValueError, match="unknown scheduler"):
        S.make_scheduler("pndm", {})
    with pytest.raises(NotImplementedError, match="thresholding"):
        S.make_scheduler("ddim", {"thresholding": True})
    with pytest.raises(NotImplementedError, match="solver_order"):
        S.make_scheduler("dpmpp_2m", {"solver_order": 3})
    with pytest.raises(ValueError, match="num_inference_steps"):
        S.make_scheduler("euler", {}).set_timesteps(0)


def test_betas_match_torch_bitwise():
    for name, cfg in [("ddim", SD_BETAS), ("euler", dict(beta_schedule="linear")),
                      ("dpmpp_2m", dict(beta_schedule="squaredcos_cap_v2"))]:
        ref = CLASSES[name].from_config(cfg)
        ours = S.alphas_cumprod(S.make_scheduler(name, cfg).config)
        np.testing.assert_array_equal(ours, ref.alphas_cumprod.numpy())


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m"])
def test_zero_terminal_snr(name):
    """rescale_betas_zero_snr: the rescaled schedule agrees to ulps, and sampling agrees step by step on it.

    torch's float32 sqrt is not correctly rounded (numpy's is), so the rescaled alphas_cumprod and the sigmas
    differ from torch's by an ulp here and there. Zero-SNR sampling is ill-conditioned in float32 in both
    libraries: the last DDIM step takes sqrt(1 - alphas_cumprod[0]) with alphas_cumprod[0] ~ 0.99998, and Euler
    starts at sigma = 4096 (torch rounds sqrt(2**24 - 1) up to 4096.0, numpy correctly down), cancelling
    x - 4096 * eps. So the trajectories are compared on one schedule: torch's betas for DDIM (trained_betas),
    our sigmas injected into diffusers' scheduler for Euler/DPM, whose terminal pin needs the flag itself.
    """
    cfg = dict(SD_BETAS, beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True,
               timestep_spacing="trailing", prediction_type="v_prediction", clip_sample=False)
    ref = CLASSES[name].from_config(cfg)
    ref.set_timesteps(7)
    sched = S.make_scheduler(name, cfg)
    np.testing.assert_allclose(S.alphas_cumprod(sched.config)[:-1], ref.alphas_cumprod.numpy()[:-1],
                               rtol=1e-6, atol=0)
    if name == "ddim":
        _check(name, dict(cfg, rescale_betas_zero_snr=False, trained_betas=ref.betas.numpy().tolist()))
    else:
        ours = np.asarray(sched.set_timesteps(7).coefs["sigmas"])
        np.testing.assert_allclose(ours, ref.sigmas.numpy(), rtol=2e-6)  # inherits the alphas_cumprod ulps
        # Euler's first step lands at |x| ~ 4 from x ~ 4096 * noise (x + d * dt cancels ~12000 against ~12000),
        # so one float32 ulp of the first sample (~1e-3) is the honest scale of the later steps' agreement.
        _check(name, cfg, sigmas_from_ours=True, running_scale=(name == "euler"))
