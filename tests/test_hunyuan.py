"""Hunyuan-DiT: 2-D RoPE in both conventions, parity with diffusers ``HunyuanDiT2DModel`` in the diffusers and the
original (Tencent ``hydit``) formats, checkpoint files (bare, DeepSpeed ``ema``/``module``), scan/remat/bf16/sharded
execution, a train step, exact preset sizes, the family protocol and error paths.

Parity criterion: max abs error ≤ 1e-5 · max(1, max|reference|), fp32 on CPU, every parameter re-randomised. The
references get RoPE as their samplers build it at non-square sizes (where the conventions differ): diffusers the
``HunyuanDiTPipeline`` way; the original the ``hydit`` way, computed by ``original_rope`` below from MODELS.md §5.1/5.4
and fed to the diffusers model (which equals the original model given the same RoPE tensors, MODELS.md §0).
"""

import dataclasses
import inspect
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from parity import assert_bit_exact, check_parity, randomize_, rel_err, state_dict_numpy, state_dict_torch

from dit_jax import convert, diffusion, models
from dit_jax.convert import hunyuan as hunyuan_convert
from dit_jax.models.hunyuan import HunyuanConfig, crop_region, rope_tables
from dit_jax.parallel import logical_rules

# FAMILIES.md tiny config (6 layers: blocks 4, 5 take the skips of blocks 1, 0); with and without style/size
# conditions; a wider one with the real head_dim 88 (RoPE 44 + 44), 4 layers.
TINY = dict(
    num_attention_heads=2,
    attention_head_dim=8,
    hidden_size=16,
    in_channels=4,
    patch_size=2,
    num_layers=6,
    cross_attention_dim=24,
    cross_attention_dim_t5=32,
    pooled_projection_dim=12,
    text_len=6,
    text_len_t5=7,
    sample_size=16,
    use_style_cond_and_image_meta_size=False,
)
WIDE = dict(TINY, num_attention_heads=2, attention_head_dim=88, hidden_size=176, num_layers=4)
WIDE.update(cross_attention_dim=40, cross_attention_dim_t5=48, pooled_projection_dim=20, text_len=5, text_len_t5=9)
CASES = {
    # name: (diffusers config, batch, latent H, W): non-square grids, whose RoPE crop starts off 0
    "tiny": (TINY, 4, 16, 24),
    "tiny-style": (dict(TINY, use_style_cond_and_image_meta_size=True), 2, 20, 12),
    "wide-style": (dict(WIDE, use_style_cond_and_image_meta_size=True), 2, 12, 20),
}
# Cases whose original-format import also runs forward (each run compiles the model once more; the rest checks the
# original format's keys, config and round trip, and the two imports differ only in the RoPE convention).
ORIGINAL_RUNS = ("wide-style",)


@pytest.fixture(autouse=True)
def _fast_compile():
    """Tiny models: XLA's expensive CPU passes would dominate the test time."""
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


def diffusers_hunyuan(cfg: dict, seed: int):
    from diffusers import HunyuanDiT2DModel

    torch.manual_seed(seed)
    return randomize_(HunyuanDiT2DModel(**cfg).eval(), seed)


def make_inputs(cfg: dict, batch: int, height: int, width: int, seed: int = 0) -> dict:
    """NHWC latents, float DDPM timesteps, CLIP/mT5 features with partly padded masks, and (style models) the
    pipeline's image_meta_size and style 0."""
    rs = np.random.RandomState(seed)
    inputs = {
        "x": rs.randn(batch, height, width, cfg["in_channels"]).astype(np.float32),
        "t": rs.uniform(1, 999, batch).astype(np.float32),
        "clip": rs.randn(batch, cfg["text_len"], cfg["cross_attention_dim"]).astype(np.float32),
        "clip_mask": (np.arange(cfg["text_len"]) < np.arange(batch)[:, None] + 3).astype(np.int64),
        "t5": rs.randn(batch, cfg["text_len_t5"], cfg["cross_attention_dim_t5"]).astype(np.float32),
        "t5_mask": (np.arange(cfg["text_len_t5"]) < 5 - np.arange(batch)[:, None]).astype(np.int64),
    }
    if cfg["use_style_cond_and_image_meta_size"]:
        inputs["image_meta_size"] = np.tile(np.float32([[1024, 1024, 8 * height, 8 * width, 0, 0]]), (batch, 1))
        inputs["style"] = np.zeros(batch, np.int64)
    return inputs


def diffusers_rope(head_dim: int, h: int, w: int):
    """RoPE as HunyuanDiTPipeline builds it (base grid of 512 px: 32 tokens at patch 2)."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

    return get_2d_rotary_pos_embed(head_dim, get_resize_crop_region_for_grid((h, w), 32), (h, w))


def original_rope(head_dim: int, h: int, w: int):
    """The original's RoPE (``hydit`` ``calc_rope``) from MODELS.md §5.1/5.4: crop region of the 32-token base grid,
    positions ``np.linspace(start, stop, n, endpoint=False)``, ``meshgrid(w, h)``; the first half of head_dim encodes
    the w grid, the second the h grid, each ``theta=10000`` over dim/2 with cos/sin ``repeat_interleave(2)``."""
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

    (top, left), (bottom, right) = get_resize_crop_region_for_grid((h, w), 32)
    grid_h = np.linspace(top, bottom, h, endpoint=False, dtype=np.float32)
    grid_w = np.linspace(left, right, w, endpoint=False, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # w first: grid[0] holds the w positions
    dim = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    parts = []
    for g in grid:
        angle = torch.outer(torch.from_numpy(g.reshape(-1)), freqs).float()
        parts.append((angle.cos().repeat_interleave(2, dim=1), angle.sin().repeat_interleave(2, dim=1)))
    return torch.cat([parts[0][0], parts[1][0]], dim=1), torch.cat([parts[0][1], parts[1][1]], dim=1)


def run_diffusers(m, inputs: dict, rope) -> np.ndarray:
    kw = {}
    if "style" in inputs:
        kw = dict(image_meta_size=torch.from_numpy(inputs["image_meta_size"]), style=torch.from_numpy(inputs["style"]))
    with torch.no_grad():
        out = m(
            torch.from_numpy(np.ascontiguousarray(inputs["x"].transpose(0, 3, 1, 2))),
            torch.from_numpy(inputs["t"]),
            encoder_hidden_states=torch.from_numpy(inputs["clip"]),
            text_embedding_mask=torch.from_numpy(inputs["clip_mask"]),
            encoder_hidden_states_t5=torch.from_numpy(inputs["t5"]),
            text_embedding_mask_t5=torch.from_numpy(inputs["t5_mask"]),
            image_rotary_emb=rope,
            return_dict=False,
            **kw,
        )[0]
    return out.numpy().transpose(0, 2, 3, 1)


def _forward(config, params, inputs):
    return models.build(config).apply(
        {"params": params},
        inputs["x"],
        inputs["t"],
        inputs["clip"],
        inputs["clip_mask"],
        inputs["t5"],
        inputs["t5_mask"],
        inputs.get("image_meta_size"),
        inputs.get("style"),
    )


_apply = jax.jit(_forward, static_argnums=0)


def original_from_diffusers(sd: dict, depth: int) -> dict:
    """MODELS.md §5.3 mapping backwards (diffusers → hydit keys), written independently of dit_jax.convert."""
    o = {}

    def copy(dst, src):
        for w in ("weight", "bias"):
            if f"{src}.{w}" in sd:
                o[f"{dst}.{w}"] = sd[f"{src}.{w}"]

    def cat(dst, srcs):
        for w in ("weight", "bias"):
            o[f"{dst}.{w}"] = np.concatenate([sd[f"{s}.{w}"] for s in srcs], 0)

    copy("x_embedder.proj", "pos_embed.proj")
    copy("t_embedder.mlp.0", "time_extra_emb.timestep_embedder.linear_1")
    copy("t_embedder.mlp.2", "time_extra_emb.timestep_embedder.linear_2")
    copy("mlp_t5.0", "text_embedder.linear_1")
    copy("mlp_t5.2", "text_embedder.linear_2")
    copy("extra_embedder.0", "time_extra_emb.extra_embedder.linear_1")
    copy("extra_embedder.2", "time_extra_emb.extra_embedder.linear_2")
    for k, v in sd.items():
        if k.startswith("time_extra_emb.pooler.") or k == "time_extra_emb.style_embedder.weight":
            o[k[len("time_extra_emb.") :]] = v
    o["text_embedding_padding"] = sd["text_embedding_padding"]
    for i in range(depth):
        b = f"blocks.{i}"
        copy(f"{b}.norm1", f"{b}.norm1.norm")
        copy(f"{b}.default_modulation.1", f"{b}.norm1.linear")
        cat(f"{b}.attn1.Wqkv", [f"{b}.attn1.to_{c}" for c in "qkv"])
        copy(f"{b}.attn2.q_proj", f"{b}.attn2.to_q")
        cat(f"{b}.attn2.kv_proj", [f"{b}.attn2.to_k", f"{b}.attn2.to_v"])
        for a in ("attn1", "attn2"):
            copy(f"{b}.{a}.q_norm", f"{b}.{a}.norm_q")
            copy(f"{b}.{a}.k_norm", f"{b}.{a}.norm_k")
            copy(f"{b}.{a}.out_proj", f"{b}.{a}.to_out.0")
        copy(f"{b}.norm3", f"{b}.norm2")  # the pre-cross-attention norm
        copy(f"{b}.norm2", f"{b}.norm3")  # the pre-FFN norm
        copy(f"{b}.mlp.fc1", f"{b}.ff.net.0.proj")
        copy(f"{b}.mlp.fc2", f"{b}.ff.net.2")
        copy(f"{b}.skip_norm", f"{b}.skip_norm")
        copy(f"{b}.skip_linear", f"{b}.skip_linear")
    for w in ("weight", "bias"):  # diffusers' norm_out stores (scale, shift); hydit (shift, scale)
        scale, shift = np.split(sd[f"norm_out.linear.{w}"], 2, axis=0)
        o[f"final_layer.adaLN_modulation.1.{w}"] = np.concatenate([shift, scale], 0)
    copy("final_layer.linear", "proj_out")
    assert sum(v.size for v in o.values()) == sum(v.size for v in sd.values())
    return o


_RUNS: dict[str, dict] = {}


def run_case(name: str) -> dict:
    """One diffusers model, both imports, inputs and outputs (the original format's in ``ORIGINAL_RUNS``); built
    once."""
    if name not in _RUNS:
        cfg, batch, height, width = CASES[name]
        m = diffusers_hunyuan(cfg, seed=len(name))
        sd = state_dict_numpy(m)
        config, params = convert.from_state_dict(sd, diffusers_config=dict(cfg, _class_name="HunyuanDiT2DModel"))
        orig = original_from_diffusers(sd, cfg["num_layers"])
        config_o, params_o = convert.from_state_dict(orig)
        inputs = make_inputs(cfg, batch, height, width, seed=len(name))
        head_dim, h, w = cfg["attention_head_dim"], height // 2, width // 2
        _RUNS[name] = dict(
            cfg=cfg,
            sd=sd,
            orig=orig,
            config=config,
            params=params,
            config_o=config_o,
            params_o=params_o,
            inputs=inputs,
            want=run_diffusers(m, inputs, diffusers_rope(head_dim, h, w)),
            got=np.asarray(_apply(config, params, inputs)),
        )
        if name in ORIGINAL_RUNS:
            _RUNS[name]["want_o"] = run_diffusers(m, inputs, original_rope(head_dim, h, w))
            _RUNS[name]["got_o"] = np.asarray(_apply(config_o, params_o, inputs))
    return _RUNS[name]


# ---- RoPE -------------------------------------------------------------------------------------------------------


def test_rope_tables_match_both_references():
    """Our tables against diffusers' pipeline RoPE and the original's (cos/sin repeat-interleaved: ours hold every
    other column); the conventions' gap at MODELS.md §5.4's sizes (head_dim 88)."""
    for head_dim, h, w in [(88, 48, 80), (88, 64, 48), (88, 64, 64), (8, 8, 12), (16, 5, 3)]:
        for convention, ref in (("diffusers", diffusers_rope), ("original", original_rope)):
            cos, sin = rope_tables(h, w, head_dim, 2, "base512", convention)
            want_cos, want_sin = (t.numpy() for t in ref(head_dim, h, w))
            assert cos.shape == (h * w, head_dim // 2)
            np.testing.assert_allclose(cos, want_cos[:, ::2], atol=3e-6, rtol=0)  # frequencies: 1 ulp
            np.testing.assert_allclose(sin, want_sin[:, 1::2], atol=3e-6, rtol=0)
    gaps = {}
    for px_h, px_w in [(768, 1280), (768, 1024), (1024, 1024)]:
        h, w = px_h // 16, px_w // 16
        a, b = (rope_tables(h, w, 88, 2, "base512", c)[0] for c in ("original", "diffusers"))
        gaps[(px_w, px_h)] = float(np.abs(a - b).max())
    print(f"RoPE original vs diffusers, max |Δcos|: {gaps}")
    assert abs(gaps[(1280, 768)] - 0.117) < 5e-4 and abs(gaps[(1024, 768)] - 0.079) < 5e-4
    assert gaps[(1024, 1024)] == 0.0
    # 1024² → 64 × 64 tokens on the 32-token base: step 0.5; "extend" keeps integer positions
    assert crop_region(64, 64, 32) == ((0, 0), (32, 32)) and crop_region(48, 80, 32) == ((6, 0), (25, 32))
    cos, _ = rope_tables(64, 64, 8, 2, "base512", "original")
    np.testing.assert_allclose(np.arccos(np.clip(cos[1, 0], -1, 1)), 0.5, atol=1e-6)  # column 1, frequency 1
    cos, _ = rope_tables(4, 6, 8, 2, "extend", "original")
    np.testing.assert_allclose(cos[8, [0, 2]], np.cos([2.0, 1.0]), atol=1e-7)  # token 8: row 1, column 2


# ---- parity with diffusers: both formats, round trips -------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_parity_both_formats_and_round_trips(name):
    c = run_case(name)
    config, config_o, cfg = c["config"], c["config_o"], c["cfg"]
    assert config.rope_convention == "diffusers" and config_o.rope_convention == "original"
    assert dataclasses.replace(config_o, rope_convention="diffusers", input_size=config.input_size) == config
    assert config.use_style_cond_and_image_meta_size == cfg["use_style_cond_and_image_meta_size"]
    assert config.head_dim == cfg["attention_head_dim"] and config.out_channels == 8
    x = c["inputs"]["x"]
    size = f"{x.shape[1]}x{x.shape[2]}, batch {x.shape[0]}"
    check_parity(f"Hunyuan-DiT {name} diffusers ({size})", c["got"], c["want"])
    if name in ORIGINAL_RUNS:
        check_parity(f"Hunyuan-DiT {name} original ({size})", c["got_o"], c["want_o"])
        # the conventions differ at this size, so each check above tells them apart
        assert rel_err(c["want"], c["want_o"]) > 1e-3
    assert_bit_exact(convert.to_torch(config, c["params"], format="diffusers"), c["sd"])
    assert_bit_exact(convert.to_torch(config_o, c["params_o"], format="original"), c["orig"])
    if name == "tiny":  # diffusers keys without config.json: inferred from the shapes
        config_k, params_k = convert.from_state_dict(c["sd"])
        assert dataclasses.replace(config_k, input_size=config.input_size) == config
        with pytest.warns(UserWarning, match="samples the RoPE base grid the original way"):
            assert_bit_exact(convert.to_torch(config_k, params_k, format="original"), c["orig"])


def test_checkpoint_files_and_folders(tmp_path):
    """Bare hydit ``.pt``, DeepSpeed ``{"ema", "module"}`` model states, a diffusers folder both ways."""
    from diffusers import HunyuanDiT2DModel

    c = run_case("tiny-style")
    orig, other = c["orig"], {k: v + 1 for k, v in c["orig"].items()}
    torch.save(state_dict_torch(orig), tmp_path / "pytorch_model_ema.pt")
    config, params = convert.from_torch(tmp_path / "pytorch_model_ema.pt")
    assert config == c["config_o"]
    assert_bit_exact(convert.to_torch(config, params, format="original"), orig)
    states = {"ema": state_dict_torch(orig), "module": state_dict_torch(other), "global_steps": 7, "dp_world_size": 8}
    torch.save(states, tmp_path / "mp_rank_00_model_states.pt")
    _, ema = convert.from_torch(tmp_path / "mp_rank_00_model_states.pt")
    _, module = convert.from_torch(tmp_path / "mp_rank_00_model_states.pt", weights="model")
    assert_bit_exact(convert.to_torch(config, ema, format="original"), orig)
    assert_bit_exact(convert.to_torch(config, module, format="original"), other)
    torch.save({"module": state_dict_torch(other), "global_steps": 7}, tmp_path / "no_ema_model_states.pt")
    with pytest.raises(convert.ConversionError, match="weights='ema' requested but .* no 'ema' entry"):
        convert.from_torch(tmp_path / "no_ema_model_states.pt")
    _, module = convert.from_torch(tmp_path / "no_ema_model_states.pt", weights="model")
    assert_bit_exact(convert.to_torch(config, module, format="original"), other)

    # diffusers folder: config.json written out in full, loadable by diffusers, weights bit-exact
    with pytest.warns(UserWarning, match="samples the RoPE base grid the diffusers way"):
        folder = convert.save_torch(tmp_path / "diffusers", config, params, format="diffusers")
    m = HunyuanDiT2DModel.from_pretrained(folder).eval()
    assert_bit_exact(state_dict_numpy(m), c["sd"])
    written = json.loads((folder / "config.json").read_text())
    assert {k: v for k, v in m.config.items() if not k.startswith("_")} == {
        k: v for k, v in written.items() if not k.startswith("_")
    }
    config_f, _ = convert.from_torch(folder)
    assert config_f == dataclasses.replace(c["config"], input_size=config.input_size)


# ---- execution: scan, remat, sharding, bf16 training ----------------------------------------------------------------


def test_scanned_remat_sharded_equals_loop():
    """Scanned stages (saving, middle, skip-taking) with remat, params over a (data=2, fsdp=2, tensor=2) mesh of the
    8 test devices and the batch split over data × fsdp, against the unsharded loop."""
    c = run_case("tiny")
    config, params = models.set_scan(c["config"].replace(remat="dots"), c["params"], True)
    assert sorted(k for k in params if k.startswith("stage_")) == ["stage_0", "stage_1", "stage_2"]
    assert params["stage_0"]["attn1"]["qkv"]["kernel"].shape == (2, 16, 3, 2, 8)  # blocks 0, 1
    assert "skip_linear" in params["stage_2"] and "skip_linear" not in params["stage_1"]
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    rules = logical_rules()
    shardings = nn.logical_to_mesh_sharding(models.logical_param_specs(config), mesh, rules)
    params = jax.device_put(params, shardings)
    split = [
        jax.tree_util.keystr(p)
        for p, x in jax.tree_util.tree_leaves_with_path(params)
        if not x.sharding.is_fully_replicated
    ]
    assert any("attn1" in s for s in split) and any("skip_linear" in s for s in split)
    inputs = {k: jax.device_put(v, NamedSharding(mesh, P(("data", "fsdp")))) for k, v in c["inputs"].items()}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out = jax.jit(lambda p, i: _forward(config, p, i))(params, inputs)
    err = rel_err(out, c["got"])
    print(f"Hunyuan-DiT scan + remat + sharded vs loop: max rel err {err:.1e}")
    assert err < 1e-5


def test_train_step_bf16_through_the_trainer():
    """Two steps of the generic train step (``dit_jax.train``: condition dropout, DDPM v-prediction loss with learned
    sigma, AdamW, EMA) on a tiny v1.1 model in bf16 compute with scanned blocks over 8 devices; the batch carries no
    size conditions (the family's defaults fill them). Two blocks (no long skips: those are covered forward by
    ``test_scanned_remat_sharded_equals_loop``), since compiling the step is this file's slowest part by far."""
    from dit_jax.parallel.mesh import batch_sharding, create_mesh, global_batch
    from dit_jax.train.objectives import cond_dropout_prob, make_loss_fn, make_schedule
    from dit_jax.train.optimizers import create_optimizer
    from dit_jax.train.state import create_train_state, state_shardings
    from dit_jax.train.steps import StepConfig, make_train_step

    model = models.preset(
        "HunyuanDiT-v1.1",
        depth=2,
        hidden_size=32,
        num_heads=2,
        mlp_ratio=2.0,
        text_dim=16,
        text_dim_t5=16,
        pooled_dim=8,
        text_len=3,
        text_len_t5=4,
        input_size=8,
        dtype="bfloat16",
        scan_blocks=True,
    )
    family = models.family_of(model)
    options = dict(family.scheduler_config_for(model), prediction="v_prediction")
    options = {k: options[k] for k in ("beta_schedule", "beta_start", "beta_end", "prediction")}
    schedule = make_schedule("ddpm", options, model)
    assert schedule.learned_sigma and schedule.prediction == "v_prediction"
    tx, lr = create_optimizer(dict(name="adamw", lr=1e-3), 10)
    step_config = StepConfig(
        model_config=model,
        loss_fn=make_loss_fn("ddpm", options, schedule, model.patch_size),
        tx=tx,
        lr_schedule=lr,
        objective="ddpm",
        ema_decay=0.9,
        cond_dropout_prob=cond_dropout_prob(None, model),
    )
    assert step_config.cond_dropout_prob == 0.2
    rng = np.random.default_rng(0)
    batches = [
        {
            "x": rng.normal(size=(8, 8, 8, 4)).astype(np.float32),
            "clip": rng.normal(size=(8, 3, 16)).astype(np.float32),
            "clip_mask": (rng.uniform(size=(8, 3)) < 0.7).astype(np.int32),
            "t5": rng.normal(size=(8, 4, 16)).astype(np.float32),
            "t5_mask": (rng.uniform(size=(8, 4)) < 0.7).astype(np.int32),
        }
        for _ in range(2)
    ]
    mesh = create_mesh(dict(data=2, fsdp=2, tensor=2))
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules()):
        _, shardings = state_shardings(model, tx, mesh)
        state = create_train_state(model, tx, shardings, seed=0)
        first = jax.device_get(state.params)
        batch_sh = {k: batch_sharding(mesh, v.ndim) for k, v in batches[0].items()}
        step = jax.jit(
            make_train_step(step_config),
            in_shardings=(shardings, batch_sh),
            out_shardings=(shardings, NamedSharding(mesh, P())),
            donate_argnums=0,
        )
        losses = []
        for b in batches:
            state, metrics = step(state, global_batch(b, mesh))
            losses.append(float(metrics["loss"]))
            assert np.isfinite(float(metrics["grad_norm"]))
    params = jax.device_get(state.params)
    print(f"Hunyuan-DiT bf16 train steps: losses {losses}")
    assert all(np.isfinite(losses)) and losses[0] != losses[1] and int(state.step) == 2
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
    moved = {
        jax.tree_util.keystr(path): not np.array_equal(a, b)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(first), jax.tree.leaves(params))
    }
    # The zero-initialised output layer passes gradients on from the second step, the zero-initialised modulations
    # (the only path of the conditioning vector) from the third: after two steps everything but the conditioning
    # embedders (t_embedder, pooler, extra_embedder, style_embedder) has moved.
    still = sorted({k.split("]")[0][2:-1] for k, v in moved.items() if not v})
    assert still == ["extra_embedder", "pooler", "style_embedder", "t_embedder"], still


# ---- presets -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, style, count", [("HunyuanDiT-v1.1", True, 1.517e9), ("HunyuanDiT-v1.2", False, 1.500e9)]
)
def test_preset_parameter_counts_match_diffusers(name, style, count):
    """FAMILIES.md's counts, and exactly diffusers' ``HunyuanDiT2DModel`` of the released config."""
    from diffusers import HunyuanDiT2DModel

    config = models.preset(name)
    assert (config.depth, config.hidden_size, config.num_heads, config.head_dim, config.mlp_hidden) == (
        40,
        1408,
        16,
        88,
        6144,
    )
    n = models.count_params(models.abstract_params(config.replace(scan_blocks=True)))
    with torch.device("meta"):
        ref = HunyuanDiT2DModel(**hunyuan_convert.diffusers_config(config))
    print(f"{name}: {n:,} parameters")
    assert n == sum(p.numel() for p in ref.parameters()) and round(n / 1e9, 3) == count / 1e9


# ---- the family protocol -------------------------------------------------------------------------------------------


def test_family_protocol():
    from diffusers import DDPMScheduler, HunyuanDiTPipeline

    c = run_case("tiny-style")
    config, params, inputs = c["config"], c["params"], c["inputs"]
    v12 = config.replace(use_style_cond_and_image_meta_size=False)
    family = models.family_of(config)
    assert (family.name, family.display_name, family.task, family.conversion) == (
        "hunyuan",
        "Hunyuan-DiT",
        "text-to-image",
        "dit_jax.convert.hunyuan",
    )
    defaults = inspect.signature(HunyuanDiTPipeline.__call__).parameters
    assert family.sampling == {k: defaults[k].default for k in ("num_inference_steps", "guidance_scale")}
    assert family.diffusers_pipelines == {"HunyuanDiTPipeline": {}}
    assert family.dropout_prob(config) == 0.2 and family.text_width(config) == 24
    assert family.max_sequence_length(config) == 7 and family.learned_null_length(config) is None
    assert family.scheduler_config == family.scheduler_config_for(config)
    for cfg, beta_end in ((config, 0.03), (v12, 0.02)):
        sc = family.scheduler_config_for(cfg)
        schedule, method, options = diffusion.from_diffusers_scheduler_config(sc)
        assert method == "ddpm" and schedule.prediction == "v_prediction" and schedule.beta_end == beta_end
        assert (options["timestep_spacing"], options["steps_offset"], options["clip_sample"]) == ("leading", 1, False)
        ref = DDPMScheduler.from_config(sc)
        np.testing.assert_allclose(schedule.betas, ref.betas.numpy(), rtol=1e-6)
        assert ref.config.prediction_type == "v_prediction" and ref.config.timestep_spacing == "leading"

    text = {k: inputs[k] for k in ("clip", "clip_mask", "t5", "t5_mask")}
    batch = {"x": inputs["x"], **text}
    cond = family.condition(config, batch)  # no size conditions in the batch: the latent's own size, style 0
    np.testing.assert_array_equal(cond["image_meta_size"], [[160, 96, 160, 96, 0, 0]] * 2)  # 20 × 12 latents
    np.testing.assert_array_equal(cond["style"], [0, 0])
    sizes = {"image_meta_size": inputs["image_meta_size"], "style": inputs["style"]}
    cond = family.condition(config, {**batch, **sizes})
    assert sorted(cond) == ["clip", "clip_mask", "image_meta_size", "style", "t5", "t5_mask"]
    assert sorted(family.condition(v12, batch)) == ["clip", "clip_mask", "t5", "t5_mask"]

    class Recorder:
        def apply(self, variables, *args, **kwargs):
            self.call = (variables, args, kwargs)
            return "out"

    module = Recorder()
    assert family.apply(module, params, inputs["x"], inputs["t"], cond) == "out"
    variables, args, kwargs = module.call
    assert variables["params"] is params and not kwargs
    order = ("x", "t", "clip", "clip_mask", "t5", "t5_mask", "image_meta_size", "style")
    assert all(a is inputs[k] for a, k in zip(args, order))

    drop = np.array([True, False])
    dropped = family.drop_condition(config, cond, drop)
    for k in text:
        assert not np.asarray(dropped[k])[0].any()
        np.testing.assert_array_equal(dropped[k][1], cond[k][1])
    assert dropped["image_meta_size"] is cond["image_meta_size"]
    cond_g, null = family.guidance_conditions(config, cond)
    assert sorted(null) == sorted(cond_g) and not any(np.asarray(null[k]).any() for k in text)
    np.testing.assert_array_equal(null["image_meta_size"], cond["image_meta_size"])
    specs = family.condition_specs(config, 3)
    assert {k: (s.shape, s.dtype) for k, s in specs.items()} == {
        "clip": ((3, 6, 24), jnp.float32),
        "clip_mask": ((3, 6), jnp.int32),
        "t5": ((3, 7, 32), jnp.float32),
        "t5_mask": ((3, 7), jnp.int32),
        "image_meta_size": ((3, 6), jnp.float32),
        "style": ((3,), jnp.int32),
    }
    assert sorted(family.condition_specs(v12, 3)) == ["clip", "clip_mask", "t5", "t5_mask"]
    grid, n, rows = family.grid_condition(config, {"per_class": 1, "num_classes": 4}, {**batch, **sizes})
    assert (n, rows) == (2, 1) and grid["clip"] is inputs["clip"]

    size = family.size_condition(config, 768, 1280, 2)  # HunyuanDiTPipeline: original (1024, 1024) + (h, w) + (0, 0)
    np.testing.assert_array_equal(size["image_meta_size"], [[1024, 1024, 768, 1280, 0, 0]] * 2)
    np.testing.assert_array_equal(size["style"], [0, 0])
    assert family.size_condition(v12, 768, 1280, 2) == {}

    slots = family.text_slots(config)
    assert [(s.name, s.encoder, s.tokenizer, s.prompt, s.max_length, s.use_mask) for s in slots] == [
        ("clip", "text_encoder", "tokenizer", 1, 6, True),
        ("t5", "text_encoder_2", "tokenizer_2", 1, 7, True),
    ]
    feats = {"clip": {"hidden": inputs["clip"], "mask": inputs["clip_mask"]}}
    feats["t5"] = {"hidden": inputs["t5"], "mask": inputs["t5_mask"]}
    assert all(v is inputs[k] for k, v in family.text_condition(config, feats).items())
    assert family.forward_flops(config, 128, 128, 400) > family.forward_flops(config, 128, 128) > 0


def test_forward_flops_against_xla():
    """The analytic count against XLA's cost analysis of the forward (elementwise ops make XLA's larger)."""
    config = HunyuanConfig(
        hidden_size=128,
        num_heads=2,
        depth=4,
        mlp_ratio=4.0,
        text_dim=64,
        text_dim_t5=64,
        pooled_dim=32,
        text_len=8,
        text_len_t5=16,
        input_size=32,
        use_style_cond_and_image_meta_size=True,
        attention_backend="xla",  # XLA counts the attention it runs itself, not the CPU kernel's custom call
    )
    family = models.family_of(config)
    shapes = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nn.meta.unbox(models.abstract_params(config))
    )
    args = config.dummy_inputs(1)
    xla = jax.jit(lambda p, *a: models.build(config).apply({"params": p}, *a)).lower(shapes, *args).cost_analysis()
    ours = family.forward_flops(config, 32, 32)
    print(f"Hunyuan-DiT forward FLOPs: analytic {ours:,}, XLA {xla['flops']:,.0f} (ratio {ours / xla['flops']:.3f})")
    assert 0.85 < ours / xla["flops"] <= 1.0


# ---- configs and errors --------------------------------------------------------------------------------------------


def test_config_json_round_trip_and_validation():
    config = models.preset("HunyuanDiT-v1.1").replace(dtype="bfloat16", rope_convention="diffusers")
    back = models.config_from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config and back.out_channels == 8 and back.extra_in_dim == 1024 + 1536 + 1408
    for changes, match in [
        (dict(depth=5), "depth=5 .*even"),
        (dict(num_heads=12), "hidden_size=1408 .*multiple of num_heads=12"),
        (dict(num_heads=64), r"num_heads=64 .*head_dim .*22\) divisible by 4"),
        (dict(text_dim_t5=2044), "text_dim_t5=2044 .*8 heads"),
        (dict(rope_img="base"), "rope_img='base'"),
        (dict(rope_convention="hydit"), "rope_convention='hydit'"),
        (dict(caption_dropout_prob=1.0), "caption_dropout_prob=1.0"),
        (dict(text_len=0), "text_len=0"),
    ]:
        with pytest.raises(ValueError, match=match):
            HunyuanConfig(**changes)


def _trace(config, *args):
    return jax.eval_shape(lambda: models.build(config).init(jax.random.key(0), *args))


def test_model_input_errors():
    config = HunyuanConfig(
        hidden_size=16, num_heads=2, depth=2, mlp_ratio=2.0, text_dim=8, text_dim_t5=8, pooled_dim=4, text_len=3,
        text_len_t5=5, input_size=8, use_style_cond_and_image_meta_size=True,
    )  # fmt: skip
    args = list(config.dummy_inputs(2))
    _trace(config, *args)
    with pytest.raises(ValueError, match=r"text inputs do not match .*clip \(2, 4, 8\) \(expected \(2, 3, 8\)\)"):
        _trace(config, args[0], args[1], np.zeros((2, 4, 8)), *args[3:])
    with pytest.raises(ValueError, match=r"t5_mask \(2, 4\) \(expected \(2, 5\)\)"):
        _trace(config, *args[:5], np.ones((2, 4)), *args[6:])
    with pytest.raises(ValueError, match="takes style and size conditions .*pass image_meta_size"):
        _trace(config, *args[:6])
    with pytest.raises(ValueError, match=r"image_meta_size must be \(B, 6\)"):
        _trace(config, *args[:6], np.zeros((2, 4)), args[7])
    v12 = config.replace(use_style_cond_and_image_meta_size=False)
    with pytest.raises(ValueError, match="no style or size conditions"):
        _trace(v12, *args)


def test_conversion_errors():
    c = run_case("tiny-style")
    bad = dict(c["orig"])
    bad["blocks.1.attn2.kv_proj.weight"] = bad["blocks.1.attn2.kv_proj.weight"][:-1]
    bad["blocks.5.skip_linear.bias"] = bad["blocks.5.skip_linear.bias"][:-2]
    del bad["blocks.0.attn1.k_norm.weight"]
    del bad["blocks.4.skip_norm.bias"]
    bad["blocks.2.skip_linear.weight"] = np.zeros((16, 32), np.float32)  # only blocks > depth/2 have skips
    with pytest.raises(convert.ConversionError) as e:
        convert.from_state_dict(bad, source="pytorch_model_bad.pt")
    msg = str(e.value)
    assert msg.startswith("pytorch_model_bad.pt does not match the model")
    assert "blocks.0.attn1.k_norm.weight" in msg and "blocks.4.skip_norm.bias" in msg
    assert "blocks.2.skip_linear.weight (16, 32)" in msg
    assert "blocks.1.attn2.kv_proj.weight: expected (32, 24), found (31, 24)" in msg
    assert "blocks.5.skip_linear.bias: expected (16,), found (14,)" in msg
    assert convert.detect(c["sd"]) == ("hunyuan", "diffusers") and convert.detect(c["orig"]) == ("hunyuan", "original")
    with pytest.raises(convert.ConversionError, match="format='original' was requested"):
        convert.from_state_dict(c["sd"], format="original")
    cfg = dict(c["cfg"], _class_name="HunyuanDiT2DModel")
    with pytest.raises(convert.ConversionError, match=r"hidden_size=24 but 2 heads × 8 = 16"):
        convert.from_state_dict(c["sd"], diffusers_config=dict(cfg, hidden_size=24))
    with pytest.raises(convert.ConversionError, match="activation_fn='geglu'"):
        convert.from_state_dict(c["sd"], diffusers_config=dict(cfg, activation_fn="geglu"))
    with pytest.raises(convert.ConversionError, match="does not match the model"):
        convert.from_state_dict(c["sd"], diffusers_config=dict(cfg, use_style_cond_and_image_meta_size=False))
    with pytest.raises(ValueError, match="depth=5 .*even"):  # a checkpoint whose block count breaks the skips
        convert.from_state_dict({k: v for k, v in c["orig"].items() if not k.startswith("blocks.5.")})
    config = c["config_o"]
    with pytest.warns(UserWarning, match=r"512 px base grid, not this model's rope_img='base1024'"):
        convert.to_torch(config.replace(rope_img="base1024"), c["params_o"], format="diffusers")
