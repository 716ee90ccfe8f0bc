"""Diffusion: noise schedules, DDPM (ADM, learned sigma) and rectified-flow objectives, samplers that reproduce the
diffusers schedulers and the original DiT/PixArt samplers, classifier-free guidance, and the sampler policy shared by
training and pipelines (``make_schedule``, ``default_method``, ``sampler_settings``, ``generate``). Nothing here knows
a model: a model enters as a function ``model_fn(x, t[, cond])``."""

from dit_jax.diffusion import guidance
from dit_jax.diffusion.ddpm import (
    ddpm_loss,
    discretized_gaussian_log_likelihood,
    learned_range_log_variance,
    normal_kl,
    predict_x0,
    q_posterior_mean_variance,
    q_sample,
    training_target,
    vb_terms_bpd,
)
from dit_jax.diffusion.flow import density_transform, flow_loss, flow_loss_weight, sample_flow_sigmas
from dit_jax.diffusion.guidance import cfg, generate
from dit_jax.diffusion.policy import default_method, make_schedule, sampler_settings, split_options
from dit_jax.diffusion.samplers import (
    Plan,
    Trajectory,
    make_plan,
    make_trajectory,
    model_timesteps,
    sample,
    sd3_reference_sigmas,
    step_noise,
)
from dit_jax.diffusion.scheduler_config import from_diffusers_scheduler_config
from dit_jax.diffusion.schedules import (
    FLUX_DYNAMIC_SHIFT,
    DDPMSchedule,
    FlowSchedule,
    make_betas,
    space_timesteps,
    spaced_betas,
    time_shift,
)

__all__ = [
    "FLUX_DYNAMIC_SHIFT",
    "DDPMSchedule",
    "FlowSchedule",
    "Plan",
    "Trajectory",
    "cfg",
    "ddpm_loss",
    "default_method",
    "density_transform",
    "discretized_gaussian_log_likelihood",
    "flow_loss",
    "flow_loss_weight",
    "from_diffusers_scheduler_config",
    "generate",
    "guidance",
    "learned_range_log_variance",
    "make_betas",
    "make_plan",
    "make_schedule",
    "make_trajectory",
    "model_timesteps",
    "normal_kl",
    "predict_x0",
    "q_posterior_mean_variance",
    "q_sample",
    "sample",
    "sampler_settings",
    "sd3_reference_sigmas",
    "step_noise",
    "sample_flow_sigmas",
    "space_timesteps",
    "spaced_betas",
    "split_options",
    "time_shift",
    "training_target",
    "vb_terms_bpd",
]
