"""Flux: RoPE, parity with diffusers ``FluxTransformer2DModel`` (dev and schnell) in the diffusers and BFL original
formats, scan/sharded/bf16 execution, exact preset sizes, the family protocol, conversion round trips and errors.

Parity criterion: max abs error ≤ 1e-5 · max(1, max|reference|), fp32 on CPU, every parameter re-randomised. diffusers
gets packed latents, ``img_ids`` and ``txt_ids`` exactly as ``FluxPipeline`` builds them; we get unpacked NHWC latents.
"""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from parity import assert_bit_exact, check_parity, randomize_, rel_err, state_dict_numpy

from dit_jax import convert, diffusion, models
from dit_jax.convert import flux as flux_convert
from dit_jax.models.family import family_of
from dit_jax.models.flux import FluxConfig
from dit_jax.nn.rope import apply_rope, grid_ids, rope_frequencies
from dit_jax.parallel import logical_rules

# FAMILIES.md tiny config (in_channels 16 packed = 4 latent channels); RoPE axes sum to head_dim 16.
TINY = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=24,
    axes_dims_rope=(4, 6, 6),
)
# Wider: 3 heads × 32 = 96, the real 64 packed channels (16 latent), 3 single blocks.
WIDE = dict(TINY, in_channels=64, num_single_layers=3, attention_head_dim=32, num_attention_heads=3)
WIDE.update(joint_attention_dim=48, pooled_projection_dim=40, axes_dims_rope=(8, 12, 12), guidance_embeds=True)
CASES = {
    # name: (diffusers config, batch, latent H, W, text tokens)
    "dev": (dict(TINY, guidance_embeds=True), 4, 8, 12, 7),
    "schnell": (dict(TINY, guidance_embeds=False), 2, 6, 4, 5),
    "wide": (WIDE, 2, 16, 12, 10),
}


def diffusers_flux(cfg: dict, seed: int):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return randomize_(FluxTransformer2DModel(**cfg).eval(), seed)


def make_inputs(cfg: dict, batch: int, height: int, width: int, length: int, seed: int = 0):
    """Unpacked NHWC latents, σ ∈ [0, 1], T5 features, pooled CLIP, per-row guidance (None without an embedder)."""
    rs = np.random.RandomState(seed)
    x = rs.randn(batch, height, width, cfg["in_channels"] // 4).astype(np.float32)
    t = rs.uniform(0.05, 1.0, batch).astype(np.float32)
    context = rs.randn(batch, length, cfg["joint_attention_dim"]).astype(np.float32)
    pooled = rs.randn(batch, cfg["pooled_projection_dim"]).astype(np.float32)
    guidance = rs.uniform(1.0, 5.0, batch).astype(np.float32) if cfg.get("guidance_embeds") else None
    return x, t, context, pooled, guidance


def run_diffusers(m, x, t, context, pooled, guidance) -> np.ndarray:
    """diffusers on the latents packed as FluxPipeline packs them, unpacked back to NHWC."""
    from diffusers import FluxPipeline

    b, h, w, c = x.shape
    latents = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    packed = FluxPipeline._pack_latents(latents, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(context.shape[1], 3)
    g = None if guidance is None else torch.from_numpy(guidance)
    with torch.no_grad():
        out = m(packed, torch.from_numpy(context), torch.from_numpy(pooled), torch.from_numpy(t), img_ids, txt_ids, g)
    # _unpack_latents takes pixel sizes and the VAE factor (8)
    return FluxPipeline._unpack_latents(out.sample, h * 8, w * 8, 8).numpy().transpose(0, 2, 3, 1)


_apply = jax.jit(
    lambda cfg, p, x, t, c, y, g: models.build(cfg).apply({"params": p}, x, t, c, y, guidance=g), static_argnums=0
)


def original_from_diffusers(sd: dict, depth: int, depth_single: int) -> dict:
    """MODELS.md §4.3 mapping backwards (diffusers → BFL keys), written independently of dit_jax.convert."""
    o = {}

    def copy(dst, src):
        for w in ("weight", "bias"):
            if f"{src}.{w}" in sd:
                o[f"{dst}.{w}"] = sd[f"{src}.{w}"]

    def cat(dst, srcs):
        for w in ("weight", "bias"):
            o[f"{dst}.{w}"] = np.concatenate([sd[f"{s}.{w}"] for s in srcs], 0)

    for dst, src in [
        ("time_in", "timestep_embedder"),
        ("vector_in", "text_embedder"),
        ("guidance_in", "guidance_embedder"),
    ]:
        copy(f"{dst}.in_layer", f"time_text_embed.{src}.linear_1")
        copy(f"{dst}.out_layer", f"time_text_embed.{src}.linear_2")
    copy("txt_in", "context_embedder")
    copy("img_in", "x_embedder")
    for i in range(depth):
        b, n = f"transformer_blocks.{i}", f"double_blocks.{i}"
        copy(f"{n}.img_mod.lin", f"{b}.norm1.linear")
        copy(f"{n}.txt_mod.lin", f"{b}.norm1_context.linear")
        cat(f"{n}.img_attn.qkv", [f"{b}.attn.to_{c}" for c in "qkv"])
        cat(f"{n}.txt_attn.qkv", [f"{b}.attn.add_{c}_proj" for c in "qkv"])
        o[f"{n}.img_attn.norm.query_norm.scale"] = sd[f"{b}.attn.norm_q.weight"]
        o[f"{n}.img_attn.norm.key_norm.scale"] = sd[f"{b}.attn.norm_k.weight"]
        o[f"{n}.txt_attn.norm.query_norm.scale"] = sd[f"{b}.attn.norm_added_q.weight"]
        o[f"{n}.txt_attn.norm.key_norm.scale"] = sd[f"{b}.attn.norm_added_k.weight"]
        copy(f"{n}.img_attn.proj", f"{b}.attn.to_out.0")
        copy(f"{n}.txt_attn.proj", f"{b}.attn.to_add_out")
        copy(f"{n}.img_mlp.0", f"{b}.ff.net.0.proj")
        copy(f"{n}.img_mlp.2", f"{b}.ff.net.2")
        copy(f"{n}.txt_mlp.0", f"{b}.ff_context.net.0.proj")
        copy(f"{n}.txt_mlp.2", f"{b}.ff_context.net.2")
    for i in range(depth_single):
        b, n = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        copy(f"{n}.modulation.lin", f"{b}.norm.linear")
        cat(f"{n}.linear1", [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.proj_mlp"])
        o[f"{n}.norm.query_norm.scale"] = sd[f"{b}.attn.norm_q.weight"]
        o[f"{n}.norm.key_norm.scale"] = sd[f"{b}.attn.norm_k.weight"]
        copy(f"{n}.linear2", f"{b}.proj_out")
    for w in ("weight", "bias"):  # diffusers' norm_out stores (scale, shift); BFL (shift, scale)
        scale, shift = np.split(sd[f"norm_out.linear.{w}"], 2, axis=0)
        o[f"final_layer.adaLN_modulation.1.{w}"] = np.concatenate([shift, scale], 0)
    copy("final_layer.linear", "proj_out")
    return o


_RUNS: dict[str, dict] = {}


def run_case(name: str) -> dict:
    """One diffusers model, its import, inputs and both outputs (ours from the diffusers import); built once."""
    if name not in _RUNS:
        _RUNS[name] = _build_case(name)
    return _RUNS[name]


def _build_case(name: str) -> dict:
    cfg, batch, height, width, length = CASES[name]
    m = diffusers_flux(cfg, seed=len(name))
    sd = state_dict_numpy(m)
    config, params = convert.from_state_dict(sd, diffusers_config=dict(cfg, _class_name="FluxTransformer2DModel"))
    args = make_inputs(cfg, batch, height, width, length, seed=len(name))
    want = run_diffusers(m, *args)
    got = np.asarray(_apply(config, params, *args))
    return dict(name=name, cfg=cfg, m=m, sd=sd, config=config, params=params, args=args, want=want, got=got)


# ---- RoPE -------------------------------------------------------------------------------------------------------


def torch_rope(ids: np.ndarray, axes_dims, theta: float):
    """BFL's rope as MODELS.md §4.1 states it: per axis omega = 1/theta**(arange(0, d, 2)/d), rotation matrices
    [[cos, −sin], [sin, cos]] per angle (float64 angles, float32 matrices); axes concatenated."""
    pos = torch.from_numpy(ids).double()
    mats = []
    for a, d in enumerate(axes_dims):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        ang = pos[:, a, None] * omega[None]
        mats.append(torch.stack([ang.cos(), -ang.sin(), ang.sin(), ang.cos()], -1).reshape(*ang.shape, 2, 2))
    return torch.cat(mats, dim=-3).float()  # L D/2 2 2


def torch_apply_rope(x: np.ndarray, pe) -> np.ndarray:
    """x (B, L, H, D): pairs (x[2i], x[2i+1]) times the matrices, in float32."""
    xt = torch.from_numpy(x).float().reshape(*x.shape[:-1], -1, 1, 2)
    pe = pe[None, :, None]  # 1 L 1 D/2 2 2
    out = pe[..., 0] * xt[..., 0] + pe[..., 1] * xt[..., 1]
    return out.reshape(x.shape).numpy()


def test_rope_matches_torch_reference_and_diffusers():
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    axes = (16, 56, 56)
    ids = np.concatenate([np.zeros((5, 3), np.int64), grid_ids((6, 9), leading=(0,))])
    assert ids.shape == (59, 3) and (ids[5 + 9 * 2 + 4] == (0, 2, 4)).all()  # row-major (0, row, col)
    x = np.random.RandomState(0).randn(2, 59, 3, 128).astype(np.float32) * 3
    cos, sin = rope_frequencies(ids, axes, 10000.0)
    assert cos.shape == (59, 64) and cos.dtype == np.float32
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    want = torch_apply_rope(x, torch_rope(ids, axes, 10000.0))
    err_ref = float(np.abs(got - want).max())
    np.testing.assert_array_equal(got[:, :5], x[:, :5])  # text ids 0: the identity
    # diffusers: repeat-interleaved cos/sin (L, D), x (B, L, H, D) with sequence_dim 1
    dcos, dsin = FluxPosEmbed(10000, list(axes))(torch.from_numpy(ids).float())
    np.testing.assert_array_equal(dcos.numpy()[:, ::2], cos)
    np.testing.assert_array_equal(dsin.numpy()[:, 1::2], sin)
    diff = apply_rotary_emb(torch.from_numpy(x), (dcos, dsin), sequence_dim=1).numpy()
    err_diff = float(np.abs(got - diff).max())
    print(f"RoPE (16, 56, 56): max abs err {err_ref:.1e} vs the torch reference, {err_diff:.1e} vs diffusers")
    assert err_ref < 1e-5 and err_diff < 1e-5
    # bf16 in, bf16 out (computed in fp32); other theta and axes; batched angles; errors
    assert apply_rope(jnp.asarray(x, jnp.bfloat16), cos, sin).dtype == jnp.bfloat16
    ids2 = grid_ids((3, 4, 5))
    cos2, sin2 = rope_frequencies(ids2, (4, 2, 6), 500.0)
    x2 = np.random.RandomState(1).randn(1, 60, 2, 12).astype(np.float32)
    want2 = torch_apply_rope(x2, torch_rope(ids2, (4, 2, 6), 500.0))
    assert np.abs(np.asarray(apply_rope(jnp.asarray(x2), cos2[None], sin2[None])) - want2).max() < 1e-5
    with pytest.raises(ValueError, match="do not match 2 axes"):
        rope_frequencies(ids, (8, 8), 10000.0)
    with pytest.raises(ValueError, match="positive and even"):
        rope_frequencies(ids, (15, 57, 56), 10000.0)
    with pytest.raises(ValueError, match="angles for 128 channels, but the heads have 64"):
        apply_rope(jnp.asarray(x[..., :64]), cos, sin)


# ---- parity with diffusers: both formats, round trips --------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:the original Flux format does not store the RoPE axes")
@pytest.mark.parametrize("name", list(CASES))
def test_parity_both_formats_and_round_trips(name):
    c = run_case(name)
    config = c["config"]
    guidance = c["cfg"].get("guidance_embeds", False)
    assert config.guidance_embeds == guidance and config.in_channels == c["cfg"]["in_channels"] // 4
    assert (
        config.axes_dims == tuple(c["cfg"]["axes_dims_rope"]) and config.depth_single == c["cfg"]["num_single_layers"]
    )
    x = c["args"][0]
    check_parity(f"Flux {c['name']} diffusers ({x.shape[1]}x{x.shape[2]}, batch {x.shape[0]})", c["got"], c["want"])
    assert_bit_exact(convert.to_torch(config, c["params"], format="diffusers"), c["sd"])

    # BFL original keys, built from the diffusers state dict by the documented mapping
    bfl = original_from_diffusers(c["sd"], config.depth, config.depth_single)
    with pytest.raises(convert.ConversionError, match="axes_dims: .*head_dim"):
        convert.from_state_dict(bfl)  # RoPE axes are not stored and head_dim is not 128
    config_o, params_o = convert.from_state_dict(bfl, axes_dims=config.axes_dims)
    assert config_o == config
    got_o = np.asarray(_apply(config_o, params_o, *c["args"]))
    check_parity(f"Flux {c['name']} original (BFL keys)", got_o, c["want"])
    assert_bit_exact(convert.to_torch(config_o, params_o, format="original"), bfl)
    # diffusers keys without config.json: inferred from the shapes like the original
    config_k, params_k = convert.from_state_dict(c["sd"], axes_dims=config.axes_dims)
    assert config_k == config
    assert_bit_exact(convert.to_torch(config_k, params_k, format="original"), bfl)


def test_folder_import_export(tmp_path):
    """A diffusers model folder (config.json) in, a diffusers folder out that diffusers loads and runs the same."""
    from diffusers import FluxTransformer2DModel

    cfg, batch, height, width, length = CASES["wide"]
    m = diffusers_flux(cfg, seed=7)
    m.save_pretrained(tmp_path / "flux")
    config, params = convert.from_torch(tmp_path / "flux", scan_blocks=True)
    assert config.scan_blocks and config.hidden_size == 96 and config.num_heads == 3
    assert convert.diffusers_config(config) | {"_diffusers_version": None} == {
        **{k: v for k, v in m.config.items() if not k.startswith("_")},
        "axes_dims_rope": [8, 12, 12],
        "out_channels": 64,
        "_class_name": "FluxTransformer2DModel",
        "_diffusers_version": None,
    }
    out = convert.save_torch(tmp_path / "exported", config, params, format="diffusers")
    m2 = FluxTransformer2DModel.from_pretrained(out).eval()
    assert_bit_exact(state_dict_numpy(m2), state_dict_numpy(m))


# ---- execution switches -------------------------------------------------------------------------------------------


def test_scan_remat_equals_loop():
    case = run_case("dev")
    config, params = models.set_scan(case["config"].replace(remat="dots"), case["params"], True)
    assert sorted(k for k in params if k.startswith("stage_")) == ["stage_0", "stage_1"]
    assert params["stage_0"]["img_attn"]["qkv"]["kernel"].shape == (2, 32, 3, 2, 16)  # double stage: 2 layers
    assert params["stage_1"]["linear1"]["kernel"].shape == (2, 32, 7, 2, 16)  # single stage: q|k|v|mlp×4
    err = rel_err(_apply(config, params, *case["args"]), case["got"])
    print(f"Flux dev scan + remat vs loop: max rel err {err:.1e}")
    assert err < 1e-6


def test_sharded_equals_unsharded():
    """Scanned params over a (data=2, fsdp=2, tensor=2) mesh of the 8 test devices, batch 4."""
    case = run_case("dev")
    config, params = models.set_scan(case["config"], case["params"], True)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    rules = logical_rules()
    shardings = nn.logical_to_mesh_sharding(models.logical_param_specs(config), mesh, rules)
    params = jax.device_put(params, shardings)
    assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(params))
    split = [
        jax.tree_util.keystr(p)
        for p, x in jax.tree_util.tree_leaves_with_path(params)
        if not x.sharding.is_fully_replicated
    ]
    assert any("linear1" in s for s in split) and any("img_attn" in s for s in split)
    args = [jax.device_put(a, NamedSharding(mesh, P(("data", "fsdp")))) for a in case["args"]]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        fn = jax.jit(lambda p, x, t, c, y, g: models.build(config).apply({"params": p}, x, t, c, y, guidance=g))
        assert "sharding_constraint" in fn.lower(params, *args).as_text()
        out = fn(params, *args)
    err = rel_err(out, case["got"])
    print(f"Flux dev sharded (data=2, fsdp=2, tensor=2) vs unsharded: max rel err {err:.1e}")
    assert err < 1e-5


def test_bf16_within_tolerance():
    """bf16 compute (fp32 params, norms, softmax, RoPE) vs fp32: max |bf16 − fp32| / max |fp32| < 3e-2."""
    case = run_case("dev")
    config, params = models.set_scan(case["config"].replace(dtype="bfloat16"), case["params"], True)
    got = _apply(config, params, *case["args"])
    assert got.dtype == jnp.float32
    err = rel_err(got, case["got"])
    print(f"Flux dev bf16 vs fp32: max rel err {err:.1e}")
    assert 0 < err < 3e-2


# ---- presets -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, count, guidance", [("FLUX.1-dev", 11_901_408_320, True), ("FLUX.1-schnell", 11_891_178_560, False)]
)
def test_preset_parameter_counts_match_diffusers(name, count, guidance):
    from diffusers import FluxTransformer2DModel

    config = models.preset(name)
    assert (config.hidden_size, config.num_heads, config.depth, config.depth_single) == (3072, 24, 19, 38)
    assert (config.context_dim, config.pooled_dim, config.axes_dims, config.guidance_embeds) == (
        4096,
        768,
        (16, 56, 56),
        guidance,
    )
    n = models.count_params(models.abstract_params(config.replace(scan_blocks=True)))
    with torch.device("meta"):
        ref = FluxTransformer2DModel(guidance_embeds=guidance)
    print(f"{name}: {n:,} parameters")
    assert n == count == sum(p.numel() for p in ref.parameters())
    assert flux_convert.diffusers_config(config) | {"_diffusers_version": None} == {
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in ref.config.items() if not k.startswith("_")},
        "out_channels": 64,
        "_class_name": "FluxTransformer2DModel",
        "_diffusers_version": None,
    }


# ---- the family protocol -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dev", "schnell"])
def test_family_protocol(name):
    case = run_case(name)
    config, params = case["config"], case["params"]
    family = family_of(config)
    x, t, context, pooled, guidance = case["args"]
    b = x.shape[0]
    assert (family.name, family.display_name, family.task, family.conversion) == (
        "flux",
        "Flux",
        "text-to-image",
        "dit_jax.convert.flux",
    )
    assert family.text_width(config) == 32 and family.dropout_prob(config) == 0.0
    dev = config.guidance_embeds
    assert family.embedded_guidance(config) == dev
    assert family.max_sequence_length(config) == (512 if dev else 256)
    assert family.sampling_for(config) == (
        {"num_inference_steps": 28, "guidance_scale": 3.5} if dev else {"num_inference_steps": 4, "guidance_scale": 0.0}
    )
    schedule, method, _ = diffusion.from_diffusers_scheduler_config(family.scheduler_config_for(config))
    assert method == "euler" and (schedule.dynamic_shift is not None) == dev and schedule.shift == (3.0 if dev else 1.0)
    assert family.diffusers_pipelines == {"FluxPipeline": {"max_sequence_length": 512}}

    batch = {"x": x, "context": context, "pooled": pooled}
    cond = family.condition(config, batch)
    assert sorted(cond) == (["context", "guidance", "pooled"] if dev else ["context", "pooled"])
    if dev:
        np.testing.assert_array_equal(cond["guidance"], np.ones(b))  # no guidance in the batch: 1.0 per row
        cond = family.condition(config, {**batch, "guidance": guidance})

    # samplers give t·1000; apply hands σ (and the guidance) to the module
    class Recorder:
        def apply(self, variables, *args, **kwargs):
            self.call = (variables, args, kwargs)
            return "out"

    module = Recorder()
    assert family.apply(module, params, x, t * 1000, cond) == "out"
    variables, (x_, t_, context_, pooled_), kwargs = module.call
    assert variables["params"] is params and x_ is x and context_ is context and pooled_ is pooled
    np.testing.assert_allclose(t_, t, rtol=1e-7)
    assert kwargs["guidance"] is (guidance if dev else None)

    drop = np.arange(b) % 2 == 0
    dropped = family.drop_condition(config, cond, drop)
    assert not np.asarray(dropped["context"])[drop].any() and not np.asarray(dropped["pooled"])[drop].any()
    np.testing.assert_array_equal(np.asarray(dropped["context"])[~drop], context[~drop])
    c, null = family.guidance_conditions(config, cond)
    if dev:  # guidance-distilled: no classifier-free guidance
        assert null is None
        calls = []
        z = diffusion.generate(
            lambda x, t, c: calls.append(x.shape) or -x,
            c,
            null,
            jnp.ones((b, 2, 2, 4)),
            jax.random.key(0),
            guidance_scale=3.5,
            schedule=diffusion.FlowSchedule(),
            method="euler",
            num_steps=2,
        )
        assert z.shape == (b, 2, 2, 4) and all(s[0] == b for s in calls)  # the batch is not doubled
    else:
        assert sorted(null) == sorted(c) and not any(np.asarray(v).any() for v in null.values())

    specs = family.condition_specs(config, 3)
    assert specs["context"].shape == (3, family.max_sequence_length(config), 32) and specs["pooled"].shape == (3, 24)
    assert ("guidance" in specs) == dev
    grid, n, rows = family.grid_condition(config, {"per_class": 1, "num_classes": 3, "guidance_scale": 2.5}, batch)
    assert (n, rows) == (min(3, b), 1) and grid["context"] is context
    if dev:
        np.testing.assert_array_equal(grid["guidance"], np.full(b, 2.5))
    flops = family.forward_flops(config, 128, 128)
    assert flops > 0 and family.forward_flops(config, 128, 128, 1024) > flops


def test_forward_flops_against_xla():
    """The analytic count against XLA's cost analysis of the unscanned forward (elementwise ops make XLA's larger)."""
    config = FluxConfig(
        hidden_size=256,
        num_heads=4,
        depth=1,
        depth_single=1,
        context_dim=64,
        pooled_dim=32,
        axes_dims=(16, 24, 24),
        in_channels=4,
        out_channels=4,
        attention_backend="xla",  # XLA counts the attention it runs itself, not the CPU kernel's custom call
    )
    family = family_of(config)
    shapes = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nn.meta.unbox(models.abstract_params(config))
    )
    args = (
        np.zeros((1, 32, 32, 4), np.float32),
        np.zeros(1, np.float32),
        np.zeros((1, 64, 64), np.float32),
        np.zeros((1, 32), np.float32),
        np.ones(1, np.float32),
    )
    fn = lambda p, x, t, c, y, g: models.build(config).apply({"params": p}, x, t, c, y, guidance=g)  # noqa: E731
    xla = jax.jit(fn).lower(shapes, *args).cost_analysis()["flops"]
    ours = family.forward_flops(config, 32, 32, 64)
    print(f"Flux forward FLOPs: analytic {ours:,}, XLA {xla:,.0f} (ratio {ours / xla:.3f})")
    assert 0.85 < ours / xla <= 1.0


# ---- configs and errors --------------------------------------------------------------------------------------------


def test_config_json_round_trip_and_validation():
    config = models.preset("FLUX.1-schnell").replace(dtype="bfloat16", scan_blocks=True)
    back = models.config_from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config and isinstance(back.axes_dims, tuple) and back.learn_sigma is False
    for changes, match in [
        (dict(axes_dims=(16, 56, 58)), r"axes_dims=\(16, 56, 58\) .*summing to head_dim=128"),
        (dict(axes_dims=(15, 57, 56)), "positive even"),
        (dict(mlp_ratio=3.5), "mlp_ratio=3.5 .*integer"),
        (dict(num_heads=7), "hidden_size=3072 .*multiple of num_heads=7"),
        (dict(depth_single=-1), "depth_single=-1"),
        (dict(input_size=127), "input_size=127"),
    ]:
        with pytest.raises(ValueError, match=match):
            FluxConfig(**changes)


def _trace(config, *args, **kwargs):
    return jax.eval_shape(lambda: models.build(config).init(jax.random.key(0), *args, **kwargs))


def test_error_paths():
    dev = FluxConfig(
        hidden_size=32,
        num_heads=2,
        depth=1,
        depth_single=1,
        context_dim=8,
        pooled_dim=8,
        axes_dims=(4, 6, 6),
        in_channels=4,
        out_channels=4,
        input_size=8,
    )
    x, t, c, y = np.zeros((2, 6, 4, 4)), np.zeros(2), np.zeros((2, 3, 8)), np.zeros((2, 8))
    _trace(dev, x, t, c, y, guidance=np.full(2, 3.5))
    with pytest.raises(ValueError, match=r"divisible by 2 .*got 5x4"):
        _trace(dev, np.zeros((2, 5, 4, 4)), t, c, y, guidance=np.ones(2))
    with pytest.raises(ValueError, match="guidance-distilled .*pass guidance"):
        _trace(dev, x, t, c, y)
    with pytest.raises(ValueError, match="no guidance embedding"):
        _trace(dev.replace(guidance_embeds=False), x, t, c, y, guidance=np.ones(2))
    with pytest.raises(ValueError, match=r"context must be \(B=2, L, 8\)"):
        _trace(dev, x, t, c[0], y, guidance=np.ones(2))


def test_conversion_errors():
    cfg = dict(TINY, guidance_embeds=True)
    sd = state_dict_numpy(diffusers_flux(cfg, seed=3))
    bfl = original_from_diffusers(sd, 2, 2)
    bad = dict(bfl)
    bad["double_blocks.1.txt_attn.qkv.weight"] = bad["double_blocks.1.txt_attn.qkv.weight"][:, :-1]
    bad["single_blocks.0.linear1.bias"] = bad["single_blocks.0.linear1.bias"][:-2]
    del bad["double_blocks.0.img_attn.norm.key_norm.scale"]
    bad["single_blocks.0.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(convert.ConversionError) as e:
        convert.from_state_dict(bad, axes_dims=(4, 6, 6), source="flux1-bad.safetensors")
    msg = str(e.value)
    assert msg.startswith("flux1-bad.safetensors does not match the model")
    assert "double_blocks.0.img_attn.norm.key_norm.scale" in msg and "single_blocks.0.extra.weight (3,)" in msg
    assert "double_blocks.1.txt_attn.qkv.weight: expected (96, 32), found (96, 31)" in msg
    assert "single_blocks.0.linear1.bias: expected (224,), found (222,)" in msg
    with pytest.raises(convert.ConversionError, match="patch_size=2; .*patch_size 1"):
        convert.from_state_dict(sd, diffusers_config=dict(cfg, patch_size=2, _class_name="FluxTransformer2DModel"))
    with pytest.raises(convert.ConversionError, match="format='original' was requested"):
        convert.from_state_dict(sd, format="original", axes_dims=(4, 6, 6))
    assert convert.detect(sd) == ("flux", "diffusers") and convert.detect(bfl) == ("flux", "original")

    config, params = convert.from_state_dict(bfl, axes_dims=(4, 6, 6))
    no_bias = dataclasses.replace(config, qkv_bias=False, mlp_ratio=2.0)
    with pytest.raises(convert.ConversionError, match="mlp_ratio 4 .*qkv biases"):
        convert.to_torch(no_bias, params, format="diffusers")
    with pytest.warns(UserWarning, match=r"does not store the RoPE axes \(4, 6, 6\)"):
        convert.to_torch(config, params, format="original")
    with pytest.raises(convert.ConversionError, match="patch_size=1"):
        convert.to_torch(dataclasses.replace(config, patch_size=1, input_size=8), params, format="original")
