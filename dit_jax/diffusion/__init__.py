"""Diffusion: noise schedules, DDPM (ADM, learned sigma) and rectified-flow objectives, samplers that reproduce the
diffusers schedulers and the original DiT/PixArt samplers, and classifier-free guidance."""

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
from dit_jax.diffusion.guidance import cfg
from dit_jax.diffusion.samplers import Plan, make_plan, model_timesteps, sample, step_noise
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
    "cfg",
    "ddpm_loss",
    "density_transform",
    "discretized_gaussian_log_likelihood",
    "flow_loss",
    "flow_loss_weight",
    "from_diffusers_scheduler_config",
    "guidance",
    "learned_range_log_variance",
    "make_betas",
    "make_plan",
    "model_timesteps",
    "normal_kl",
    "predict_x0",
    "q_posterior_mean_variance",
    "q_sample",
    "sample",
    "step_noise",
    "sample_flow_sigmas",
    "space_timesteps",
    "spaced_betas",
    "time_shift",
    "training_target",
    "vb_terms_bpd",
]
