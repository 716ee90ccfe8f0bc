"""Sampling throughput (images/s): class-conditional DiT-XL/2 at 256 px with classifier-free guidance, dit_jax vs
the diffusers ``DiTPipeline`` (same device, same run, same random weights, VAE decode included).

  python benchmarks/sampling.py                                  # GPU: 250 DDPM + 50 DDIM steps, batch 16, bf16
  python benchmarks/sampling.py --batch 1 --depth 2 --steps 10,5 # CPU: a shallow model and few steps (minutes)

Both sides start from Gaussian latents, run the sampler on the CFG-doubled batch (class labels | null class 1000,
guidance on all 4 latent channels, as ``DiTPipeline``), decode with the SD ``AutoencoderKL`` (4 blocks,
128/256/512/512) and return float images in [0, 1] on the host (``output_type="np"``). dit_jax
(``--jax-path``): ``dit_jax.pipelines.ClassConditionalPipeline`` (what ``dit_jax.pipelines.load`` builds; the
default when the package has it), or ``components``: the trajectory + decode as one jitted function
(``dit_jax.diffusion.sample`` over ``dit_jax.diffusion.cfg``, then ``AutoencoderKL.decode``). dit_jax's DDPM uses the
learned-range variance (the original DiT sampler), diffusers' ``DiTPipeline`` drops the variance channels
(fixed-small variance) — the cost difference is a few elementwise ops.
The DiT is exported to diffusers through ``dit_jax.convert``, so both sides hold the same weights.

A second line per run times the VAE decode alone (256 px, the same batch), so the denoising loop's share can be
read off. One JSON line per case (see benchmarks/common.py).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.builders import jax_model_params, jax_vae_params, torch_transformer, torch_vae
from benchmarks.common import (
    comparison_fields,
    default_dtype,
    emit,
    jax_dtype,
    jax_sync,
    on_accelerator,
    time_interleaved,
    torch_device,
    torch_dtype,
    torch_sync,
    wait_quiet,
)
from dit_jax import diffusion, models
from dit_jax.encoders import AutoencoderKL, unscale_latents, vae_preset
from dit_jax.models.flops import forward_flops

NULL_CLASS = 1000  # DiTPipeline's null label


def _cast(params, dtype: str):
    """Inference weights in the compute dtype, as ``pipe.to(torch.bfloat16)`` does on the torch side."""
    if dtype == "fp32":
        return params
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)


def jax_pipeline(cfg, vae_cfg, params, vae_params, *, method: str, steps: int, guidance: float, labels, dtype: str):
    """``run() -> images (B, H, W, 3) float32 numpy`` for a fixed batch of labels."""
    model = models.build(cfg)
    vae = AutoencoderKL(vae_cfg)
    schedule = diffusion.DDPMSchedule(learned_sigma=cfg.learn_sigma)
    b, s = len(labels), cfg.input_size
    latents = jax.random.normal(jax.random.key(0), (b, s, s, cfg.in_channels), jnp.float32)
    key = jax.random.key(1)
    y = jnp.asarray(labels, jnp.int32)

    @jax.jit
    def run(params, vae_params, latents, y, key):
        model_fn = lambda x, t, c: model.apply({"params": params}, x, t, c)  # noqa: E731
        guided = diffusion.cfg(model_fn, y, jnp.int32(NULL_CLASS), guidance)
        x = diffusion.sample(guided, latents, schedule=schedule, method=method, num_steps=steps, key=key)
        images = vae.apply({"params": vae_params}, unscale_latents(vae_cfg, x), method=AutoencoderKL.decode)
        return jnp.clip(images / 2 + 0.5, 0.0, 1.0)

    params, vae_params = _cast(params, dtype), _cast(vae_params, dtype)
    return lambda: np.asarray(run(params, vae_params, latents, y, key))


def jax_library_pipeline(cfg, vae_cfg, params, vae_params, *, method: str, steps: int, guidance: float, labels, dtype):
    """The same through ``dit_jax.pipelines.ClassConditionalPipeline`` (what ``dit_jax.pipelines.load`` builds),
    with the DiT scheduler config ``load`` uses, on one device."""
    from dit_jax.pipelines import DIT_SCHEDULER_CONFIG, ClassConditionalPipeline

    schedule, default_method, options = diffusion.from_diffusers_scheduler_config(DIT_SCHEDULER_CONFIG)
    pipe = ClassConditionalPipeline(
        model_config=cfg,
        params=_cast(params, dtype),
        schedule=schedule,
        method=default_method,
        options=options,
        vae_config=vae_cfg,
        vae_params=_cast(vae_params, dtype),
        scheduler_config=DIT_SCHEDULER_CONFIG,
        devices=jax.devices()[:1],
        source="benchmark",
    )
    b, s = len(labels), cfg.input_size
    latents = jax.random.normal(jax.random.key(0), (b, s, s, cfg.in_channels), jnp.float32)
    return lambda: pipe(
        labels, num_inference_steps=steps, guidance_scale=guidance, method=method, latents=latents, seed=1
    )


def _library_pipeline_available() -> bool:
    try:
        from dit_jax.pipelines import ClassConditionalPipeline  # noqa: F401
    except ImportError:
        return False
    return True


def torch_pipeline(transformer, vae, *, method: str, steps: int, guidance: float, labels, compile_model: bool):
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler, DiTPipeline

    common = dict(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    if method == "ddpm":
        scheduler = DDPMScheduler(**common, variance_type="fixed_small")
    else:
        scheduler = DDIMScheduler(**common, set_alpha_to_one=True)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    if compile_model:
        pipe.transformer = torch.compile(pipe.transformer)
    pipe.set_progress_bar_config(disable=True)
    device = torch_device()

    def run():
        g = torch.Generator(device).manual_seed(0)
        return pipe(
            class_labels=list(labels), guidance_scale=guidance, num_inference_steps=steps, generator=g, output_type="np"
        ).images

    return run


def main():
    on_acc = on_accelerator()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="ddpm,ddim", help="comma list of ddpm, ddim")
    ap.add_argument("--steps", default="250,50", help="steps per method (comma list, same order as --methods)")
    ap.add_argument("--batch", type=int, default=16 if on_acc else 1, help="images per call (model batch is 2×)")
    ap.add_argument("--depth", type=int, default=None, help="override DiT depth (keeps CPU runs short)")
    ap.add_argument("--scan", action="store_true", help="dit_jax: scanned blocks (nn.scan)")
    ap.add_argument("--dtype", default=default_dtype(), choices=["bf16", "fp32"])
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--model", default="DiT-XL/2")
    ap.add_argument("--iters", type=int, default=5 if on_acc else 2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument(
        "--jax-path",
        default="auto",
        choices=["auto", "pipeline", "components"],
        help="pipeline: dit_jax.pipelines.ClassConditionalPipeline; components: one jit of diffusion.sample + cfg + "
        "VAE decode; auto: the pipeline when the package has it",
    )
    ap.add_argument("--torch-compile", action="store_true", help="torch.compile the diffusers transformer")
    ap.add_argument("--no-decode-line", action="store_true", help="skip the separate VAE-decode timing")
    ap.add_argument("--wait-quiet", type=float, default=None, help="before each case, wait for load average < X")
    args = ap.parse_args()

    jax_path = args.jax_path
    if jax_path == "auto":
        jax_path = "pipeline" if _library_pipeline_available() else "components"
    build_jax = jax_library_pipeline if jax_path == "pipeline" else jax_pipeline
    methods = args.methods.split(",")
    steps = [int(s) for s in args.steps.split(",")]
    if len(steps) != len(methods):
        ap.error(f"--steps gives {len(steps)} values for {len(methods)} methods")
    over = {"dtype": jax_dtype(args.dtype), "scan_blocks": args.scan}
    if args.depth:
        over["depth"] = args.depth
    cfg = models.preset(args.model, input_size=32, **over)
    vae_cfg = vae_preset("sd-vae-ft-ema", dtype=jax_dtype(args.dtype))
    params, vae_params = jax_model_params(cfg), jax_vae_params(vae_cfg)
    labels = [(207 + 97 * i) % 1000 for i in range(args.batch)]
    note = None if on_acc else "CPU: absolute times do not count; quote the ratio"
    reduced = (args.depth or 28) < 28 or steps != [250, 50][: len(steps)]
    if reduced:
        note = f"reduced: depth {cfg.depth} of 28, steps {dict(zip(methods, steps, strict=True))}" + (
            f"; {note}" if note else ""
        )

    if not args.no_torch:
        device, tdtype = torch_device(), torch_dtype(args.dtype)
        t_model = torch_transformer(cfg, params, device, tdtype).eval()
        t_vae = torch_vae(vae_cfg, vae_params, device, tdtype).eval()

    for method, n in zip(methods, steps, strict=True):
        load = wait_quiet(args.wait_quiet)
        fns = {
            "jax": (
                build_jax(
                    cfg,
                    vae_cfg,
                    params,
                    vae_params,
                    method=method,
                    steps=n,
                    guidance=args.guidance,
                    labels=labels,
                    dtype=args.dtype,
                ),
                lambda x: None,
            )
        }
        if not args.no_torch:
            fns["torch"] = (
                torch_pipeline(
                    t_model,
                    t_vae,
                    method=method,
                    steps=n,
                    guidance=args.guidance,
                    labels=labels,
                    compile_model=args.torch_compile,
                ),
                torch_sync,
            )
        t = time_interleaved(fns, warmup=args.warmup, iters=args.iters)
        model_flops = forward_flops(cfg, 32, 32) * 2 * args.batch * n
        rec = {
            "case": f"{args.model} 256px sampling, {method} {n} steps, cfg {args.guidance}",
            "dtype": args.dtype,
            "batch": args.batch,
            "depth": cfg.depth,
            "steps": n,
            "scan": args.scan,
            "jax_path": jax_path,
            "jax_ms": round(t["jax"]["median_ms"], 1),
            "jax_images_per_s": round(args.batch / t["jax"]["median_ms"] * 1e3, 4),
            "jax_dit_tflops_per_s": round(model_flops / t["jax"]["median_ms"] / 1e9, 3),
        }
        if "torch" in t:
            rec["torch_ms"] = round(t["torch"]["median_ms"], 1)
            rec["torch_images_per_s"] = round(args.batch / t["torch"]["median_ms"] * 1e3, 4)
            rec["torch_compile"] = args.torch_compile
        rec.update(comparison_fields(t["jax"], t.get("torch"), load))
        if note:
            rec["note"] = note
        emit(rec)

    if not args.no_decode_line:
        load = wait_quiet(args.wait_quiet)
        vae = AutoencoderKL(vae_cfg)
        z = jax.random.normal(jax.random.key(2), (args.batch, 32, 32, 4), jnp.float32)
        decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=AutoencoderKL.decode))
        vp = _cast(vae_params, args.dtype)
        fns = {"jax": (lambda: decode(vp, z), jax_sync)}
        if not args.no_torch:
            import torch

            tz = torch.from_numpy(np.asarray(z).transpose(0, 3, 1, 2).copy()).to(device, tdtype)

            def t_decode():
                with torch.inference_mode():
                    return t_vae.decode(tz).sample

            fns["torch"] = (t_decode, torch_sync)
        t = time_interleaved(fns, warmup=args.warmup, iters=args.iters)
        rec = {
            "case": "SD VAE decode 256px (the sampling runs' decode share)",
            "dtype": args.dtype,
            "batch": args.batch,
            "jax_ms": round(t["jax"]["median_ms"], 1),
        }
        if "torch" in t:
            rec["torch_ms"] = round(t["torch"]["median_ms"], 1)
        rec.update(comparison_fields(t["jax"], t.get("torch"), load))
        emit(rec)


if __name__ == "__main__":
    main()
