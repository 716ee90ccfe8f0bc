"""Forward latency: dit_jax vs diffusers (same device, same run), and the KV-compression speedup.

  python -m benchmarks.forward                      # all cases, bf16 on GPU / fp32 on CPU
  python -m benchmarks.forward --cases dit --batch 8
  python -m benchmarks.forward --cases kv --depth 4 # CPU: shallower models keep it within minutes
  python -m benchmarks.forward --cases sd3 --depth 4 --sd3-sizes 512
  python -m benchmarks.forward --cases flux --depth 1 --flux-sizes 512   # 1 double + 2 single blocks

Cases: ``dit`` DiT-XL/2 at 256 and 512 px; ``pixart`` PixArt-Σ XL/2 at 1024 px (4,096 tokens) and 2K
(16,384 tokens) with 300 caption tokens; ``kv`` PixArt-Σ with KV compression (R=2 on the deep half of the layers)
against without, at 2K and 4K (65,536 tokens); ``sd3`` SD3.5-medium (diffusers ``SD3Transformer2DModel``) and
``flux`` FLUX.1-dev (``FluxTransformer2DModel``) at 512 and 1024 px, with their pipelines' text lengths (SD3: 77 CLIP +
256 T5 tokens; Flux-dev: 512 T5 tokens) and σ = 0.5 (Flux-dev: embedded guidance 3.5). One JSON line per case (see
benchmarks/common.py).

``--depth`` shortens every model; SD3.5-medium then keeps its share of MMDiT-X dual-attention layers (13 of 24: the
first round(depth·13/24)), FLUX.1-dev its 1:2 ratio of double to single blocks unless ``--depth-single`` is given.
The sd3 and flux cases first run both sides once on the same inputs and record the largest output difference
(``parity_*``; in fp32 a relative error above 1e-2 stops the run: the two models would not be the same).

Both sides hold the same random weights (dit_jax parameters exported to the diffusers model through
``dit_jax.convert``, see benchmarks/builders.py) and are timed round-robin in one process. In bf16 both hold bf16
weights (``model.to(torch.bfloat16)`` / params cast once), as an inference pipeline does.
"""

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.builders import jax_model_params, torch_transformer
from benchmarks.common import (
    comparison_fields,
    default_dtype,
    emit,
    jax_sync,
    load_average,
    on_accelerator,
    peak_flops,
    time_interleaved,
    torch_device,
    torch_dtype,
    torch_sync,
    wait_quiet,
)
from dit_jax import models
from dit_jax.models.family import family_of
from dit_jax.models.flops import forward_flops

TEXT_FAMILIES = ("sd3", "flux")  # text-to-image MM-DiTs: inputs from the family protocol, parity checked
SIGMA = 0.5  # the noise level of the text cases: t = σ·1000 = 500, as the DiT/PixArt cases
GUIDANCE = 3.5  # FLUX.1-dev's embedded guidance (FluxPipeline's default)
PARITY_MAX_REL = 1e-2  # fp32: beyond this the two sides are not the same model
PX = {"256": 32, "512": 64, "1024": 128, "1280": 160, "1536": 192, "2K": 256, "4K": 512}  # image size → latent size


def text_inputs(config, batch: int, latent: int, seed: int = 0) -> dict:
    """One call's inputs (numpy, shared by both sides) for a text family: NHWC latents, the samplers' t = σ·1000 and
    the family's condition at its pipeline's shapes (``condition_specs``), random text features, guidance 3.5."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, latent, latent, config.in_channels), dtype=np.float32)
    cond = {}
    for name, spec in family_of(config).condition_specs(config, batch).items():
        if name == "guidance":
            cond[name] = np.full(spec.shape, GUIDANCE, np.float32)
        else:
            cond[name] = rng.standard_normal(spec.shape, dtype=np.float32)
    return {"x": x, "t": np.full((batch,), SIGMA * 1000, np.float32), "condition": cond}


def jax_forward(config, batch: int, latent: int, caption: int = 300, params=None, inputs=None):
    model = models.build(config)
    params = jax.device_put(jax_model_params(config) if params is None else params)
    if config.dtype in ("bfloat16", "bf16"):
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    if config.family in TEXT_FAMILIES:  # the family's apply, as the samplers call it (Flux: σ = t/1000 inside)
        inputs = text_inputs(config, batch, latent) if inputs is None else inputs
        family = family_of(config)
        x, t = jnp.asarray(inputs["x"]), jnp.asarray(inputs["t"])
        cond = {k: jnp.asarray(v) for k, v in inputs["condition"].items()}
        text_fn = jax.jit(lambda p, x, t, c: family.apply(model, p, x, t, c))
        return lambda: text_fn(params, x, t, cond)
    args = image_args(config, batch, latent, caption)
    fn = jax.jit(model.apply)
    return lambda: fn({"params": params}, *args)


def image_args(config, batch: int, latent: int, caption: int = 300) -> tuple:
    """The DiT / PixArt forward's inputs after the params: NHWC latents, t = 500, labels or captions + mask."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, latent, latent, config.in_channels)), jnp.float32)
    t = jnp.full((batch,), 500.0)
    if isinstance(config, models.DiTConfig):
        return (x, t, jnp.arange(batch) % config.num_classes)
    cap = jnp.asarray(rng.standard_normal((batch, caption, config.caption_width)), jnp.float32)
    return (x, t, cap, jnp.ones((batch, caption), jnp.int32))


GIB = 2**30


def compiled_forward(config, batch: int, latent: int, *, compile_only: bool = False, caption: int = 300):
    """``(call or None, fields)``: the DiT/PixArt forward compiled ahead of time (fp32 params; bf16 configs cast),
    with the compile time and XLA's ``memory_analysis()`` (temporaries, arguments, output in GiB). With
    ``compile_only`` nothing is allocated: the forward is lowered from abstract shapes and ``call`` is None."""
    import time

    model = models.build(config)
    bf16 = config.dtype in ("bfloat16", "bf16")
    if compile_only:
        params = nn_unbox(models.abstract_params(config))
        if bf16:
            params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), params)
        args = jax.eval_shape(lambda: image_args(config, batch, latent, caption))
    else:
        params = jax.device_put(jax_model_params(config))
        if bf16:
            params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
        args = image_args(config, batch, latent, caption)
    t0 = time.perf_counter()
    compiled = jax.jit(model.apply).lower({"params": params}, *args).compile()
    fields = {"compile_s": round(time.perf_counter() - t0, 1)}
    mem = compiled.memory_analysis()
    if mem is not None:
        fields.update(
            temp_gib=round(mem.temp_size_in_bytes / GIB, 3),
            argument_gib=round(mem.argument_size_in_bytes / GIB, 3),
            output_gib=round(mem.output_size_in_bytes / GIB, 3),
        )
    if compile_only:
        return None, fields
    return (lambda: compiled({"params": params}, *args)), fields


def nn_unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


def peak_rss_gib() -> float:
    """The process's peak resident set so far (``ru_maxrss``, KiB on Linux), in GiB."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def torch_forward(config, params, batch: int, latent: int, dtype: str, caption: int = 300):
    import torch

    device, tdtype = torch_device(), torch_dtype(dtype)
    model = torch_transformer(config, params, device, tdtype).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, config.in_channels, latent, latent, generator=g).to(device, tdtype)
    t = torch.full((batch,), 500, device=device)
    if isinstance(config, models.DiTConfig):
        kwargs = dict(hidden_states=x, timestep=t, class_labels=torch.arange(batch, device=device))
    else:
        cap = torch.randn(batch, caption, config.caption_width, generator=g).to(device, tdtype)
        mask = torch.ones(batch, caption, device=device)
        kwargs = dict(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=cap,
            encoder_attention_mask=mask,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )

    def run():
        with torch.inference_mode():
            return model(**kwargs, return_dict=False)[0]

    return run


def torch_text_forward(config, params, inputs: dict, dtype: str):
    """``(run, to_nhwc)``: the diffusers SD3/Flux transformer on ``inputs`` as its pipeline calls it, and the map of
    its output to our NHWC latents. SD3: NCHW latents, timestep σ·1000. Flux: latents packed by
    ``FluxPipeline._pack_latents`` with its ``img_ids``/``txt_ids``, timestep σ in the latents' dtype, guidance
    float32."""
    import torch
    from diffusers import FluxPipeline

    device, tdtype = torch_device(), torch_dtype(dtype)
    model = torch_transformer(config, params, device, tdtype).eval()
    x, t, cond = inputs["x"], inputs["t"], inputs["condition"]
    b, h, w, c = x.shape

    def tensor(a, dt=tdtype):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device, dt)

    latents = tensor(x.transpose(0, 3, 1, 2))  # B C H W
    kwargs = dict(encoder_hidden_states=tensor(cond["context"]), pooled_projections=tensor(cond["pooled"]))
    if config.family == "sd3":
        kwargs.update(hidden_states=latents, timestep=tensor(t, torch.float32))

        def to_nhwc(out):
            return out.float().cpu().numpy().transpose(0, 2, 3, 1)
    else:
        kwargs.update(
            hidden_states=FluxPipeline._pack_latents(latents, b, c, h, w),
            timestep=tensor(t / 1000.0),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, tdtype),
            txt_ids=torch.zeros(cond["context"].shape[1], 3, device=device, dtype=tdtype),
            guidance=tensor(cond["guidance"], torch.float32) if "guidance" in cond else None,
        )

        def to_nhwc(out):  # _unpack_latents takes pixel sizes and the VAE factor (8)
            return FluxPipeline._unpack_latents(out.float().cpu(), h * 8, w * 8, 8).numpy().transpose(0, 2, 3, 1)

    def run():
        with torch.inference_mode():
            return model(**kwargs, return_dict=False)[0]

    return run, to_nhwc


def parity_fields(jax_out, torch_out: np.ndarray, dtype: str) -> dict:
    """The largest |dit_jax − diffusers| over the output, absolute and relative to the largest |diffusers| value;
    in fp32 a relative error above ``PARITY_MAX_REL`` is an error (the sides would not be the same model)."""
    ours = np.asarray(jax_out, np.float32)
    if ours.shape != torch_out.shape:
        raise RuntimeError(f"output shapes differ: dit_jax {ours.shape}, diffusers {torch_out.shape}")
    diff = float(np.max(np.abs(ours - torch_out)))
    scale = float(np.max(np.abs(torch_out)))
    rel = diff / scale
    if dtype == "fp32" and not rel <= PARITY_MAX_REL:
        raise RuntimeError(f"dit_jax and diffusers outputs differ: max abs diff {diff:.3g} of max |out| {scale:.3g}")
    return {
        "parity_max_abs_diff": float(f"{diff:.3g}"),
        "parity_max_abs_out": round(scale, 3),
        "parity_rel": float(f"{rel:.3g}"),
    }


def side_by_side(config, batch: int, latent: int, args) -> tuple[dict, dict | None, float, dict]:
    """``(jax timing, torch timing or None, load before, parity fields)`` for one case, timed round-robin. Text
    families share inputs across the sides and are checked for parity first (the call is also their compile)."""
    load = wait_quiet(args.wait_quiet, timeout_s=args.wait_max)
    params = jax_model_params(config)
    parity = {}
    if config.family in TEXT_FAMILIES:
        inputs = text_inputs(config, batch, latent)
        jax_fn = jax_forward(config, batch, latent, params=params, inputs=inputs)
        fns = {"jax": (jax_fn, jax_sync)}
        if not args.no_torch:
            torch_fn, to_nhwc = torch_text_forward(config, params, inputs, args.dtype)
            parity = parity_fields(jax_fn(), to_nhwc(torch_fn()), args.dtype)
            fns["torch"] = (torch_fn, torch_sync)
    else:
        fns = {"jax": (jax_forward(config, batch, latent, params=params), jax_sync)}
        if not args.no_torch:
            fns["torch"] = (torch_forward(config, params, batch, latent, args.dtype), torch_sync)
    del params
    t = time_interleaved(fns, warmup=args.warmup, iters=args.iters)
    return t["jax"], t.get("torch"), load, parity


def report(case, config, latent, batch, dtype, jax_t, torch_t=None, load=None, **extra):
    flops = forward_flops(config, latent, latent) * batch
    peak = peak_flops()
    rec = {
        "case": case,
        "dtype": dtype,
        "batch": batch,
        "depth": config.depth,
        "tokens": (latent // 2) ** 2,
        "scan": config.scan_blocks,
        "jax_ms": round(jax_t["median_ms"], 2),
        "tflops_per_s": round(flops / jax_t["median_ms"] / 1e9, 2),
    }
    if peak and dtype == "bf16":
        rec["mfu"] = round(flops / (jax_t["median_ms"] / 1e3) / peak, 3)
    if torch_t is not None:
        rec["torch_ms"] = round(torch_t["median_ms"], 2)
    rec.update(comparison_fields(jax_t, torch_t, load))
    emit({**rec, **extra})


def text_preset(name: str, over: dict, depth_single: int | None = None):
    """SD3.5-medium / FLUX.1-dev with ``over``; at a reduced ``depth`` SD3.5-medium keeps its share of MMDiT-X
    dual-attention layers (the first round(depth · 13/24)) and Flux its 1:2 double:single ratio unless
    ``depth_single`` is given."""
    full = models.preset(name)
    over = dict(over)
    depth = over.get("depth", full.depth)
    if full.family == "sd3":
        n = round(depth * len(full.dual_attention_layers) / full.depth)
        over["dual_attention_layers"] = tuple(range(min(n, depth)))
    elif depth_single is not None or depth != full.depth:
        over["depth_single"] = (
            depth_single if depth_single is not None else round(depth * full.depth_single / full.depth)
        )
    return models.preset(name, **over)


def main():
    on_gpu = on_accelerator()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="dit,pixart,kv,sd3,flux")
    ap.add_argument("--dtype", default=default_dtype(), choices=["bf16", "fp32"])
    ap.add_argument("--batch", type=int, default=8 if on_gpu else 1)
    ap.add_argument("--depth", type=int, default=None, help="override depth (keeps CPU runs short)")
    ap.add_argument("--scan", action="store_true", help="dit_jax: scanned blocks (nn.scan)")
    ap.add_argument("--iters", type=int, default=10 if on_gpu else 3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--wait-quiet", type=float, default=None, help="before each case, wait for load average < X")
    ap.add_argument("--wait-max", type=float, default=1800.0, help="--wait-quiet gives up after this many seconds")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--dit-sizes", default="256,512")
    ap.add_argument("--pixart-sizes", default="1024,2K")
    ap.add_argument("--kv-sizes", default="2K,4K")
    ap.add_argument("--kv-ratio", type=int, default=2, help="kv: compression ratio R (R×R windows)")
    ap.add_argument("--kv-layers", default=None, help="kv: compressed layers 'lo-hi' (default: the deep half)")
    ap.add_argument("--kv-variants", default="plain,kv", help="kv: which of plain,kv to run, in timing order")
    ap.add_argument("--compile-only", action="store_true", help="kv: memory analysis only, nothing run")
    ap.add_argument("--sd3-sizes", default="512,1024")
    ap.add_argument("--flux-sizes", default="512,1024")
    ap.add_argument("--depth-single", type=int, default=None, help="Flux single blocks (default: 2 × --depth)")
    args = ap.parse_args()
    over = {"dtype": "bfloat16" if args.dtype == "bf16" else "float32", "scan_blocks": args.scan}
    if args.depth:
        over["depth"] = args.depth
    cases = args.cases.split(",")

    if "dit" in cases:
        for size in args.dit_sizes.split(","):
            latent = PX[size]
            cfg = models.preset("DiT-XL/2", input_size=latent, **over)
            j, t, load, _ = side_by_side(cfg, args.batch, latent, args)
            report(f"DiT-XL/2 {size}px forward", cfg, latent, args.batch, args.dtype, j, t, load)
    if "pixart" in cases:
        for size in args.pixart_sizes.split(","):
            latent = PX[size]
            cfg = models.preset("PixArt-Sigma-XL-2-1024-MS", **over)
            j, t, load, _ = side_by_side(cfg, args.batch, latent, args)
            report(f"PixArt-Sigma-XL/2 {size} forward", cfg, latent, args.batch, args.dtype, j, t, load)
    for fam, name in (("sd3", "SD3.5-medium"), ("flux", "FLUX.1-dev")):
        if fam not in cases:
            continue
        cfg = text_preset(name, over, args.depth_single)
        text = family_of(cfg).condition_specs(cfg, 1)["context"].shape[1]
        for size in getattr(args, f"{fam}_sizes").split(","):
            latent = PX[size]
            j, t, load, parity = side_by_side(cfg, args.batch, latent, args)
            extra = {"text_tokens": text, **parity}
            if fam == "sd3":
                extra["dual_attention_layers"] = list(cfg.dual_attention_layers)
            else:
                extra.update(depth_single=cfg.depth_single, guidance=GUIDANCE)
            report(f"{name} {size} forward", cfg, latent, args.batch, args.dtype, j, t, load, **extra)
    if "kv" in cases:
        for size in args.kv_sizes.split(","):
            kv_case(size, over, args)


def kv_case(size: str, over: dict, args) -> None:
    """PixArt-Σ (2K preset) with and without KV compression at ``size``: both compiled ahead of time (XLA's memory
    analysis of each), then timed round-robin in ``--kv-variants`` order, with the process's peak RSS after each
    variant's calls (``ru_maxrss`` only grows: the first variant's figure is its own, a later one's is the maximum
    so far). ``--compile-only``: the memory analysis alone, nothing allocated or run."""
    latent = PX[size]
    base = models.preset("PixArt-Sigma-XL-2-2K-MS", **over)
    if args.kv_layers:
        lo, hi = (int(x) for x in args.kv_layers.split("-"))
        layers = tuple(range(lo, hi + 1))
    else:
        layers = tuple(range(base.depth // 2, base.depth))
    configs = {
        "plain": base,
        "kv": dataclasses.replace(base, kv_compress_layers=layers, kv_compress_ratio=args.kv_ratio),
    }
    variants = args.kv_variants.split(",")
    load = wait_quiet(args.wait_quiet, timeout_s=args.wait_max)
    rec = {
        "case": f"PixArt-Sigma KV compression R={args.kv_ratio} layers {layers[0]}-{layers[-1]}, {size}",
        "dtype": args.dtype,
        "batch": args.batch,
        "depth": base.depth,
        "tokens": (latent // 2) ** 2,
        "scan": base.scan_blocks,
    }
    fns, rss = {}, {}
    for name in variants:
        call, fields = compiled_forward(configs[name], args.batch, latent, compile_only=args.compile_only)
        rec.update({f"{name}_{k}": v for k, v in fields.items()})
        if call is not None:

            def run(call=call, name=name):
                out = call()
                jax.block_until_ready(out)
                rss[name] = peak_rss_gib()
                return out

            fns[name] = (run, jax_sync)
    rec["rss_before_calls_gib"] = peak_rss_gib()
    if args.compile_only:
        rec["load"] = [load, load_average()]
        emit({**rec, "note": "compile only (memory_analysis), not run"})
        return
    t = time_interleaved(fns, warmup=args.warmup, iters=args.iters)
    for name in variants:
        rec[f"{name}_ms"] = round(t[name]["median_ms"], 2)
        rec[f"{name}_min_ms"] = round(t[name]["min_ms"], 2)
        rec[f"{name}_peak_rss_gib"] = rss[name]
    if "plain" in t and "kv" in t:
        plain, comp = t["plain"], t["kv"]
        rec["time_cut"] = round(1 - comp["median_ms"] / plain["median_ms"], 3)
        rec["time_cut_by_min"] = round(1 - comp["min_ms"] / plain["min_ms"], 3)
    rec.update(order=variants, iters=args.iters, warmup=args.warmup, load_before=load, load=t[variants[0]]["load"])
    emit(rec)


if __name__ == "__main__":
    main()
