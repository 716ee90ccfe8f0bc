"""Forward latency: dit_jax vs diffusers (same device, same run), and the KV-compression speedup.

  python -m benchmarks.forward                      # all cases, bf16 on GPU / fp32 on CPU
  python -m benchmarks.forward --cases dit --batch 8
  python -m benchmarks.forward --cases kv --depth 4 # CPU: shallower models keep it within minutes
  python -m benchmarks.forward --cases sd3 --depth 4 --sd3-sizes 512
  python -m benchmarks.forward --cases flux --depth 1 --flux-sizes 512   # 1 double + 2 single blocks
  python -m benchmarks.forward --cases hunyuan,wan --depth 2 --hunyuan-sizes 1024 --wan-sizes 480x832x17

Cases: ``dit`` DiT-XL/2 at 256 and 512 px; ``pixart`` PixArt-Σ XL/2 at 1024 px (4,096 tokens) and 2K
(16,384 tokens) with 300 caption tokens; ``kv`` PixArt-Σ with KV compression (R=2 on the deep half of the layers)
against without, at 2K and 4K (65,536 tokens); ``sd3`` SD3.5-medium (diffusers ``SD3Transformer2DModel``) and
``flux`` FLUX.1-dev (``FluxTransformer2DModel``) at 512 and 1024 px, with their pipelines' text lengths (SD3: 77 CLIP +
256 T5 tokens; Flux-dev: 512 T5 tokens) and σ = 0.5 (Flux-dev: embedded guidance 3.5). One JSON line per case (see
benchmarks/common.py).

``hunyuan`` HunyuanDiT-v1.2 (``HunyuanDiT2DModel``) at 1024 px with its pipeline's 77 CLIP(BERT) + 256 mT5 tokens and
masks, t = 500, RoPE as ``HunyuanDiTPipeline`` builds it; ``wan`` Wan2.1-T2V-1.3B (``WanTransformer3DModel``) on a clip
given as ``HxWxF`` pixels and frames (default 480x832x17 → latents (5, 60, 104, 16): the 81-frame clip's (21, 60, 104,
16) is too big for a CPU run) with 512 UMT5 tokens, t = 500.

``--depth`` shortens every model; SD3.5-medium then keeps its share of MMDiT-X dual-attention layers (13 of 24: the
first round(depth·13/24)), FLUX.1-dev its 1:2 ratio of double to single blocks unless ``--depth-single`` is given;
Hunyuan-DiT needs an even depth (its long skips pair the halves). The text cases (sd3, flux, hunyuan, wan) first run
both sides once on the same inputs and record the largest output difference (``parity_*``; in fp32 a relative error
above 1e-2 stops the run: the two models would not be the same).

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

TEXT_FAMILIES = ("sd3", "flux", "hunyuan", "wan")  # text-conditioned: inputs from the family protocol, parity checked
SIGMA = 0.5  # the noise level of the text cases: t = σ·1000 = 500, as the DiT/PixArt cases (Hunyuan: DDPM t = 500)
GUIDANCE = 3.5  # FLUX.1-dev's embedded guidance (FluxPipeline's default)
PARITY_MAX_REL = 1e-2  # fp32: beyond this the two sides are not the same model
PX = {"256": 32, "512": 64, "1024": 128, "1280": 160, "1536": 192, "2K": 256, "4K": 512}  # image size → latent size
VAE_SCALE, VAE_SCALE_T = 8, 4  # pixels per latent (every family here); frames per latent frame (Wan's causal VAE)


def example_shape(config, latent) -> tuple[int, ...]:
    """One example's NHWC model input (no batch axis): ``latent`` is an image's latent side or already a shape."""
    return (latent, latent, config.in_channels) if isinstance(latent, int) else tuple(latent)


def video_latent_shape(config, size: str) -> tuple[int, int, int, int]:
    """``"HxWxF"`` (pixels, pixels, frames) → the latent clip (F', H/8, W/8, C) a causal video VAE makes of it:
    F' = 1 + (F − 1)/4 (480x832x81 → 21 frames)."""
    try:
        h, w, f = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"video size {size!r}: expected HxWxFRAMES, e.g. 480x832x17") from None
    unit = VAE_SCALE * config.patch_size
    if h <= 0 or w <= 0 or h % unit or w % unit or f < 1 or (f - 1) % VAE_SCALE_T:
        raise ValueError(
            f"video size {size!r}: height and width must be positive multiples of {unit} px and frames 1 + "
            f"{VAE_SCALE_T}k (e.g. 480x832x17, 480x832x81)"
        )
    return (1 + (f - 1) // VAE_SCALE_T, h // VAE_SCALE, w // VAE_SCALE, config.in_channels)


def text_inputs(config, batch: int, latent, seed: int = 0) -> dict:
    """One call's inputs (numpy, shared by both sides) for a text family: latents of ``example_shape(config, latent)``
    (NHWC images, (B, F, H, W, C) video), the samplers' t = σ·1000 and the family's condition at its pipeline's
    shapes (``condition_specs``): random features, all-ones token masks (every token a prompt token), guidance 3.5,
    and size conditions (Hunyuan v1.1) as the pipeline makes them for the sampled size (``size_condition``)."""
    rng = np.random.default_rng(seed)
    shape = example_shape(config, latent)
    x = rng.standard_normal((batch, *shape), dtype=np.float32)
    family = family_of(config)
    cond = {}
    for name, spec in family.condition_specs(config, batch).items():
        if name == "guidance":
            cond[name] = np.full(spec.shape, GUIDANCE, np.float32)
        elif name.endswith("_mask"):
            cond[name] = np.ones(spec.shape, spec.dtype)
        else:
            cond[name] = rng.standard_normal(spec.shape, dtype=np.float32)
    h, w = shape[-3] * VAE_SCALE, shape[-2] * VAE_SCALE
    cond.update({k: np.asarray(v) for k, v in family.size_condition(config, h, w, batch).items()})
    return {"x": x, "t": np.full((batch,), SIGMA * 1000, np.float32), "condition": cond}


def jax_forward(config, batch: int, latent: int | tuple, caption: int = 300, params=None, inputs=None):
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
    """``(run, to_ours)``: the diffusers transformer of a text family on ``inputs`` as its pipeline calls it, and the
    map of its output to our channels-last latents (``TORCH_CALLS`` per family)."""
    import torch

    device, tdtype = torch_device(), torch_dtype(dtype)
    model = torch_transformer(config, params, device, tdtype).eval()

    def tensor(a, dt=tdtype):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device, dt)

    kwargs, to_ours = TORCH_CALLS[config.family](config, inputs, tensor, device, tdtype)

    def run():
        with torch.inference_mode():
            return model(**kwargs, return_dict=False)[0]

    return run, to_ours


def _nchw_out(out) -> np.ndarray:
    return out.float().cpu().numpy().transpose(0, 2, 3, 1)


def _sd3_call(config, inputs, tensor, device, tdtype):
    """SD3: NCHW latents, timestep σ·1000 (float32), T5+CLIP context and pooled projections."""
    import torch

    cond = inputs["condition"]
    kwargs = dict(
        hidden_states=tensor(inputs["x"].transpose(0, 3, 1, 2)),
        timestep=tensor(inputs["t"], torch.float32),
        encoder_hidden_states=tensor(cond["context"]),
        pooled_projections=tensor(cond["pooled"]),
    )
    return kwargs, _nchw_out


def _flux_call(config, inputs, tensor, device, tdtype):
    """Flux: latents packed by ``FluxPipeline._pack_latents`` with its ``img_ids``/``txt_ids``, timestep σ in the
    latents' dtype, guidance float32."""
    import torch
    from diffusers import FluxPipeline

    x, t, cond = inputs["x"], inputs["t"], inputs["condition"]
    b, h, w, c = x.shape
    kwargs = dict(
        hidden_states=FluxPipeline._pack_latents(tensor(x.transpose(0, 3, 1, 2)), b, c, h, w),
        timestep=tensor(t / 1000.0),
        encoder_hidden_states=tensor(cond["context"]),
        pooled_projections=tensor(cond["pooled"]),
        img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, tdtype),
        txt_ids=torch.zeros(cond["context"].shape[1], 3, device=device, dtype=tdtype),
        guidance=tensor(cond["guidance"], torch.float32) if "guidance" in cond else None,
    )

    def to_nhwc(out):  # _unpack_latents takes pixel sizes and the VAE factor (8)
        return FluxPipeline._unpack_latents(out.float().cpu(), h * 8, w * 8, 8).numpy().transpose(0, 2, 3, 1)

    return kwargs, to_nhwc


def _hunyuan_call(config, inputs, tensor, device, tdtype):
    """Hunyuan-DiT: NCHW latents, timestep in the latents' dtype, CLIP and mT5 features with their masks, and the
    RoPE ``HunyuanDiTPipeline`` builds (the token grid's crop region of the ``rope_img`` base grid). Output: eps/v and
    the learned variance, 2·in_channels."""
    import torch
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

    x, cond = inputs["x"], inputs["condition"]
    if not config.rope_img.startswith("base"):
        raise ValueError(f"rope_img={config.rope_img!r}: HunyuanDiTPipeline's RoPE needs a base grid ('base512')")
    p = config.patch_size
    grid = (x.shape[1] // p, x.shape[2] // p)
    base = int(config.rope_img[len("base") :]) // VAE_SCALE // p
    cos, sin = get_2d_rotary_pos_embed(
        config.head_dim, get_resize_crop_region_for_grid(grid, base), grid, device=device, output_type="pt"
    )
    kwargs = dict(
        hidden_states=tensor(x.transpose(0, 3, 1, 2)),
        timestep=tensor(inputs["t"]),
        encoder_hidden_states=tensor(cond["clip"]),
        text_embedding_mask=tensor(cond["clip_mask"], torch.long),
        encoder_hidden_states_t5=tensor(cond["t5"]),
        text_embedding_mask_t5=tensor(cond["t5_mask"], torch.long),
        image_meta_size=tensor(cond["image_meta_size"]) if "image_meta_size" in cond else None,
        style=tensor(cond["style"], torch.long) if "style" in cond else None,
        image_rotary_emb=(cos, sin),  # float32, as the pipeline passes it
    )
    return kwargs, _nchw_out


def _wan_call(config, inputs, tensor, device, tdtype):
    """Wan: (B, C, F, H, W) latents, timestep σ·1000, UMT5 context."""
    cond = inputs["condition"]
    kwargs = dict(
        hidden_states=tensor(inputs["x"].transpose(0, 4, 1, 2, 3)),
        timestep=tensor(inputs["t"]),
        encoder_hidden_states=tensor(cond["context"]),
    )

    def to_bfhwc(out):
        return out.float().cpu().numpy().transpose(0, 2, 3, 4, 1)

    return kwargs, to_bfhwc


TORCH_CALLS = {"sd3": _sd3_call, "flux": _flux_call, "hunyuan": _hunyuan_call, "wan": _wan_call}


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


def side_by_side(config, batch: int, latent: int | tuple, args) -> tuple[dict, dict | None, float, dict]:
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
    """One JSON line; ``latent`` is an image's latent side or one example's shape (``example_shape``)."""
    family, shape = family_of(config), example_shape(config, latent)
    flops = family.batch_flops(config, {"x": (batch, *shape)})
    peak = peak_flops()
    rec = {
        "case": case,
        "dtype": dtype,
        "batch": batch,
        "depth": config.depth,
        "tokens": family.num_tokens(config, shape),
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
    ap.add_argument("--cases", default="dit,pixart,kv,sd3,flux,hunyuan,wan")
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
    ap.add_argument("--hunyuan-sizes", default="1024")
    ap.add_argument("--wan-sizes", default="480x832x17", help="wan: clips as HxWxFRAMES (pixels, frames)")
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
    if "hunyuan" in cases:
        # a diffusers import's RoPE sampling (the same as the original's on square grids)
        cfg = models.preset("HunyuanDiT-v1.2", rope_convention="diffusers", **over)
        for size in args.hunyuan_sizes.split(","):
            latent = PX[size]
            j, t, load, parity = side_by_side(cfg, args.batch, latent, args)
            extra = {"text_tokens": cfg.text_len + cfg.text_len_t5, **parity}
            report(f"HunyuanDiT-v1.2 {size} forward", cfg, latent, args.batch, args.dtype, j, t, load, **extra)
    if "wan" in cases:
        cfg = models.preset("Wan2.1-T2V-1.3B", **over)
        text = family_of(cfg).condition_specs(cfg, 1)["context"].shape[1]
        for size in args.wan_sizes.split(","):
            shape = video_latent_shape(cfg, size)
            j, t, load, parity = side_by_side(cfg, args.batch, shape, args)
            extra = {"latent_shape": list(shape), "text_tokens": text, **parity}
            report(f"Wan2.1-T2V-1.3B {size} forward", cfg, shape, args.batch, args.dtype, j, t, load, **extra)
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
