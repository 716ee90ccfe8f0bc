"""SD3 / SD3.5 MM-DiT: parity with diffusers ``SD3Transformer2DModel`` in the diffusers and the original (Stability AI)
formats, skip-layer guidance, scan/bf16/sharded execution, exact preset sizes, the family protocol and error paths.

Parity criterion: max abs error ≤ 1e-5 · max(1, max|reference|), fp32 on CPU, every parameter re-randomised and the
stored ``pos_embed`` replaced by noise (so a wrong centre crop cannot hide).
"""

import dataclasses
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from parity import assert_bit_exact, check_parity, nchw, nhwc, randomize_, rel_err, state_dict_numpy

from dit_jax import convert, models
from dit_jax.convert import mmdit as convert_mmdit
from dit_jax.convert.rules import flatten
from dit_jax.models.mmdit import MMDiTConfig, sincos_table
from dit_jax.parallel import logical_rules

# FAMILIES.md tiny configs: SD3 (plain) and SD3.5 (RMS qk-norm, MMDiT-X dual attention in block 0).
SD3 = dict(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=32,
    caption_projection_dim=32,
    pooled_projection_dim=16,
    out_channels=4,
    pos_embed_max_size=16,
    dual_attention_layers=(),
    qk_norm=None,
)
SD35 = dict(SD3, dual_attention_layers=(0,), qk_norm="rms_norm")
# Wider: 4 layers, 4 heads × 16, dual attention in the middle (stages [0], [1, 2], [3]), out ≠ in channels.
WIDE = dict(
    SD35,
    num_layers=4,
    attention_head_dim=16,
    caption_projection_dim=64,
    joint_attention_dim=48,
    pooled_projection_dim=24,
    out_channels=8,
    dual_attention_layers=(1, 2),
)
TINY = {"SD3": SD3, "SD3.5": SD35}
# latent sizes: an odd patch grid (7×10: crop offsets 4, 3) for the tiny models, 16×24 (8×12) for the wide one
SIZES = {"SD3": (14, 20), "SD3.5": (14, 20), "wide": (16, 24)}


def diffusers_sd3(cfg: dict, seed: int):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    m = randomize_(SD3Transformer2DModel(**cfg).eval(), seed=seed)
    with torch.no_grad():  # a table of noise: a wrong crop offset cannot match by the table's smoothness
        m.pos_embed.pos_embed.copy_(
            torch.randn(m.pos_embed.pos_embed.shape, generator=torch.Generator().manual_seed(9))
        )
    return m


def config_json(m) -> dict:
    return json.loads(m.to_json_string())


def inputs(cfg: dict, height: int, width: int, seed: int = 0, batch: int = 2, length: int = 7):
    rs = np.random.RandomState(seed)
    x = rs.randn(batch, cfg["in_channels"], height, width).astype(np.float32)  # NCHW
    t = rs.uniform(0, 1000, batch).astype(np.float32)  # σ·1000
    context = rs.randn(batch, length, cfg["joint_attention_dim"]).astype(np.float32)
    pooled = rs.randn(batch, cfg["pooled_projection_dim"]).astype(np.float32)
    return x, t, context, pooled


def run_diffusers(m, x, t, context, pooled, skip_layers=None) -> np.ndarray:
    with torch.no_grad():
        out = m(
            torch.from_numpy(x),
            encoder_hidden_states=torch.from_numpy(context),
            pooled_projections=torch.from_numpy(pooled),
            timestep=torch.from_numpy(t),
            skip_layers=skip_layers,
        ).sample
    return out.numpy()


_apply = jax.jit(
    lambda cfg, p, x, t, c, y, skip: models.build(cfg).apply({"params": p}, x, t, c, y, skip_layers=skip),
    static_argnums=(0, 6),
)


def run_jax(config, params, x, t, context, pooled, skip_layers=None) -> np.ndarray:
    return nchw(np.asarray(_apply(config, params, nhwc(x), t, context, pooled, skip_layers)))


def _swap(a: np.ndarray) -> np.ndarray:
    """diffusers (scale, shift) rows ↔ SAI (shift, scale)."""
    return np.concatenate(np.split(a, 2)[::-1])


def original_from_diffusers(sd: dict, depth: int, dual: tuple[int, ...]) -> dict:
    """MODELS.md §3.3 backwards, written independently of dit_jax.convert: SAI keys without the
    ``model.diffusion_model.`` prefix."""
    o = {"pos_embed": sd["pos_embed.pos_embed"]}
    cat = np.concatenate
    for w in ("weight", "bias"):
        o[f"x_embedder.proj.{w}"] = sd[f"pos_embed.proj.{w}"]
        o[f"context_embedder.{w}"] = sd[f"context_embedder.{w}"]
        o[f"final_layer.linear.{w}"] = sd[f"proj_out.{w}"]
        o[f"final_layer.adaLN_modulation.1.{w}"] = _swap(sd[f"norm_out.linear.{w}"])
        for n, s in (("0", "linear_1"), ("2", "linear_2")):
            o[f"t_embedder.mlp.{n}.{w}"] = sd[f"time_text_embed.timestep_embedder.{s}.{w}"]
            o[f"y_embedder.mlp.{n}.{w}"] = sd[f"time_text_embed.text_embedder.{s}.{w}"]
    for i in range(depth):
        b, j, last = f"transformer_blocks.{i}", f"joint_blocks.{i}", i == depth - 1
        xb, cb = f"{j}.x_block", f"{j}.context_block"
        for w in ("weight", "bias"):
            o[f"{xb}.adaLN_modulation.1.{w}"] = sd[f"{b}.norm1.linear.{w}"]
            ada = sd[f"{b}.norm1_context.linear.{w}"]
            o[f"{cb}.adaLN_modulation.1.{w}"] = _swap(ada) if last else ada
            o[f"{xb}.attn.qkv.{w}"] = cat([sd[f"{b}.attn.to_{c}.{w}"] for c in "qkv"])
            o[f"{cb}.attn.qkv.{w}"] = cat([sd[f"{b}.attn.add_{c}_proj.{w}"] for c in "qkv"])
            o[f"{xb}.attn.proj.{w}"] = sd[f"{b}.attn.to_out.0.{w}"]
            o[f"{xb}.mlp.fc1.{w}"] = sd[f"{b}.ff.net.0.proj.{w}"]
            o[f"{xb}.mlp.fc2.{w}"] = sd[f"{b}.ff.net.2.{w}"]
            if not last:
                o[f"{cb}.attn.proj.{w}"] = sd[f"{b}.attn.to_add_out.{w}"]
                o[f"{cb}.mlp.fc1.{w}"] = sd[f"{b}.ff_context.net.0.proj.{w}"]
                o[f"{cb}.mlp.fc2.{w}"] = sd[f"{b}.ff_context.net.2.{w}"]
            if i in dual:
                o[f"{xb}.attn2.qkv.{w}"] = cat([sd[f"{b}.attn2.to_{c}.{w}"] for c in "qkv"])
                o[f"{xb}.attn2.proj.{w}"] = sd[f"{b}.attn2.to_out.0.{w}"]
        if f"{b}.attn.norm_q.weight" in sd:
            for q in "qk":
                o[f"{xb}.attn.ln_{q}.weight"] = sd[f"{b}.attn.norm_{q}.weight"]
                o[f"{cb}.attn.ln_{q}.weight"] = sd[f"{b}.attn.norm_added_{q}.weight"]
                if i in dual:
                    o[f"{xb}.attn2.ln_{q}.weight"] = sd[f"{b}.attn2.norm_{q}.weight"]
    return o


@pytest.fixture(scope="module", params=["SD3", "SD3.5"])
def tiny(request):
    """(name, diffusers model, its state dict, config.json, inputs, reference output)."""
    name = request.param
    m = diffusers_sd3(TINY[name], seed=1 if name == "SD3" else 2)
    args = inputs(TINY[name], *SIZES[name], seed=3)
    return name, m, state_dict_numpy(m), config_json(m), args, run_diffusers(m, *args)


@pytest.fixture(scope="module")
def wide():
    m = diffusers_sd3(WIDE, seed=4)
    args = inputs(WIDE, *SIZES["wide"], seed=5, length=9)
    sd = state_dict_numpy(m)
    config, params = convert.from_state_dict(sd, diffusers_config=config_json(m))
    return m, sd, config, params, args, run_diffusers(m, *args)


# ---- diffusers format ------------------------------------------------------------------------------------------


def test_diffusers_tiny(tiny):
    name, _, sd, cfg_json, args, want = tiny
    config, params = convert.from_state_dict(sd, diffusers_config=cfg_json)
    assert isinstance(config, MMDiTConfig) and config.family == "sd3" and not config.learn_sigma
    assert (config.depth, config.hidden_size, config.num_heads, config.pos_embed_max_size) == (3, 32, 4, 16)
    assert config.qk_norm == TINY[name]["qk_norm"]
    assert config.dual_attention_layers == TINY[name]["dual_attention_layers"]
    assert params["pos_embed"].shape == (16 * 16, 32)
    check_parity(f"{name} diffusers tiny (7x10 patch grid)", run_jax(config, params, *args), want)
    assert_bit_exact(convert.to_torch(config, params, format="diffusers"), sd)
    assert convert.diffusers_config(config) == cfg_json  # every config.json field written back


def test_diffusers_wide_folder_scanned_non_square(wide, tmp_path):
    """A saved diffusers folder, scanned on import (three stages), 16×24 latents (8×12 patches in a 16² table)."""
    from diffusers import SD3Transformer2DModel

    m, sd, _, _, args, want = wide
    m.save_pretrained(tmp_path / "sd3")
    config, params = convert.from_torch(tmp_path / "sd3", scan_blocks=True)
    assert config.scan_blocks and config.dual_attention_layers == (1, 2) and config.out_channels == 8
    assert sorted(k for k in params if k.startswith("stage_")) == ["stage_0", "stage_1", "stage_2"]
    assert "attn2" in params["stage_1"]["x_block"] and "mlp" not in params["stage_2"]["context_block"]
    check_parity(
        "SD3.5 diffusers 4 layers, 4x16 heads, dual 1-2 (scanned, 16x24)", run_jax(config, params, *args), want
    )
    out = convert.save_torch(tmp_path / "exported", config, params, format="diffusers")
    m2 = SD3Transformer2DModel.from_pretrained(out).eval()
    np.testing.assert_array_equal(run_diffusers(m2, *args), want)
    assert_bit_exact(convert.to_torch(config, params, format="diffusers"), sd)


def test_diffusers_keys_without_config_json(wide):
    """The architecture from keys and shapes alone (heads from the qk-norm width)."""
    _, sd, want_config, want_params, _, _ = wide
    config, params = convert.from_state_dict(sd)
    assert config == dataclasses.replace(want_config, input_size=32)  # not stored: 128 capped at 16 patches · 2
    assert_bit_exact(convert.to_torch(config, params, format="diffusers"), sd)


# ---- skip-layer guidance -----------------------------------------------------------------------------------------


def test_skip_layers_match_diffusers(wide):
    """diffusers' ``skip_layers`` (SD3.5 skip-layer guidance) over a dual-attention block and the last (pre-only)
    one, with remat (the skipping loop wraps blocks itself)."""
    m, _, config, params, args, _ = wide
    skip = (1, 3)
    want = run_diffusers(m, *args, skip_layers=list(skip))
    got = run_jax(config.replace(remat="full"), params, *args, skip_layers=skip)
    check_parity(f"SD3.5 wide skip_layers={skip}", got, want)
    scanned = models.set_scan(config, params, True)
    with pytest.raises(ValueError, match="skip_layers needs the loop layout"):
        run_jax(*scanned, *args, skip_layers=skip)
    with pytest.raises(ValueError, match=r"skip_layers \[4\] are not block indices in \[0, 4\)"):
        run_jax(config, params, *args, skip_layers=(4,))


# ---- original (Stability AI) format ------------------------------------------------------------------------------


def test_original_format(tiny):
    """SAI keys mapped from the diffusers model: the same config (from keys and shapes) and output."""
    name, _, sd, cfg_json, args, want = tiny
    cfg = TINY[name]
    orig = original_from_diffusers(sd, cfg["num_layers"], cfg["dual_attention_layers"])
    # input_size (diffusers' sample_size) is not stored: without it, 128 latents capped at 16 patches · 2
    assert convert.from_state_dict(orig, num_heads=4)[0].input_size == 32
    if cfg["qk_norm"] is None:  # heads are not stored, and width 32 is not a multiple of SAI's head_dim 64
        with pytest.raises(convert.ConversionError, match="cannot infer num_heads: the checkpoint has no qk-norm"):
            convert.from_state_dict(orig, input_size=16)
        config, params = convert.from_state_dict(orig, num_heads=4, input_size=16)
    else:
        config, params = convert.from_state_dict(orig, input_size=16)  # head_dim from ln_q
    assert config == convert.from_state_dict(sd, diffusers_config=cfg_json)[0]
    check_parity(f"{name} original (mapped from diffusers)", run_jax(config, params, *args), want)
    with pytest.warns(UserWarning, match="assumes depth = heads = width/64"):
        exported = convert.to_torch(config, params, format="original")
    assert_bit_exact(exported, orig)
    assert_bit_exact(convert.to_torch(config, params, format="diffusers"), sd)  # the swaps, both ways


def test_original_file_and_prefix(wide, tmp_path):
    _, sd, _, params, _, _ = wide
    orig = original_from_diffusers(sd, WIDE["num_layers"], WIDE["dual_attention_layers"])
    from safetensors.numpy import save_file

    save_file(orig, str(tmp_path / "sd3.5_tiny.safetensors"))
    config, got_params = convert.from_torch(tmp_path / "sd3.5_tiny.safetensors")
    assert config.dual_attention_layers == (1, 2) and config.num_heads == 4
    jax.tree.map(np.testing.assert_array_equal, got_params, params)  # the parameters checked for parity
    # a Stability single file: the transformer under model.diffusion_model., beside the VAE
    prefixed = {f"model.diffusion_model.{k}": v for k, v in orig.items()}
    prefixed["first_stage_model.decoder.conv_in.weight"] = np.zeros((1,), np.float32)
    _, single_params = convert.from_state_dict(prefixed)
    jax.tree.map(np.testing.assert_array_equal, single_params, params)
    with pytest.raises(convert.ConversionError, match="'model.diffusion_model.' prefix .*first_stage_model"):
        convert_mmdit.infer_config(prefixed, None, "original", "sd3.5.safetensors")  # the module takes bare keys


# ---- execution: scan, bf16, sharded ------------------------------------------------------------------------------


def test_scan_equals_loop_and_bf16(wide):
    _, _, config, params, args, _ = wide
    ref = run_jax(config, params, *args)
    scan_cfg, scan_params = models.set_scan(config, params, True)
    err = rel_err(run_jax(scan_cfg, scan_params, *args), ref)
    print(f"SD3.5 wide scan vs loop: max rel err {err:.1e}")
    assert err < 1e-6
    got = run_jax(config.replace(dtype="bfloat16"), params, *args)
    assert got.dtype == np.float32
    err = rel_err(got, ref)
    print(f"SD3.5 wide bf16 vs fp32: max rel err {err:.1e}")
    assert 0 < err < 3e-2


def test_sharded_equals_unsharded(wide):
    """fsdp=2 × tensor=4 over the 8 test devices, scanned stages with remat, default logical rules."""
    _, _, config, params, args, _ = wide
    ref = run_jax(config, params, *args)
    cfg, params = models.set_scan(config.replace(remat="dots"), params, True)
    mesh = jax.make_mesh((1, 2, 4), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    rules = logical_rules()
    shardings = nn.logical_to_mesh_sharding(models.logical_param_specs(cfg), mesh, rules)
    params = jax.device_put(params, shardings)
    assert params["stage_1"]["x_block"]["attn2"]["qkv"]["kernel"].sharding.spec == P(None, "fsdp", None, "tensor", None)
    assert params["pos_embed"].sharding.spec == P(None, "fsdp")
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    x, t, context, pooled = (jax.device_put(a, batch) for a in (nhwc(args[0]), *args[1:]))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        fn = jax.jit(lambda p, *a: models.build(cfg).apply({"params": p}, *a))
        lowered = fn.lower(params, x, t, context, pooled)
        assert "sharding_constraint" in lowered.as_text()
        out = lowered.compile()(params, x, t, context, pooled)
    err = rel_err(nchw(np.asarray(out)), ref)
    print(f"SD3.5 wide sharded (fsdp=2, tensor=4, scan, remat) vs unsharded: max rel err {err:.1e}")
    assert err < 1e-5


# ---- presets -----------------------------------------------------------------------------------------------------

# The diffusers converter's configs (MODELS.md §3.3) and SD3Transformer2DModel's parameter counts on the meta
# device: FAMILIES.md's 2.028B / 2.243B / 8.057B. Our count adds the stored pos_embed (a diffusers buffer).
PRESET_CASES = [
    ("SD3-medium", dict(num_layers=24, num_attention_heads=24, pos_embed_max_size=192), 2_028_328_000, 192),
    (
        "SD3.5-medium",
        dict(
            num_layers=24,
            num_attention_heads=24,
            pos_embed_max_size=384,
            qk_norm="rms_norm",
            dual_attention_layers=tuple(range(13)),
        ),
        2_243_171_520,
        384,
    ),
    (
        "SD3.5-large",
        dict(num_layers=38, num_attention_heads=38, pos_embed_max_size=192, qk_norm="rms_norm"),
        8_056_627_520,
        192,
    ),
]


@pytest.mark.parametrize("name, diffusers_kw, count, pos", PRESET_CASES)
def test_preset_parameter_counts(name, diffusers_kw, count, pos):
    from diffusers import SD3Transformer2DModel

    kw = dict(sample_size=128, patch_size=2, in_channels=16, joint_attention_dim=4096, **diffusers_kw)
    kw["caption_projection_dim"] = 64 * kw["num_attention_heads"]
    with torch.device("meta"):
        m = SD3Transformer2DModel(**kw)
    config = models.preset(name)
    d = config.hidden_size
    shapes = {k: v.shape for k, v in flatten(nn.meta.unbox(models.abstract_params(config))).items()}
    ours = int(sum(np.prod(s) for s in shapes.values()))
    print(f"{name}: {ours - pos * pos * d:,} parameters + pos_embed {pos * pos * d:,} = {ours:,}")
    assert sum(p.numel() for p in m.parameters()) == count
    assert ours == count + pos * pos * d == sum(v.numel() for v in m.state_dict().values())
    assert convert.diffusers_config(config) == json.loads(m.to_json_string())
    # every diffusers key and shape, from the rule table and the preset's parameter shapes
    table, _ = convert_mmdit.rules(config, "diffusers")
    got = {}
    for r in table:
        value = r.to_torch(np.broadcast_to(np.float32(0), shapes[r.flax]))
        got.update(zip(r.torch_keys, value if isinstance(value, tuple) else (value,)))
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in m.state_dict().items()}


# ---- the family protocol -----------------------------------------------------------------------------------------


def test_family_protocol(wide):
    _, _, config, params, args, _ = wide
    family = models.family_of(config)
    assert (family.name, family.task, family.conversion) == ("sd3", "text-to-image", "dit_jax.convert.mmdit")
    assert family.scheduler_config["shift"] == 3.0 and family.sampling["guidance_scale"] == 7.0
    assert family.diffusers_pipelines == {"StableDiffusion3Pipeline": {"max_sequence_length": 256}}
    assert family.text_width(config) == 48 and family.max_sequence_length(config) == 256
    assert family.dropout_prob(config) == 0.0
    x, t, context, pooled = args
    batch = {"x": nhwc(x), "context": context, "pooled": pooled}
    cond = family.condition(config, batch)

    class Recorder:
        def apply(self, variables, *a, **kw):
            return variables, a, kw

    variables, passed, kw = family.apply(Recorder(), params, batch["x"], t, cond)
    assert list(variables) == ["params"] and variables["params"] is params and kw == {"skip_layers": None}
    assert all(a is b for a, b in zip(passed, (batch["x"], t, context, pooled)))
    assert family.apply(Recorder(), params, batch["x"], t, {**cond, "skip_layers": (1,)})[2] == {"skip_layers": (1,)}
    dropped = family.drop_condition(config, cond, np.array([True, False]))
    assert np.all(np.asarray(dropped["context"][0]) == 0) and np.all(np.asarray(dropped["pooled"][0]) == 0)
    np.testing.assert_array_equal(dropped["context"][1], context[1])
    c, null = family.guidance_conditions(config, cond)
    assert jax.tree.structure(c) == jax.tree.structure(null) and not np.any(np.asarray(null["pooled"]))
    specs = family.condition_specs(config, 3)
    assert specs["context"].shape == (3, 333, 48) and specs["pooled"].shape == (3, 24)
    grid, n, rows = family.grid_condition(config, {"per_class": 1, "num_classes": 4}, batch)
    assert (n, rows) == (2, 1) and set(grid) == {"context", "pooled"}
    # prompts: CLIP-L ⊕ CLIP-G penultimate states (widths 8 + 12) zero-padded to 48, then the T5 tokens
    slots = family.text_slots(config)
    assert [(s.name, s.encoder, s.prompt, s.max_length, s.use_mask) for s in slots] == [
        ("clip_l", "text_encoder", 1, 77, False),
        ("clip_g", "text_encoder_2", 2, 77, False),
        ("t5", "text_encoder_3", 3, None, False),
    ]
    rs = np.random.RandomState(0)
    feats = {
        "clip_l": {"penultimate": rs.randn(2, 77, 8), "text_embeds": rs.randn(2, 10)},
        "clip_g": {"penultimate": rs.randn(2, 77, 12), "text_embeds": rs.randn(2, 14)},
        "t5": {"hidden": rs.randn(2, 5, 48)},
    }
    text = family.text_condition(config, feats)
    assert text["context"].shape == (2, 82, 48) and text["pooled"].shape == (2, 24)
    np.testing.assert_array_equal(text["context"][:, :77, 8:20], feats["clip_g"]["penultimate"])
    np.testing.assert_array_equal(text["context"][:, :77, 20:], 0.0)
    np.testing.assert_array_equal(text["context"][:, 77:], feats["t5"]["hidden"])
    np.testing.assert_array_equal(text["pooled"][:, 10:], feats["clip_g"]["text_embeds"])
    del feats["t5"]
    assert family.text_condition(config, feats)["context"].shape == (2, 333, 48)  # no T5: zeros


def test_forward_flops_against_xla():
    """The analytic count (dots only) against XLA's count of the looped model (dots + elementwise)."""
    config = MMDiTConfig(
        input_size=16, patch_size=2, in_channels=4, out_channels=4, hidden_size=128, depth=3, num_heads=2,
        joint_attention_dim=64, pooled_projection_dim=32, pos_embed_max_size=8, qk_norm="rms_norm",
        dual_attention_layers=(1,), attention_backend="xla",
    )  # fmt: skip # XLA counts the attention it runs itself, not the CPU kernel's custom call
    params = nn.meta.unbox(models.abstract_params(config))
    x, t, _, pooled = config.dummy_inputs(1)
    context = np.zeros((1, 20, 64), np.float32)
    fn = jax.jit(lambda p, *a: models.build(config).apply({"params": p}, *a))
    xla = fn.lower(params, x, t, context, pooled).cost_analysis()["flops"]
    ours = models.family_of(config).forward_flops(config, 16, 16, 20)
    print(f"SD3 forward FLOPs: analytic {ours:,}, XLA {xla:,.0f} (ratio {ours / xla:.3f})")
    assert 0.85 < ours / xla <= 1.0


# ---- errors ------------------------------------------------------------------------------------------------------


def test_config_validation():
    with pytest.raises(ValueError, match="qk_norm='layer_norm' is invalid"):
        MMDiTConfig(qk_norm="layer_norm")
    with pytest.raises(ValueError, match=r"dual_attention_layers=\(24,\) .*\[0, 24\)"):
        MMDiTConfig(dual_attention_layers=(24,))
    with pytest.raises(ValueError, match="input_size=128 .*at most pos_embed_max_size·patch_size = 64"):
        MMDiTConfig(pos_embed_max_size=32)
    config = models.preset("SD3.5-medium")
    assert models.config_from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_fresh_pos_embed_is_diffusers_init():
    """A fresh model's pos_embed is the table diffusers builds at init (positions spaced sample/patch / max)."""
    from diffusers import SD3Transformer2DModel

    table = SD3Transformer2DModel(**dict(SD3, pos_embed_max_size=12)).pos_embed.pos_embed[0].numpy()
    np.testing.assert_array_equal(np.asarray(sincos_table(12, 32, 16 // 2)), table)


def test_grid_larger_than_pos_embed(wide):
    _, _, config, params, _, _ = wide
    x, t, context, pooled = inputs(WIDE, 16, 34)  # 8×17 patches, table 16×16
    with pytest.raises(ValueError, match=r"8x17 patch grid; this model's pos_embed covers at most 16x16"):
        jax.eval_shape(lambda: models.build(config).apply({"params": params}, nhwc(x), t, context, pooled))


def test_conversion_errors(wide):
    m, sd, _, _, _, _ = wide
    cfg = config_json(m)
    bad = dict(sd)
    bad["transformer_blocks.1.attn.to_q.weight"] = np.zeros((64, 63), np.float32)  # mis-shaped
    del bad["transformer_blocks.2.attn2.norm_k.weight"]  # missing
    bad["transformer_blocks.0.attn3.to_q.weight"] = np.zeros((4,), np.float32)  # unexpected
    with pytest.raises(convert.ConversionError) as e:
        convert.from_state_dict(bad, diffusers_config=cfg)
    msg = str(e.value)
    assert "transformer_blocks.1.attn.to_q.weight: expected (64, 64), found (64, 63)" in msg
    assert "missing keys:\n  transformer_blocks.2.attn2.norm_k.weight" in msg
    assert "unexpected keys:\n  transformer_blocks.0.attn3.to_q.weight (4,)" in msg
    # the config says 3 layers but the weights hold 4; a config.json whose blocks do not fit the width
    with pytest.raises(convert.ConversionError) as e:
        convert.from_state_dict(sd, diffusers_config={**cfg, "num_layers": 3})
    assert "transformer_blocks.2.norm1_context.linear.weight: expected (128, 64), found (384, 64)" in str(e.value)
    assert "transformer_blocks.3.norm1.linear.weight (384, 64)" in str(e.value)
    with pytest.raises(convert.ConversionError, match="caption_projection_dim=32; the blocks need it equal to .* 64"):
        convert.from_state_dict(sd, diffusers_config={**cfg, "caption_projection_dim": 32})
    with pytest.raises(convert.ConversionError, match="qk_norm='layer_norm'"):
        convert.from_state_dict(sd, diffusers_config={**cfg, "qk_norm": "layer_norm"})
    # another family's weights under an SD3 config.json, and an SD3 checkpoint asked for in the wrong format
    pixart_like = {"adaln_single.linear.weight": np.zeros((6, 1), np.float32)}
    with pytest.raises(convert.ConversionError, match="describes a diffusers sd3 but the weights look like"):
        convert.from_state_dict(pixart_like, diffusers_config=cfg)
    with pytest.raises(convert.ConversionError, match="format='original' was requested but .* diffusers format"):
        convert.from_state_dict(sd, format="original")
    with pytest.raises(convert.ConversionError, match=r"pos_embed has shape \(1, 255, 64\)"):
        convert.from_state_dict({**sd, "pos_embed.pos_embed": np.zeros((1, 255, 64), np.float32)})
