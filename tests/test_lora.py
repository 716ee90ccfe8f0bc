"""LoRA (``dit_jax.lora``, ``dit_jax.convert.lora``): merged forward, unmerge, adapter-only training, peft/kohya files.

The reference for loading a peft file is what diffusers computes when it merges one (peft is not installed here):
``W + (lora_alpha / r) · lora_B @ lora_A`` on each torch Linear, compared in the torch layout after our merge and
export (and, for DiT, through diffusers' forward). kohya's is ``W + (alpha / r) · up @ down`` on the original names.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity import check_parity, nchw, nhwc, randomize_normal_

from dit_jax import convert, lora, models
from dit_jax.convert import lora as lora_files
from dit_jax.nn.layers import dense

R = 2


@pytest.fixture(autouse=True)
def _fast_compile():
    """Tiny models: XLA's expensive CPU passes would dominate the test time."""
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


def tiny(family: str, **kw):
    """A tiny config of each family with a rule table (SD3.5 with MMDiT-X dual attention in block 0)."""
    if family == "dit":
        base = dict(input_size=8, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
        return models.preset("DiT-S/2", **{**base, **kw})
    if family == "pixart":
        base = dict(input_size=8, hidden_size=32, depth=2, num_heads=2, caption_channels=16, caption_length=4)
        return models.preset("PixArt-Sigma-XL-2-512-MS", **{**base, "pe_interpolation": 1.0, **kw})
    if family == "sd3":
        base = dict(depth=2, hidden_size=32, num_heads=2, joint_attention_dim=16, pooled_projection_dim=8)
        base.update(pos_embed_max_size=8, input_size=16, in_channels=4, out_channels=4, dual_attention_layers=(0,))
        return models.preset("SD3.5-medium", **{**base, **kw})
    base = dict(depth=1, depth_single=2, hidden_size=32, num_heads=2, axes_dims=(4, 6, 6), context_dim=16)
    return models.preset("FLUX.1-dev", **{**base, "pooled_dim": 8, "in_channels": 4, "out_channels": 4, **kw})


FAMILIES = ("dit", "pixart", "sd3", "flux")


def abstract(config):
    """Parameter shapes (no init compiled)."""
    from dit_jax.runs import unbox_abstract

    return unbox_abstract(models.abstract_params(config))


def config_of(train_config):
    from dit_jax.train.config import model_config_from

    return model_config_from(train_config.model)


def random_params(config, seed=0):
    """Every parameter random (zero-initialised adaLN/output layers would hide mapping mistakes)."""
    leaves, tree = jax.tree.flatten(abstract(config))
    rs = np.random.RandomState(seed)
    return jax.tree.unflatten(tree, [rs.normal(0, 0.3, x.shape).astype(np.float32) for x in leaves])


def random_adapters(params, config: lora.LoraConfig, seed=0):
    """Adapters with ``B`` random too (a fresh adapter has B = 0, which would make every check trivial)."""
    adapters = lora.init_lora(params, config, jax.random.key(seed))
    rs = np.random.RandomState(seed + 1)
    return jax.tree.map(lambda x: np.asarray(x) + rs.normal(0, 0.5, np.shape(x)).astype(np.float32), adapters)


def host(tree):
    return jax.tree.map(np.asarray, tree)


def assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


def max_rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


# ---- merge, unmerge, layouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "features,names,axis",
    [
        ((3, 2, 8), ("embed", None, "heads", "kv"), -1),  # fused q|k|v: one adapter per slice
        (16, ("heads", "kv", "embed"), (-2, -1)),  # output projection: two input axes
    ],
)
def test_merged_dense_equals_base_forward_plus_low_rank_branch(features, names, axis):
    layer = dense(features, names, dtype=jnp.float32, axis=axis)
    x = np.random.RandomState(0).normal(size=(3, 5, 16) if axis == -1 else (3, 5, 2, 8)).astype(np.float32)
    params = nn.meta.unbox(layer.init(jax.random.key(0), x)["params"])
    config = lora.LoraConfig(rank=R, alpha=3.0, targets=("kernel",))
    adapters = random_adapters(params, config)
    a, b = adapters["lora_a"], adapters["lora_b"]  # (G, I, r), (G, r, O/G)
    assert a.shape[0] == (3 if axis == -1 else 1)
    # a fresh adapter (B = 0) leaves the kernel bit for bit
    fresh = lora.init_lora(params, config, jax.random.key(0))
    assert_trees_equal(lora.apply_lora(params, fresh, config), params)

    merged = lora.apply_lora(params, adapters, config)
    got = layer.apply({"params": merged}, x)
    xf = x.reshape(*x.shape[:2], -1)
    branch = np.einsum("bni,gir,gro->bngo", xf, a, b).reshape(got.shape)  # (x A) B per slice
    want = np.asarray(layer.apply({"params": params}, x)) + config.scale * branch
    err = max_rel(got, want)
    print(f"merged Dense {features}: max rel err {err:.1e} against x·W + scale·(x·A)·B")
    assert err < 1e-6


def test_unmerge_restores_the_base_within_one_rounding():
    config = tiny("pixart")
    params = random_params(config)
    lc = lora.resolve(lora.LoraConfig(rank=R, alpha=8.0), config)
    adapters = random_adapters(params, lc)
    merged = lora.merge(params, adapters, lc)
    back = host(lora.unmerge(merged, adapters, lc))
    worst, exact = 0.0, []
    for path in lora.adapter_paths(adapters):
        w, m, u = (np.asarray(lora._get(t, path)) for t in (params, merged, back))
        assert not np.array_equal(m, w)
        ulp = np.spacing(np.maximum(np.abs(w), np.abs(m)))  # the two roundings, half an ulp each
        assert np.all(np.abs(u - w) <= ulp), path
        worst = max(worst, float((np.abs(u - w) / ulp).max()))
        exact.append(float(np.mean(u == w)))
    print(f"unmerge(merge(W)): max error {worst:.2f} ulp, {np.mean(exact):.1%} of the elements exact")
    untouched = [p for p in lora._leaves(params) if p not in lora.adapter_paths(adapters)]
    assert all(np.array_equal(lora._get(back, p), lora._get(params, p)) for p in untouched)


def test_family_defaults_and_scanned_layout():
    expected = {
        "dit": {"attn/qkv", "attn/proj"},
        "pixart": {"attn/qkv", "attn/proj", "cross_attn/q", "cross_attn/kv", "cross_attn/proj"},
        "sd3": {"x_block/attn/qkv", "x_block/attn2/proj", "context_block/attn/qkv", "context_block/attn/proj"},
        "flux": {"img_attn/qkv", "txt_attn/proj", "linear1", "linear2"},
    }
    for family, want in expected.items():
        config = tiny(family)
        lc = lora.resolve(lora.LoraConfig(rank=R), config)
        adapters = jax.eval_shape(lambda p, lc=lc: lora.init_lora(p, lc, jax.random.key(0)), abstract(config))
        paths = {lora.module_path(p).split("/", 1)[1] for p in lora.adapter_paths(adapters)}
        assert want <= paths, (family, sorted(paths))
        assert not any("mlp" in p or "adaLN" in p for p in paths), family
    # the scanned layout: the same merged params as the looped one
    config = tiny("dit", depth=3)
    params = random_params(config)
    lc = lora.resolve(lora.LoraConfig(rank=R), config)
    adapters = random_adapters(params, lc)
    scan_config, scan_params = models.set_scan(config, params, True)
    scan_adapters = lora.set_scan(config, adapters, True)
    assert scan_adapters["stage_0"]["attn"]["qkv"]["lora_a"].shape == (3, 3, 32, R)
    assert_trees_equal(lora.set_scan(config, scan_adapters, False), adapters)
    merged_scan = lora.apply_lora(scan_params, scan_adapters, lc)
    _, unscanned = models.set_scan(scan_config, host(merged_scan), False)
    assert_trees_equal(unscanned, host(lora.apply_lora(params, adapters, lc)))


def test_config_errors():
    with pytest.raises(ValueError, match="dropout"):
        lora.LoraConfig(rank=4, dropout=0.1)
    with pytest.raises(ValueError, match="rank"):
        lora.LoraConfig(rank=0)
    with pytest.raises(ValueError, match="match no kernel"):
        lora.init_lora(random_params(tiny("dit")), lora.LoraConfig(rank=2, targets=("nope",)), jax.random.key(0))
    from dit_jax.train.setup import ConfigError, prepare

    with pytest.raises(ConfigError, match=r"config.lora.targets=\['nope'\] match no Dense kernel"):
        prepare(train_config(targets=("nope",)))
    with pytest.raises(ConfigError, match="config.lora: LoRA dropout"):
        prepare(train_config(dropout=0.1))


# ---- training --------------------------------------------------------------------------------------------------


def train_config(**lora_settings):
    from dit_jax.train.config import base_config

    c = base_config()
    c.model = dict(name="DiT-S/2", input_size=8, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    c.model.update(learn_sigma=False, scan_blocks=True)
    c.data = dict(name="digits", image_size=8, num_threads=1, prefetch_buffer_size=8)
    c.batch_size = 16
    c.grad_accum_steps = 2
    c.total_steps = 4
    c.log_every = 1
    c.checkpoint_every = 2
    c.optimizer.lr = 1e-2
    c.optimizer.weight_decay = 0.01
    c.ema_decay = 0.5
    c.sample.enabled = False
    c.lora.update({"rank": R, "alpha": 4.0, **lora_settings})
    return c


def test_train_step_changes_only_the_adapters_and_the_optimizer_holds_only_them():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from dit_jax.parallel.mesh import batch_sharding, global_batch
    from dit_jax.train.setup import prepare
    from dit_jax.train.state import create_train_state, state_shardings
    from dit_jax.train.steps import make_train_step

    setup = prepare(train_config())
    lc, mesh = setup.step_cfg.lora, setup.mesh
    assert lc.rank == R and lc.scale == 2.0 and lc.targets == lora.default_targets(setup.model_config)
    rng = np.random.default_rng(0)
    batch = {"x": rng.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32), "y": rng.integers(0, 10, 16).astype(np.int32)}
    with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
        abstract, shardings = state_shardings(setup.model_config, setup.tx, mesh, lora=lc)
        # a random base: at DiT's own init the zero adaLN gates would give the attention adapters no gradient
        base = jax.device_put(random_params(setup.model_config), shardings.base_params)
        state = create_train_state(setup.model_config, setup.tx, shardings, 0, base, lora=lc)
        before = jax.device_get(state)
        step = jax.jit(make_train_step(setup.step_cfg), out_shardings=(shardings, NamedSharding(mesh, P())))
        batch_sh = {k: batch_sharding(mesh, v.ndim) for k, v in batch.items()}
        state, metrics = step(state, jax.device_put(global_batch(batch, mesh), batch_sh))
        after = jax.device_get(state)
    assert np.isfinite(metrics["loss"]) and int(after.step) == 1
    assert_trees_equal(after.base_params, before.base_params)  # the base is frozen
    assert jax.tree.structure(after.params) == jax.tree.structure(before.params)
    assert set(lora.adapter_paths(after.params)) == {f"stage_0/attn/{n}/kernel" for n in ("qkv", "proj")}
    # B moves with its gradient; A (zero gradient while B = 0) with AdamW's weight decay; the EMA follows
    for tree in ("params", "ema_params"):
        for x, y in zip(jax.tree.leaves(getattr(after, tree)), jax.tree.leaves(getattr(before, tree))):
            assert not np.array_equal(x, y), tree
    # AdamW's moments have exactly the adapters' structure; the rest of the optimizer state is step counts
    moments = [s for s in jax.tree.leaves(after.opt_state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu")]
    assert moments and all(jax.tree.structure(m.mu) == jax.tree.structure(after.params) for m in moments)
    leaves = jax.tree.leaves(after.opt_state)
    n_opt = sum(int(np.prod(np.shape(x))) for x in leaves)
    assert n_opt == 2 * lora.count(after.params) + sum(np.ndim(x) == 0 for x in leaves)
    n_base = models.count_params(after.base_params)
    print(f"LoRA train step: {lora.count(after.params):,} trainable of {n_base:,} parameters")


def test_trainer_run_resume_and_export(tmp_path, monkeypatch):
    from dit_jax.checkpoint import save_model
    from dit_jax.runs import load_ema_params
    from dit_jax.train import trainer
    from dit_jax.train.metrics import read_metrics

    config = train_config()
    config.grad_accum_steps = 1
    base_config = config_of(config).replace(scan_blocks=False)
    base = random_params(base_config)
    save_model(str(tmp_path / "base"), base_config, base)
    config.init_from.model_dir = str(tmp_path / "base")
    run = str(tmp_path / "run")
    monkeypatch.setattr(trainer._Preemption, "reached", lambda self, s: s == 2)
    trainer.train_and_evaluate(config, run)
    monkeypatch.undo()
    trainer.train_and_evaluate(config, run)  # resumes at 2: adapters from the checkpoint, the base from model_dir
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in records)
    # resumed on the same base: a fresh init's loss would be ~100× smaller than this random base's
    assert 0.5 < records[2]["loss"] / records[1]["loss"] < 2

    model_config, lc, adapters, ref = lora_files.read_run(run)
    assert ref == {"model_dir": str(tmp_path / "base")} and (lc.rank, lc.alpha) == (R, 4.0)
    with pytest.raises(ValueError, match="LoRA run"):
        load_ema_params(run)
    out = tmp_path / "run_lora.safetensors"
    from dit_jax.convert.__main__ import main

    assert main(["--lora", run, str(out), "--lora-format", "kohya"]) == 0  # original names: fused qkv at rank 3r
    lc2, adapters2 = lora_files.load_lora(out, model_config)
    assert_trees_equal(adapters2, adapters)
    assert (lc2.rank, lc2.alpha) == (R, 4.0)
    # what the run samples with: the base where no adapter is, the base + the EMA adapters' delta on the rest
    loop, merged = lora_files.merged_run(run)
    assert not loop.scan_blocks
    changed = {p for p in lora._leaves(base) if not np.array_equal(lora._get(merged, p), lora._get(base, p))}
    assert changed == {f"blocks_{i}/attn/{n}/kernel" for i in range(2) for n in ("qkv", "proj")}
    check_sampling_a_lora_run(run, tmp_path, loop, merged, base)


def check_sampling_a_lora_run(run: str, tmp_path, loop, merged, base):
    """``pipelines.load(run)`` (so the sample CLI and the demo) merges the EMA adapters into the recorded base: its
    params are merged_run's bit for bit and its samples those of a pipeline built on merged_run's params."""
    import dataclasses

    from PIL import Image

    from dit_jax import pipelines
    from dit_jax.sample import main as sample_main

    pipe = pipelines.load(run)
    assert f"rank {R} LoRA adapters merged into model directory {tmp_path / 'base'}" in pipe.source
    assert pipe.model_config.replace(dtype=loop.dtype) == loop
    assert_trees_equal(pipe.params, merged)
    labels, steps = [0, 3, 7], 2
    got = pipe(labels, num_inference_steps=steps, seed=0)
    ref = pipelines.ClassConditionalPipeline(
        model_config=loop, params=merged, schedule=pipe.schedule, method=pipe.method, options=pipe.options,
        num_inference_steps=steps, guidance_scale=pipe.guidance_scale,
    )  # fmt: skip
    want = ref(labels, seed=0)
    assert got.shape == (3, 8, 8, 1) and np.array_equal(got, want)
    unmerged = dataclasses.replace(ref, params=base)(labels, seed=0)
    assert np.abs(unmerged - want).max() > 1e-3  # the adapters change the samples
    out = tmp_path / "lora_grid.png"
    assert sample_main(["--workdir", run, "--classes", "0,3,7", "--steps", str(steps), "--out", str(out)]) == 0
    grid = pipelines.make_grid(pipelines.to_uint8(want))[..., 0]
    assert np.array_equal(np.asarray(Image.open(out)), grid)
    # a base that is gone is one clear error
    (tmp_path / "base").rename(tmp_path / "base_moved")
    with pytest.raises(FileNotFoundError, match="LoRA run whose base cannot be read"):
        pipelines.load(run)


def test_plan_of_a_lora_run_holds_the_base_once():
    from dit_jax import plan as plan_lib

    config = train_config()
    config.grad_accum_steps = 1
    report = plan_lib.plan(config)
    model_config = config_of(config)
    lc = lora.resolve(lora.LoraConfig(rank=R), model_config)
    n_lora = lora.count(jax.eval_shape(lambda p: lora.init_lora(p, lc, jax.random.key(0)), abstract(model_config)))
    n_base = report["parameters"]
    print(f"plan: {report['bytes_per_device']}, base {n_base:,}, adapters {n_lora:,}")
    assert report["fits"] and n_base == models.count_params(abstract(model_config))
    # full fine-tuning holds 4 copies of the params (params, two Adam moments, EMA); LoRA the base + 4 × adapters
    assert report["bytes_per_device"]["arguments"] < 0.45 * 4 * 4 * n_base


# ---- files: round trips ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_and_kohya_round_trips_are_bit_exact(family, tmp_path):
    config = tiny(family, scan_blocks=family == "sd3")
    params = random_params(config)
    lc = lora.resolve(lora.LoraConfig(rank=R, alpha=3.0), config)
    adapters = random_adapters(params, lc)
    for fmt in lora_files.FORMATS:
        for naming in ("diffusers", "original"):
            path = tmp_path / f"{family}_{fmt}_{naming}.safetensors"
            lora_files.save_lora(path, config, adapters, lc, format=fmt, naming=naming)
            lc2, back = lora_files.load_lora(path, config)  # the naming is detected
            assert_trees_equal(back, adapters)  # JAX → file → JAX
            assert (lc2.rank, lc2.scale) == (R, lc.scale)
            again = tmp_path / f"again_{fmt}_{naming}.safetensors"
            lora_files.save_lora(again, config, back, lc2, format=fmt, naming=naming)
            first, _, _ = lora_files.read_lora_file(path)
            second, _, _ = lora_files.read_lora_file(again)
            assert sorted(first) == sorted(second)
            assert all(np.array_equal(first[k], second[k]) for k in first)  # file → JAX → file
            # the merged weights are the same whichever file they came through
            assert_trees_equal(lora.apply_lora(params, back, lc2), lora.apply_lora(params, adapters, lc))


def test_fused_parts_with_different_adapters_are_written_block_diagonal():
    """A dit_jax adapter has one A per q/k/v slice; BFL's fused qkv holds them at rank 3r, up block-diagonal."""
    config = tiny("flux")
    params = random_params(config)
    lc = lora.LoraConfig(rank=R, alpha=3.0, targets=(r"blocks_0/img_attn/qkv/kernel$",))
    adapters = random_adapters(params, lc)
    sd, _ = lora_files.to_state_dict(config, adapters, lc, format="kohya", naming="original")
    k = "lora_unet_double_blocks_0_img_attn_qkv"
    assert sorted(sd) == [f"{k}.alpha", f"{k}.lora_down.weight", f"{k}.lora_up.weight"]
    assert sd[f"{k}.lora_down.weight"].shape == (3 * R, 32) and float(sd[f"{k}.alpha"]) == 9.0
    up = sd[f"{k}.lora_up.weight"].reshape(3, 32, 3, R)
    assert not any(up[i, :, j].any() for i in range(3) for j in range(3) if i != j)
    # the torch-layout merge equals ours
    base = convert.to_torch(config, params, format="original")["double_blocks.0.img_attn.qkv.weight"]
    want = base + 9.0 / (3 * R) * sd[f"{k}.lora_up.weight"] @ sd[f"{k}.lora_down.weight"]
    got = convert.to_torch(config, lora.apply_lora(params, adapters, lc), format="original")
    assert max_rel(got["double_blocks.0.img_attn.qkv.weight"], want) < 1e-6


# ---- files: what diffusers and kohya loaders compute ------------------------------------------------------------


def hand_made(modules: dict[str, tuple[int, int]], rank: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random ``(A (r, in), B (out, r))`` per torch Linear name of ``(out, in)``."""
    rs = np.random.RandomState(seed)
    return {
        name: (rs.normal(0, 0.5, (rank, n_in)).astype(np.float32), rs.normal(0, 0.5, (n_out, rank)).astype(np.float32))
        for name, (n_out, n_in) in modules.items()
    }


def merged_torch(state_dict: dict, factors: dict, scale: float) -> dict:
    """``W + scale · B @ A`` on each adapted Linear (float64, then float32), as diffusers/kohya merge."""
    out = dict(state_dict)
    for name, (a, b) in factors.items():
        w = state_dict[f"{name}.weight"].astype(np.float64)
        out[f"{name}.weight"] = (w + scale * (b.astype(np.float64) @ a.astype(np.float64))).astype(np.float32)
    return out


def write_peft(path, factors: dict, rank: int, alpha: float | None) -> None:
    from safetensors.numpy import save_file

    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"transformer.{name}.lora_A.weight"] = a
        tensors[f"transformer.{name}.lora_B.weight"] = b
    meta = {"format": "pt"}
    if alpha is not None:
        meta["lora_adapter_metadata"] = json.dumps({"transformer.r": rank, "transformer.lora_alpha": alpha})
    save_file(tensors, str(path), metadata=meta)


def compare_merged(name: str, config, params, path, fmt: str, naming: str, factors, scale):
    lc, adapters = lora_files.load_lora(path, config)
    got = convert.to_torch(config, lora.apply_lora(params, adapters, lc), format=naming)
    want = merged_torch(convert.to_torch(config, params, format=naming), factors, scale)
    assert sorted(got) == sorted(want)
    err = max(max_rel(got[k], want[k]) for k in want)
    print(f"{name}: merged weights max rel err {err:.1e} against W + scale·B@A in the torch layout")
    assert err < 1e-6
    # and the adapters write back to the same file
    tensors, _ = lora_files.to_state_dict(config, adapters, lc, format=fmt, naming=naming)
    original, _, _ = lora_files.read_lora_file(path)
    assert sorted(tensors) == sorted(original) and all(np.array_equal(tensors[k], original[k]) for k in original)
    return lc, adapters


def test_diffusers_dit_with_a_peft_file(tmp_path):
    import torch
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    m = DiTTransformer2DModel(
        in_channels=4, out_channels=8, activation_fn="gelu-approximate", num_attention_heads=2, attention_head_dim=8,
        num_layers=2, norm_type="ada_norm_zero", num_embeds_ada_norm=10, patch_size=2, sample_size=8,
    ).eval()  # fmt: skip
    randomize_normal_(m, 0.1)
    for block in m.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(m.transformer_blocks[0].norm1.emb.state_dict())
    m.save_pretrained(tmp_path / "dit")
    config, params = convert.from_torch(tmp_path / "dit")
    d = 16
    modules = {"transformer_blocks.0.attn1.to_q": (d, d), "transformer_blocks.0.attn1.to_v": (d, d),
               "transformer_blocks.1.attn1.to_k": (d, d), "transformer_blocks.1.attn1.to_out.0": (d, d)}  # fmt: skip
    factors = hand_made(modules, 4, seed=1)
    write_peft(tmp_path / "pytorch_lora_weights.safetensors", factors, 4, alpha=2.0)
    lc, adapters = compare_merged(
        "DiT peft (diffusers names)", config, params, tmp_path / "pytorch_lora_weights.safetensors", "peft",
        "diffusers", factors, 0.5,
    )  # fmt: skip
    # diffusers' forward on the merged weights = ours
    with torch.no_grad():
        sd = m.state_dict()
        for name, (a, b) in factors.items():
            sd[f"{name}.weight"] += 0.5 * torch.from_numpy(b) @ torch.from_numpy(a)
        m.load_state_dict(sd)
        rs = np.random.RandomState(0)
        x, t, y = rs.randn(2, 4, 8, 8).astype(np.float32), np.array([3.0, 711.5], np.float32), np.array([1, 10])
        want = m(torch.from_numpy(x), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample.numpy()
    merged = lora.apply_lora(params, adapters, lc)
    got = nchw(models.build(config).apply({"params": merged}, nhwc(x), t, y.astype(np.int32)))
    check_parity("DiT + LoRA against diffusers with the merged LoRA", got, want)


def test_pixart_and_sd3_peft_files_merge_as_diffusers():
    import tempfile

    cases = {
        "pixart": (
            tiny("pixart", learned_null_caption=False),
            {
                "transformer_blocks.0.attn2.to_k": (32, 32),
                "transformer_blocks.1.attn2.to_q": (32, 32),
                "transformer_blocks.1.attn1.to_v": (32, 32),
            },  # fmt: skip
        ),
        "sd3": (
            tiny("sd3"),  # the context stream, MMDiT-X attn2, and norm_out (stored as (scale, shift))
            {
                "transformer_blocks.0.attn.add_k_proj": (32, 32),
                "transformer_blocks.0.attn2.to_out.0": (32, 32),
                "transformer_blocks.1.attn.to_q": (32, 32),
                "norm_out.linear": (64, 32),
            },  # fmt: skip
        ),
    }
    for name, (config, modules) in cases.items():
        params = random_params(config)
        factors = hand_made(modules, 3, seed=2)
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/lora.safetensors"
            write_peft(path, factors, 3, alpha=None)  # no alpha stored: scale 1, as diffusers
            compare_merged(f"{name} peft (diffusers names)", config, params, path, "peft", "diffusers", factors, 1.0)


def test_flux_kohya_file_with_bfl_names_merges_as_kohya(tmp_path):
    from safetensors.numpy import save_file

    config = tiny("flux")
    params = random_params(config)
    d = 32
    modules = {"double_blocks.0.img_attn.qkv": (3 * d, d), "double_blocks.0.txt_attn.proj": (d, d),
               "single_blocks.1.linear1": (7 * d, d), "single_blocks.0.linear2": (d, 5 * d)}  # fmt: skip
    factors = hand_made(modules, 4, seed=3)
    tensors = {}
    for name, (a, b) in factors.items():
        k = "lora_unet_" + name.replace(".", "_")
        tensors.update({f"{k}.lora_down.weight": a, f"{k}.lora_up.weight": b, f"{k}.alpha": np.array(2.0, np.float32)})
    save_file(tensors, str(tmp_path / "flux_kohya.safetensors"))
    lc, adapters = compare_merged(
        "Flux kohya (BFL names, fused qkv)", config, params, tmp_path / "flux_kohya.safetensors", "kohya", "original",
        factors, 0.5,
    )  # fmt: skip
    # the same adapter as a diffusers peft file: to_q/to_k/to_v, proj_mlp and proj_out, as diffusers' Flux names
    sd, meta = lora_files.to_state_dict(config, adapters, lc, format="peft")
    names = {k.split("transformer.", 1)[1].rsplit(".lora_", 1)[0] for k in sd}
    assert {"transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.proj_mlp"} <= names
    assert json.loads(meta["lora_adapter_metadata"])["transformer.lora_alpha"] == 2.0
    diffusers_factors = {n: (sd[f"transformer.{n}.lora_A.weight"], sd[f"transformer.{n}.lora_B.weight"]) for n in names}
    want = merged_torch(convert.to_torch(config, params, format="diffusers"), diffusers_factors, 0.5)
    got = convert.to_torch(config, lora.apply_lora(params, adapters, lc), format="diffusers")
    assert max(max_rel(got[k], want[k]) for k in want) < 1e-6


def test_a_file_whose_modules_match_no_parameter_is_one_clear_error(tmp_path):
    config = tiny("dit")
    factors = hand_made(
        {"transformer_blocks.0.attn1.to_q": (32, 32), "transformer_blocks.7.attn1.to_q": (32, 32)}, 2, 0
    )
    write_peft(tmp_path / "bad.safetensors", factors, 2, alpha=2.0)
    with pytest.raises(convert.ConversionError, match=r"1 LoRA module\(s\) match no Linear layer.*blocks.7.attn1.to_q"):
        lora_files.load_lora(tmp_path / "bad.safetensors", config)
    from safetensors.numpy import save_file

    save_file({"blocks.0.attn.qkv.weight": np.zeros((96, 32), np.float32)}, str(tmp_path / "not_lora.safetensors"))
    with pytest.raises(convert.ConversionError, match="not a LoRA file"):
        lora_files.load_lora(tmp_path / "not_lora.safetensors", config)
