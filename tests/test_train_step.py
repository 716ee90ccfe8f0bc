"""The train step on the 8 test devices: sharded == single device, accumulation == big batch, the NaN guard."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dit_jax.models import preset
from dit_jax.parallel.mesh import batch_sharding, create_mesh, global_batch
from dit_jax.parallel.rules import logical_rules
from dit_jax.train.objectives import make_loss_fn, make_schedule
from dit_jax.train.optimizers import create_optimizer
from dit_jax.train.state import create_train_state, state_shardings
from dit_jax.train.steps import StepConfig, make_train_step

BATCH = 8


@pytest.fixture(autouse=True)
def _fast_compile():
    """Tiny models: XLA's expensive CPU passes would dominate the test time."""
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


def tiny_dit(**kw):
    base = dict(input_size=8, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10, learn_sigma=False)
    return preset("DiT-S/2", **{**base, **kw})


def tiny_pixart(**kw):
    base = dict(
        input_size=8,
        in_channels=1,
        hidden_size=32,
        depth=2,
        num_heads=2,
        caption_channels=16,
        caption_length=4,
        pe_interpolation=1.0,
    )
    return preset("PixArt-Sigma-XL-2-256x256", **{**base, **kw})


def data(seed=0, n=BATCH, captions=False):
    rng = np.random.default_rng(seed)
    batch = {"x": rng.uniform(-1, 1, size=(n, 8, 8, 1)).astype(np.float32)}
    if captions:
        batch["caption"] = rng.normal(size=(n, 4, 16)).astype(np.float32)
        batch["caption_mask"] = (rng.uniform(size=(n, 4)) < 0.8).astype(np.int32)
        batch["caption_mask"][:, 0] = 1
    else:
        batch["y"] = rng.integers(0, 10, size=(n,)).astype(np.int32)
    return batch


def run_steps(
    mesh_shape, devices, batches, *, model=None, optimizer="adamw", objective="flow", accum=1, condition_inputs=()
):
    """Train len(batches) steps from the same init; returns (host state, list of host metrics)."""
    model = model or tiny_dit()
    mesh = create_mesh(mesh_shape, devices=devices)
    # CAME's eps1 well above rounding noise: the key-bias noise (see _without_key_biases) must not reach the
    # tensor-wide RMS clip of a fused qkv bias
    opt = dict(name=optimizer, lr=1e-2, weight_decay=0.01, grad_clip=1.0, eps1=1e-6)
    tx, lr = create_optimizer(opt, 10)
    schedule = make_schedule(objective, {}, model)
    cfg = StepConfig(
        model_config=model,
        loss_fn=make_loss_fn(objective, {}, schedule, model.patch_size),
        tx=tx,
        lr_schedule=lr,
        objective=objective,
        ema_decay=0.9,
        accum_steps=accum,
        cond_dropout_prob=0.3,
        condition_inputs=condition_inputs,
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules()):
        _, shardings = state_shardings(model, tx, mesh)
        state = create_train_state(model, tx, shardings, seed=0)
        batch_sh = {k: batch_sharding(mesh, v.ndim) for k, v in batches[0].items()}
        step = jax.jit(
            make_train_step(cfg),
            in_shardings=(shardings, batch_sh),
            out_shardings=(shardings, NamedSharding(mesh, P())),
            donate_argnums=0,
        )
        metrics, states = [], []
        for b in batches:
            state, m = step(state, global_batch(b, mesh))
            metrics.append(jax.device_get(m))
            states.append(jax.device_get(state))
        return states[-1], metrics, states


def _without_key_biases(path, x):
    """Key biases get a zero gradient in exact arithmetic (softmax ignores a per-query constant); Adam and CAME
    normalise their rounding noise into lr-sized steps whose sign depends on the summation order, so the sharded
    and the single-device step legitimately disagree there. Zero them before comparing."""
    keys = [getattr(k, "key", None) for k in path]
    x = np.array(x)
    if x.ndim >= 3 and "bias" in keys:
        if "qkv" in keys and x.shape[-3] == 3:
            x[..., 1, :, :] = 0
        if "kv" in keys and x.shape[-3] == 2:
            x[..., 0, :, :] = 0
    return x


def assert_trees_close(a, b, atol=1e-5):
    a = jax.tree_util.tree_map_with_path(_without_key_biases, a)
    b = jax.tree_util.tree_map_with_path(_without_key_biases, b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5, err_msg=jax.tree_util.keystr(path)
        )


@pytest.mark.parametrize(
    "optimizer,objective,model",
    [
        ("adamw", "flow", tiny_dit()),
        ("came", "ddpm", tiny_dit(learn_sigma=True, scan_blocks=True)),
        ("came", "ddpm", tiny_pixart(kv_compress_layers=(1,), scan_blocks=True, remat="full")),
    ],
    ids=["dit-adamw-flow", "dit-came-ddpm-scan", "pixart-kv-came-ddpm-remat"],
)
def test_sharded_step_equals_single_device(optimizer, objective, model):
    captions = not hasattr(model, "num_classes")
    batches = [data(0, captions=captions), data(1, captions=captions)]
    one, m1, _ = run_steps(
        dict(data=1), jax.devices()[:1], batches, model=model, optimizer=optimizer, objective=objective
    )
    mesh = dict(data=2, fsdp=2, tensor=2)
    many, m8, _ = run_steps(mesh, jax.devices(), batches, model=model, optimizer=optimizer, objective=objective)
    for a, b in zip(m1, m8):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5, atol=1e-5)
    assert m1[0]["loss"] != m1[1]["loss"]
    assert_trees_close(one.params, many.params)
    assert_trees_close(one.ema_params, many.ema_params)
    assert_trees_close(one.opt_state, many.opt_state)


def test_grad_accumulation_equals_big_batch():
    batches = [data(0, 16), data(1, 16)]
    mesh = dict(data=4)
    big, mb, _ = run_steps(mesh, jax.devices()[:4], batches, accum=1)
    acc, ma, _ = run_steps(mesh, jax.devices()[:4], batches, accum=4)
    for a, b in zip(mb, ma):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
    assert_trees_close(big.params, acc.params)


def test_nan_guard_skips_and_counts():
    good = data(0)
    bad = dict(good, x=np.full_like(good["x"], np.nan))
    state, metrics, states = run_steps(dict(data=2), jax.devices()[:2], [good, bad, bad, good])
    assert [int(m["skipped"]) for m in metrics] == [0, 1, 1, 0]
    assert [int(m["nan_skips"]) for m in metrics] == [0, 1, 2, 0]
    assert int(state.nan_total) == 2 and int(state.nan_skips) == 0 and int(state.step) == 4
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))
    # a skipped step leaves params, optimizer state and EMA exactly as they were; the good step after it updates
    for skipped in states[1:3]:
        assert_trees_close(skipped.params, states[0].params, atol=0)
        assert_trees_close(skipped.opt_state, states[0].opt_state, atol=0)
        assert_trees_close(skipped.ema_params, states[0].ema_params, atol=0)
    assert not np.allclose(
        states[3].params["final_layer"]["linear"]["kernel"], states[0].params["final_layer"]["linear"]["kernel"]
    )


def test_state_is_created_sharded():
    """Parameters and optimizer moments (CAME's factored rows/columns too) land in their shards."""
    model = tiny_dit(scan_blocks=True)
    mesh = create_mesh(dict(data=2, fsdp=2, tensor=2))
    tx, _ = create_optimizer(dict(name="came", lr=1e-3), 10)
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules()):
        _, shardings = state_shardings(model, tx, mesh)
        state = create_train_state(model, tx, shardings, seed=0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules([("embed", None), ("layers", "fsdp")])):
        _, overridden = state_shardings(model, tx, mesh)
    assert overridden.params["stage_0"]["mlp"]["fc1"]["kernel"].spec == P("fsdp", None, "tensor")
    fc1 = state.params["stage_0"]["mlp"]["fc1"]["kernel"]  # (layers, embed, mlp)
    assert fc1.sharding.spec == P(None, "fsdp", "tensor")
    assert fc1.addressable_shards[0].data.shape == (2, 16, 64)
    came_state = state.opt_state[0]
    assert came_state.mu["stage_0"]["mlp"]["fc1"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert came_state.v_row["stage_0"]["mlp"]["fc1"]["kernel"].sharding.spec == P(None, "fsdp")
    assert came_state.v_col["stage_0"]["mlp"]["fc1"]["kernel"].sharding.spec == P(None, "tensor")
    assert state.ema_params["stage_0"]["mlp"]["fc1"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")


def test_pixart_grid_sampler_uses_captions_of_the_first_batch(tmp_path):
    """Sample grids of a text-conditional run: captions from the global batch, guidance via the null caption."""
    import ml_collections

    from dit_jax.train.config import base_config
    from dit_jax.train.grids import GridSampler

    model = tiny_pixart()
    mesh = create_mesh(dict(data=2, fsdp=2, tensor=2))
    tx, _ = create_optimizer(dict(name="adamw", lr=1e-3), 10)
    config = base_config()
    config.objective = "ddpm"
    config.data = ml_collections.ConfigDict(dict(name="folder"))
    config.sample.num_steps, config.sample.per_class, config.sample.num_classes = 2, 2, 2
    config.sample.guidance_scale = 3.0
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules()):
        _, shardings = state_shardings(model, tx, mesh)
        state = create_train_state(model, tx, shardings, seed=0)
        batch = global_batch(data(0, captions=True), mesh)
        sampler = GridSampler(config, model, make_schedule("ddpm", {}, model), mesh, shardings.ema_params, batch)
        samples = sampler.samples(state.ema_params)
        sampler.write(state.ema_params, 7, str(tmp_path))
    assert samples.shape == (4, 8, 8, 1) and np.all(np.isfinite(samples))
    assert (tmp_path / "samples" / "step_0000007.png").exists()


def test_bf16_compute_keeps_fp32_master_params():
    batches = [data(0), data(1)]
    f32, m32, _ = run_steps(dict(data=1), jax.devices()[:1], batches)
    bf16, m16, _ = run_steps(dict(data=1), jax.devices()[:1], batches, model=tiny_dit(dtype="bfloat16"))
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(bf16.params))
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(bf16.opt_state) if np.ndim(x))
    # (zero-initialised output layers make the first loss dtype-independent; the gradients are not)
    assert m16[0]["grad_norm"] != m32[0]["grad_norm"] and m16[1]["loss"] != m32[1]["loss"]
    np.testing.assert_allclose(m16[1]["loss"], m32[1]["loss"], rtol=5e-2)


def _text_batch(seed: int, width: int, pooled: int, guidance: bool = False):
    rng = np.random.default_rng(seed)
    batch = {
        "x": rng.normal(size=(BATCH, 8, 8, 4)).astype(np.float32),
        "context": rng.normal(size=(BATCH, 5, width)).astype(np.float32),
        "pooled": rng.normal(size=(BATCH, pooled)).astype(np.float32),
    }
    if guidance:
        batch["guidance"] = rng.uniform(1, 5, size=(BATCH,)).astype(np.float32)
    return batch


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_mmdit_families_train_sharded_like_single_device(family):
    """SD3/SD3.5 and Flux train through the same step, condition dropout and shardings as DiT and PixArt (their
    family protocol): a step over data=2, fsdp=2, tensor=2 equals the single-device step."""
    from dit_jax.models.flux import FluxConfig
    from dit_jax.models.mmdit import MMDiTConfig

    if family == "sd3":
        model = MMDiTConfig(input_size=8, in_channels=4, out_channels=4, hidden_size=32, depth=3, num_heads=2,
                            joint_attention_dim=16, pooled_projection_dim=12, pos_embed_max_size=8,
                            qk_norm="rms_norm", dual_attention_layers=(0,), scan_blocks=True)  # fmt: skip
        batches = [_text_batch(0, 16, 12), _text_batch(1, 16, 12)]
    else:
        model = FluxConfig(input_size=8, in_channels=4, out_channels=4, hidden_size=32, num_heads=2, depth=1,
                           depth_single=2, context_dim=16, pooled_dim=12, axes_dims=(4, 6, 6),
                           scan_blocks=True)  # fmt: skip
        batches = [_text_batch(0, 16, 12, guidance=True), _text_batch(1, 16, 12, guidance=True)]
    single, m1, _ = run_steps(dict(data=1), jax.devices()[:1], batches, model=model)
    sharded, m8, _ = run_steps(dict(data=2, fsdp=2, tensor=2), jax.devices(), batches, model=model)
    for a, b in zip(m1, m8):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5, atol=1e-5)
    assert m1[1]["loss"] != m1[0]["loss"] and np.isfinite(m1[1]["grad_norm"])
    assert_trees_close(single.params, sharded.params)


def test_condition_inputs_fill_a_constant_model_input():
    """``config.condition_inputs`` (Flux-dev's embedded guidance in fine-tuning) gives every example the constant
    input: the same training as a batch carrying that column, and not the family's default."""
    from dit_jax.models.flux import FluxConfig

    model = FluxConfig(input_size=8, in_channels=4, out_channels=4, hidden_size=32, num_heads=2, depth=1,
                       depth_single=1, context_dim=16, pooled_dim=12, axes_dims=(4, 6, 6))  # fmt: skip
    plain = [_text_batch(k, 16, 12) for k in range(3)]  # zero-initialised modulations: vec matters from step 3
    carried = [dict(b, guidance=np.full((BATCH,), 3.5, np.float32)) for b in plain]
    one = jax.devices()[:1]
    filled, mf, _ = run_steps(dict(data=1), one, plain, model=model, condition_inputs=(("guidance", 3.5),))
    given, mg, _ = run_steps(dict(data=1), one, carried, model=model)
    default, md, _ = run_steps(dict(data=1), one, plain, model=model)
    assert_trees_close(filled.params, given.params, atol=0)
    assert [m["loss"] for m in mf] == [m["loss"] for m in mg]
    assert mf[2]["loss"] != md[2]["loss"]  # the default guidance input is 1.0
