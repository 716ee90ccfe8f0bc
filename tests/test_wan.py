"""Wan 2.1: RoPE tables, parity with diffusers ``WanTransformer3DModel`` (several configs and frame counts) imported
through ``convert.from_torch`` from diffusers folders and from Wan-AI original keys, exact export round trips,
scan/sharded/sequence-parallel/bf16 execution, exact preset sizes, the family protocol and the error paths.

Parity criterion: max abs error ≤ 1e-5 · max(1, max|reference|), fp32 on CPU, every parameter re-randomised. diffusers
gets (B, C, F, H, W) latents; we get the same values channels-last (B, F, H, W, C).
"""

import dataclasses
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from parity import assert_bit_exact, assert_trees_equal, check_parity, randomize_, rel_err, state_dict_numpy

from dit_jax import convert, models
from dit_jax.convert import wan as wan_convert
from dit_jax.convert.io import write_safetensors
from dit_jax.models.family import TASKS, family_of
from dit_jax.models.wan import WanConfig, rope_tables
from dit_jax.parallel import logical_rules
from dit_jax.parallel.mesh import create_mesh

# FAMILIES.md tiny config (head_dim 12: RoPE 4/4/4)
TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=16,
    ffn_dim=32,
    num_layers=2,
    rope_max_seq_len=32,
)
# Wider: 2 heads × 24 (RoPE 8/8/8, the 128-like split t = d − 4⌊d/6⌋), 16 latent channels, 3 blocks
WIDE = dict(TINY, attention_head_dim=24, in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64)
WIDE["num_layers"] = 3
# Temporal patches (2, 2, 2), head_dim 8 (RoPE 4/2/2), out ≠ in channels, no cross-attention norm, eps 1e-5
TEMPORAL = dict(TINY, patch_size=(2, 2, 2), num_attention_heads=3, attention_head_dim=8, out_channels=6)
TEMPORAL.update(cross_attn_norm=False, eps=1e-5)
CASES = {
    # name: (diffusers config, batch, text tokens, [(frames, H, W), ...])
    "tiny": (TINY, 4, 7, [(1, 4, 6), (2, 6, 4), (5, 2, 4)]),
    "wide": (WIDE, 2, 9, [(3, 4, 4), (4, 6, 8)]),
    "temporal": (TEMPORAL, 1, 5, [(6, 2, 6)]),
}


def diffusers_wan(cfg: dict, seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return randomize_(WanTransformer3DModel(**cfg).eval(), seed)


def make_inputs(cfg: dict, batch: int, length: int, frames: int, height: int, width: int, seed: int = 0):
    """Channels-last video latents, timesteps in [0, 1000] and UMT5-like text features (zero past each prompt)."""
    rs = np.random.RandomState(seed)
    x = rs.randn(batch, frames, height, width, cfg["in_channels"]).astype(np.float32)
    t = rs.uniform(1.0, 999.0, batch).astype(np.float32)
    context = rs.randn(batch, length, cfg["text_dim"]).astype(np.float32)
    context[0, length // 2 :] = 0.0  # a short prompt: WanPipeline zeroes the padding positions
    return x, t, context


def run_diffusers(m, x, t, context) -> np.ndarray:
    latents = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))
    with torch.no_grad():
        out = m(latents, torch.from_numpy(t), torch.from_numpy(context)).sample
    return out.numpy().transpose(0, 2, 3, 4, 1)


_apply = jax.jit(lambda cfg, p, x, t, c: models.build(cfg).apply({"params": p}, x, t, c), static_argnums=0)


def original_from_diffusers(sd: dict) -> dict:
    """The documented key mapping (FAMILIES.md; diffusers' single-file Wan loader) backwards, diffusers → Wan-AI
    original keys, written independently of dit_jax.convert: renames only, with norm2 ↔ norm3 swapped."""
    renames = [
        ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
        ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
        ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
        ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
        ("condition_embedder.time_proj", "time_projection.1"),
        (".attn1.", ".self_attn."),
        (".attn2.", ".cross_attn."),
        (".to_q.", ".q."),
        (".to_k.", ".k."),
        (".to_v.", ".v."),
        (".to_out.0.", ".o."),
        ("ffn.net.0.proj", "ffn.0"),
        ("ffn.net.2", "ffn.2"),
        (".norm2.", ".norm3."),
        ("proj_out", "head.head"),
    ]
    out = {}
    for k, v in sd.items():
        if k == "scale_shift_table":
            out["head.modulation"] = v
            continue
        if k.endswith(".scale_shift_table"):
            out[k.replace("scale_shift_table", "modulation")] = v
            continue
        for a, b in renames:
            k = k.replace(a, b)
        out[k] = v
    return out


_RUNS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tmp_path_factory.mktemp("wan")


def run_case(name: str, folder) -> dict:
    """One diffusers model saved as a diffusers folder, its import through ``convert.from_torch``, and both outputs
    for every frame count of the case; built once."""
    if name not in _RUNS:
        cfg, batch, length, shapes = CASES[name]
        m = diffusers_wan(cfg, seed=len(name))
        m.save_pretrained(folder / name)
        config, params = convert.from_torch(folder / name, scan_blocks=name == "wide")  # wide: the scanned layout
        runs = []
        for j, shape in enumerate(shapes):
            args = make_inputs(cfg, batch, length, *shape, seed=j)
            runs.append((args, run_diffusers(m, *args), np.asarray(_apply(config, params, *args))))
        _RUNS[name] = dict(name=name, cfg=cfg, m=m, sd=state_dict_numpy(m), config=config, params=params, runs=runs)
    return _RUNS[name]


# ---- RoPE -------------------------------------------------------------------------------------------------------


def test_rope_tables_match_diffusers():
    """Our (frame, row, column) tables equal diffusers' WanRotaryPosEmbed (repeat-interleaved cos/sin) for head_dim
    128 (44/42/42) and 12 (4/4/4), with (1, 2, 2) patches."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    for head_dim, axes, (f, h, w) in [(128, (44, 42, 42), (3, 5, 4)), (12, (4, 4, 4), (2, 3, 2))]:
        assert WanConfig(hidden_size=2 * head_dim, num_heads=2).rope_axes == axes
        cos, sin = rope_tables(f, h, w, axes, 10000.0)
        assert cos.shape == (f * h * w, head_dim // 2) and cos.dtype == np.float32
        dcos, dsin = WanRotaryPosEmbed(head_dim, (1, 2, 2), 1024)(torch.zeros(1, 1, f, 2 * h, 2 * w))
        np.testing.assert_allclose(dcos[0, :, 0, ::2].numpy(), cos, rtol=0, atol=1e-7)
        np.testing.assert_allclose(dsin[0, :, 0, 1::2].numpy(), sin, rtol=0, atol=1e-7)
    assert WanConfig().rope_axes == (44, 42, 42) and WanConfig(hidden_size=6 * 40).rope_axes == (2, 2, 2)


# ---- parity with diffusers: both formats, round trips --------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_parity_both_formats_and_round_trips(name, folders):
    c = run_case(name, folders)
    cfg, config = c["cfg"], c["config"]
    pt, p, _ = cfg["patch_size"]
    assert (config.patch_size_t, config.patch_size, config.num_heads, config.depth) == (
        pt,
        p,
        cfg["num_attention_heads"],
        cfg["num_layers"],
    )
    assert config.cross_attn_norm == cfg.get("cross_attn_norm", True) and config.eps == cfg.get("eps", 1e-6)
    for (x, _, _), want, got in c["runs"]:
        check_parity(f"Wan {name} diffusers ({x.shape[1]} frames, {x.shape[2]}x{x.shape[3]})", got, want)
    assert_bit_exact(convert.to_torch(config, c["params"], format="diffusers"), c["sd"])

    # Wan-AI original keys from the documented mapping: the same params, outputs and a bit-exact export
    orig = original_from_diffusers(c["sd"])
    overrides = dict(num_heads=config.num_heads, eps=config.eps)  # not stored in the original format
    assert convert.from_state_dict(orig, **overrides)[0] == config.replace(rope_max_seq_len=1024, scan_blocks=False)
    overrides["rope_max_seq_len"] = config.rope_max_seq_len  # diffusers' bound on positions, not stored either
    config_o, params_o = convert.from_state_dict(orig, **overrides, scan_blocks=config.scan_blocks)
    assert config_o == config
    assert_trees_equal(params_o, c["params"])
    (x, t, context), want, _ = c["runs"][-1]
    check_parity(f"Wan {name} original keys", np.asarray(_apply(config_o, params_o, x, t, context)), want)
    with pytest.warns(UserWarning, match="does not store the number of heads"):
        assert_bit_exact(convert.to_torch(config_o, params_o, format="original"), orig)
    # diffusers keys without config.json: inferred from the shapes like the original
    config_k, params_k = convert.from_state_dict(c["sd"], **overrides, scan_blocks=config.scan_blocks)
    assert config_k == config and convert.detect(c["sd"]) == ("wan", "diffusers")
    assert_trees_equal(params_k, c["params"])


def test_original_file_and_diffusers_folder_round_trip(folders, monkeypatch):
    """A Wan-AI original .safetensors in (heads from the released head_dim 128 are a guess it can override), a
    diffusers folder out that diffusers loads with the same weights and config."""
    from diffusers import WanTransformer3DModel

    # without accelerate, diffusers refuses to load models that keep modules in fp32; everything is fp32 here
    monkeypatch.setattr(WanTransformer3DModel, "_keep_in_fp32_modules", None)

    c = run_case("wide", folders)
    path = write_safetensors(folders / "wan-original.safetensors", original_from_diffusers(c["sd"]))
    with pytest.raises(convert.ConversionError, match="num_heads: .*head_dim 128"):
        convert.from_torch(path)
    config, params = convert.from_torch(path, num_heads=2, rope_max_seq_len=32, scan_blocks=True)
    assert config.scan_blocks and config == c["config"].replace(scan_blocks=True)
    assert convert.diffusers_config(config) | {"_diffusers_version": None} == {
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in c["m"].config.items() if not k.startswith("_")},
        "_class_name": "WanTransformer3DModel",
        "_diffusers_version": None,
    }
    out = convert.save_torch(folders / "exported", config, params, format="diffusers")
    m2 = WanTransformer3DModel.from_pretrained(out).eval()
    assert_bit_exact(state_dict_numpy(m2), c["sd"])


# ---- execution switches -------------------------------------------------------------------------------------------


def test_scan_remat_equals_loop(folders):
    c = run_case("tiny", folders)
    config, params = models.set_scan(c["config"].replace(remat="dots"), c["params"], True)
    assert [k for k in params if k.startswith("stage_")] == ["stage_0"]
    assert params["stage_0"]["self_attn"]["q"]["kernel"].shape == (2, 24, 2, 12)
    (x, t, context), _, got = c["runs"][1]
    err = rel_err(_apply(config, params, x, t, context), got)
    print(f"Wan tiny scan + remat vs loop: max rel err {err:.1e}")
    assert err < 1e-6


@pytest.mark.parametrize(
    "mesh", [dict(data=2, fsdp=2, tensor=2), dict(data=2, sequence=2, tensor=2)], ids=["fsdp-tensor", "sequence"]
)
def test_sharded_equals_unsharded(mesh, folders):
    """Scanned params over the 8 test devices, batch 4: FSDP + tensor parallel, and sequence-parallel attention."""
    c = run_case("tiny", folders)
    config, params = models.set_scan(c["config"], c["params"], True)
    (x, t, context), _, ref = c["runs"][1]  # batch 4, 2 frames of 6x4: 12 tokens
    mesh = create_mesh(mesh)
    rules = logical_rules()
    shardings = nn.logical_to_mesh_sharding(models.logical_param_specs(config), mesh, rules)
    params = jax.device_put(params, shardings)
    split = [
        jax.tree_util.keystr(p)
        for p, a in jax.tree_util.tree_leaves_with_path(params)
        if not a.sharding.is_fully_replicated
    ]
    assert any("self_attn" in s for s in split) and any("time_projection" in s for s in split)
    args = [jax.device_put(a, NamedSharding(mesh, P(("data", "fsdp")))) for a in (x, t, context)]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        fn = jax.jit(lambda p, x, t, c: models.build(config).apply({"params": p}, x, t, c))
        hlo = fn.lower(params, *args).compile().as_text()
        out = fn(params, *args)
    if "sequence" in mesh.axis_names:
        assert "collective-permute" in hlo or "all-to-all" in hlo  # attention exchanged tokens
    err = rel_err(out, ref)
    print(f"Wan tiny sharded {dict(mesh.shape)} vs unsharded: max rel err {err:.1e}")
    assert err < 1e-5


def test_bf16_within_tolerance(folders):
    """bf16 compute (fp32 params, norms, softmax, RoPE, modulation and timestep path) vs fp32: < 3e-2 relative."""
    c = run_case("wide", folders)
    (x, t, context), _, want = c["runs"][0]
    got = _apply(c["config"].replace(dtype="bfloat16"), c["params"], x, t, context)
    assert got.dtype == jnp.float32
    err = rel_err(got, want)
    print(f"Wan wide bf16 vs fp32: max rel err {err:.1e}")
    assert 0 < err < 3e-2


# ---- presets -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, count, kw",
    [
        ("Wan2.1-T2V-1.3B", 1_418_996_800, dict(num_attention_heads=12, ffn_dim=8960, num_layers=30)),
        ("Wan2.1-T2V-14B", 14_288_491_584, {}),
    ],
)
def test_preset_parameter_counts_match_diffusers(name, count, kw):
    """FAMILIES.md: 1.419B and 14.289B; diffusers' model of the same config counts exactly the same."""
    from diffusers import WanTransformer3DModel

    config = models.preset(name)
    n = models.count_params(models.abstract_params(config.replace(scan_blocks=True)))
    with torch.device("meta"):
        ref = WanTransformer3DModel(**kw)
    print(f"{name}: {n:,} parameters")
    assert n == count == sum(p.numel() for p in ref.parameters())
    assert wan_convert.diffusers_config(config) | {"_diffusers_version": None} == {
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in ref.config.items() if not k.startswith("_")},
        "_class_name": "WanTransformer3DModel",
        "_diffusers_version": None,
    }


# ---- the family protocol -------------------------------------------------------------------------------------------


def test_family_protocol(folders):
    from diffusers import UniPCMultistepScheduler

    c = run_case("tiny", folders)
    config, params = c["config"], c["params"]
    family = family_of(config)
    (x, t, context), _, _ = c["runs"][0]
    b = x.shape[0]
    assert (family.name, family.display_name, family.task, family.conversion) == (
        "wan",
        "Wan",
        "text-to-video",
        "dit_jax.convert.wan",
    )
    assert family.task in TASKS and family.diffusers_pipelines == {"WanPipeline": {}}
    assert family.text_width(config) == 16 and family.max_sequence_length(config) == 512
    assert family.sampling_for(config) == {"num_inference_steps": 50, "guidance_scale": 5.0}
    sched = UniPCMultistepScheduler.from_config(family.scheduler_config_for(config)).config
    assert (sched.prediction_type, sched.use_flow_sigmas, sched.flow_shift, sched.solver_order) == (
        "flow_prediction",
        True,
        3.0,
        2,
    )
    (slot,) = family.text_slots(config)
    assert (slot.name, slot.encoder, slot.tokenizer, slot.max_length, slot.use_mask) == (
        "t5",
        "text_encoder",
        "tokenizer",
        512,
        True,
    )

    # text: WanPipeline keeps each prompt's first mask.sum() states and pads with zeros
    rs = np.random.RandomState(0)
    hidden = rs.randn(3, 10, 16).astype(np.float32)
    mask = (np.arange(10)[None] < np.array([[4], [10], [1]])).astype(np.int32)
    want = np.stack([np.concatenate([u[:n], np.zeros((10 - n, 16), np.float32)]) for u, n in zip(hidden, [4, 10, 1])])
    cond = family.text_condition(config, {"t5": {"hidden": hidden, "mask": mask}})
    np.testing.assert_array_equal(cond["context"], want)

    batch = {"x": x, "context": context}
    cond = family.condition(config, batch)
    assert list(cond) == ["context"] and cond["context"] is context

    class Recorder:  # samplers and losses give t = σ·1000, which is what the model takes
        def apply(self, variables, *args):
            self.call = (variables, args)
            return "out"

    module = Recorder()
    assert family.apply(module, params, x, t, cond) == "out"
    assert module.call[0]["params"] is params and all(a is b for a, b in zip(module.call[1], (x, t, context)))

    drop = np.arange(b) % 2 == 0
    dropped = np.asarray(family.drop_condition(config, cond, drop)["context"])
    assert not dropped[drop].any()
    np.testing.assert_array_equal(dropped[~drop], context[~drop])
    c_, null = family.guidance_conditions(config, cond)
    np.testing.assert_array_equal(c_["context"], context)
    assert sorted(null) == ["context"] and not np.asarray(null["context"]).any()
    assert family.condition_specs(config, 3)["context"].shape == (3, 512, 16)
    grid, n, rows = family.grid_condition(config, {"per_class": 1, "num_classes": 4}, batch)
    assert (n, rows) == (4, 2) and grid["context"] is context
    assert family.forward_flops(config, 8, 8, frames=4) > family.forward_flops(config, 8, 8, frames=2) > 0
    # LoRA's default targets: q, k, v, o of both attentions in every block
    paths = list(models.registry.param_shapes(params))
    hits = [k for k in paths if any(re.search(r, k) for r in family.lora_targets(config))]
    assert len(hits) == 8 * config.depth and all(k.endswith("/kernel") and "attn/" in k for k in hits)


def test_flow_training_loss_on_video_latents(folders):
    """The shared training objective (condition dropout through the family, flow loss) takes (B, F, H, W, C) latents
    unchanged."""
    from dit_jax.train.objectives import conditioned_model_fn, make_loss_fn, make_schedule

    c = run_case("tiny", folders)
    config, params = models.set_scan(c["config"], c["params"], True)
    model = models.build(config)
    (x, _, context), _, _ = c["runs"][1]
    batch = {"x": jnp.asarray(x), "context": jnp.asarray(context)}
    loss_fn = make_loss_fn("flow", {}, make_schedule("flow", {}, config), config.patch_size)

    def loss(p, batch):
        fn = conditioned_model_fn(model, config, p, batch, jnp.arange(4) < 2, objective="flow")
        return loss_fn(fn, batch["x"], jax.random.split(jax.random.key(0), 4))

    per_example, aux = jax.jit(loss)(params, batch)
    assert per_example.shape == (4,) and np.isfinite(np.asarray(per_example)).all()
    assert aux["sigmas"].shape == (4,)


def test_forward_flops_against_xla():
    """The analytic count against XLA's cost analysis of the unscanned forward (elementwise ops make XLA's larger)."""
    config = WanConfig(hidden_size=256, num_heads=2, depth=1, ffn_dim=512, text_dim=64, freq_dim=64, in_channels=4)
    # XLA counts the attention it runs itself, not the CPU kernel's custom call
    config = config.replace(out_channels=4, attention_backend="xla")
    shapes = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nn.meta.unbox(models.abstract_params(config))
    )
    args = (np.zeros((1, 3, 16, 16, 4), np.float32), np.zeros(1, np.float32), np.zeros((1, 32, 64), np.float32))
    fn = lambda p, x, t, c: models.build(config).apply({"params": p}, x, t, c)  # noqa: E731
    xla = jax.jit(fn).lower(shapes, *args).cost_analysis()["flops"]
    ours = family_of(config).forward_flops(config, 16, 16, 32, frames=3)
    print(f"Wan forward FLOPs: analytic {ours:,}, XLA {xla:,.0f} (ratio {ours / xla:.3f})")
    assert 0.85 < ours / xla <= 1.0


# ---- configs and errors --------------------------------------------------------------------------------------------


def test_config_json_round_trip_and_validation():
    config = models.preset("Wan2.1-T2V-1.3B").replace(dtype="bfloat16", scan_blocks=True)
    assert (config.hidden_size, config.num_heads, config.depth, config.ffn_dim, config.head_dim) == (
        1536,
        12,
        30,
        8960,
        128,
    )
    back = models.config_from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config and back.learn_sigma is False and back.family == "wan"
    for changes, match in [
        (dict(num_heads=7), "hidden_size=5120 .*multiple of num_heads=7"),
        (dict(hidden_size=40, num_heads=10), "num_heads=10 .*even and ≥ 6"),
        (dict(patch_size_t=2), "input_frames=21 .*multiple of patch_size_t=2"),
        (dict(input_size=61), "input_size=61"),
        (dict(freq_dim=255), "freq_dim=255"),
        (dict(ffn_dim=0), "ffn_dim=0"),
        (dict(eps=0.0), "eps=0.0"),
    ]:
        with pytest.raises(ValueError, match=match):
            WanConfig(**changes)


def _trace(config, *args):
    return jax.eval_shape(lambda: models.build(config).init(jax.random.key(0), *args))


def test_error_paths():
    config = WanConfig(hidden_size=24, num_heads=2, depth=1, ffn_dim=8, text_dim=8, freq_dim=8, in_channels=4)
    config = config.replace(input_size=4, input_frames=2, out_channels=4, patch_size_t=2, rope_max_seq_len=4)
    x, t, c = np.zeros((2, 4, 4, 6, 4)), np.zeros(2), np.zeros((2, 3, 8))
    _trace(config, x, t, c)
    with pytest.raises(ValueError, match=r"\(B, F, H, W, 4\) channels-last video, got \(2, 4, 6, 4\)"):
        _trace(config, x[:, 0], t, c)
    with pytest.raises(ValueError, match=r"3 frames × 4x6 do not split into \(2, 2, 2\) patches"):
        _trace(config, x[:, :3], t, c)
    with pytest.raises(ValueError, match="exceeds rope_max_seq_len=4"):
        _trace(config, np.zeros((1, 2, 4, 10, 4)), t[:1], c[:1])
    with pytest.raises(ValueError, match=r"context must be \(B=2, L, 8\)"):
        _trace(config, x, t, c[..., :7])


def test_conversion_errors(folders):
    c = run_case("tiny", folders)
    orig = original_from_diffusers(c["sd"])
    assert convert.detect(orig) == ("wan", "original")
    bad = dict(orig)
    bad["blocks.1.cross_attn.k.weight"] = bad["blocks.1.cross_attn.k.weight"][:, :-1]
    bad["blocks.0.modulation"] = bad["blocks.0.modulation"][:, :5]
    del bad["blocks.0.self_attn.norm_k.weight"]
    bad["blocks.0.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(convert.ConversionError) as e:
        convert.from_state_dict(bad, num_heads=2, source="wan-bad.safetensors")
    msg = str(e.value)
    assert msg.startswith("wan-bad.safetensors does not match the model")
    assert "blocks.0.self_attn.norm_k.weight" in msg and "blocks.0.extra.weight (3,)" in msg
    assert "blocks.1.cross_attn.k.weight: expected (24, 24), found (24, 23)" in msg
    assert "blocks.0.modulation: expected (1, 6, 24), found (1, 5, 24)" in msg

    i2v = dict(orig, **{"img_emb.proj.0.weight": np.ones(4, np.float32)})
    with pytest.raises(convert.ConversionError, match="image-to-video .*img_emb.proj.0.weight"):
        convert.from_state_dict(i2v, num_heads=2)
    cfg = dict(TINY, _class_name="WanTransformer3DModel")
    with pytest.raises(convert.ConversionError, match="image_dim=1280: an image-to-video"):
        convert.from_state_dict(c["sd"], diffusers_config=dict(cfg, image_dim=1280))
    with pytest.raises(convert.ConversionError, match=r"patch_size=\[1, 2, 3\]"):
        convert.from_state_dict(c["sd"], diffusers_config=dict(cfg, patch_size=[1, 2, 3]))
    with pytest.raises(convert.ConversionError, match="format='original' was requested"):
        convert.from_state_dict(c["sd"], format="original", num_heads=2)

    config, params = c["config"], c["params"]
    with pytest.raises(convert.ConversionError, match="q/k RMSNorms .*theta 10000"):
        convert.to_torch(dataclasses.replace(config, qk_norm=False, theta=500.0), params, format="diffusers")
    # without q/k norms the original format holds the model (WanModel(qk_norm=False)): round trip without them
    no_norm = dataclasses.replace(config, qk_norm=False)
    stripped = jax.tree_util.tree_map(lambda a: a, params)
    for i in range(config.depth):
        for part in ("self_attn", "cross_attn"):
            stripped[f"blocks_{i}"][part] = {k: v for k, v in params[f"blocks_{i}"][part].items() if "norm" not in k}
    with pytest.warns(UserWarning):
        sd = convert.to_torch(no_norm, stripped, format="original")
    assert not any("norm_q" in k for k in sd)
    config_n, _ = convert.from_state_dict(sd, num_heads=2)
    assert config_n.qk_norm is False
