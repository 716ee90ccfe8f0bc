"""Sequence-parallel attention on the 8 test devices: Ulysses (all_to_all) and ring (ppermute) equal the
single-device dense attention, forward and gradients, for self-attention, cross-attention with key masks and
KV-compressed keys; a tiny PixArt forward and train step over a ``sequence=2`` mesh equal the single-device ones."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_step import _fast_compile, assert_trees_close, data, run_steps, tiny_pixart  # noqa: F401

from dit_jax.models import build
from dit_jax.nn.attention import dot_product_attention
from dit_jax.parallel.mesh import create_mesh
from dit_jax.parallel.rules import DEFAULT_RULES, constrain, logical_rules
from dit_jax.parallel.sequence import sequence_axes, sequence_mode

B, T, D = 2, 32, 8


def _inputs(seed, heads, s, mask):
    rng = np.random.default_rng(seed)
    q, k, v = (
        jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in [(B, T, heads, D)] + [(B, s, heads, D)] * 2
    )
    if mask == "keys":  # caption-style padding: every row keeps its first key
        m = rng.uniform(size=(B, s)) < 0.6
        m[:, 0] = True
    elif mask == "full":  # (B, H, T, S) with one query row that sees no key at all
        m = rng.uniform(size=(B, heads, T, s)) < 0.5
        m[:, :, 5] = False
    else:
        m = None
    return q, k, v, None if m is None else jnp.asarray(m)


def _value_and_grads(q, k, v, mask, kv_sharded):
    def loss(q, k, v):
        out = dot_product_attention(q, k, v, mask, backend="dense", kv_sharded=kv_sharded)
        return jnp.sum(out * jnp.sin(out)), out  # a non-linear loss: the cotangent differs per element

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


@pytest.mark.parametrize(
    "mode,mesh,heads,s,mask,kv_sharded,exchange",
    [
        ("ulysses", dict(data=2, sequence=4), 4, T, "keys", True, "all-to-all"),
        ("ring", dict(data=2, sequence=4), 4, T, "keys", True, "collective-permute"),
        ("auto", dict(sequence=8), 2, T, "full", True, "collective-permute"),  # 2 heads < 8 devices: ring
        ("ulysses", dict(data=2, sequence=4), 4, T, "full", True, "all-to-all"),
        ("ulysses", dict(data=2, sequence=4), 4, T // 4, None, True, "all-to-all"),  # KV-compressed keys
        ("ring", dict(data=2, sequence=4), 4, T // 4, "keys", True, "collective-permute"),
        ("ring", dict(data=2, sequence=4), 4, 300, "keys", True, "collective-permute"),  # captions, split
        ("auto", dict(data=2, sequence=4), 4, 300, "keys", False, None),  # captions held whole: no exchange
        ("ulysses", dict(sequence=2, tensor=4), 4, T, "keys", True, "all-to-all"),
    ],
    ids=[
        "ulysses-self",
        "ring-self",
        "ring8-2heads-fullmask",
        "ulysses-fullmask",
        "ulysses-kv-compressed",
        "ring-kv-compressed",
        "ring-cross-300",
        "local-cross-300",
        "ulysses-with-tensor",
    ],
)
def test_sharded_attention_equals_dense(mode, mesh, heads, s, mask, kv_sharded, exchange):
    q, k, v, m = _inputs(0, heads, s, mask)
    fn = _value_and_grads(q, k, v, m, kv_sharded)
    (_, ref), ref_grads = fn(q, k, v)
    with jax.set_mesh(create_mesh(mesh)), nn.logical_axis_rules(logical_rules()), sequence_mode(mode):
        assert sequence_axes() == ("sequence",)
        step = jax.jit(fn)
        hlo = step.lower(q, k, v).compile().as_text()
        (_, out), grads = step(q, k, v)
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=5e-6, rtol=1e-5)
    if exchange is not None:  # the sharded path ran (a silent fall-back to local attention would pass the above)
        assert exchange in hlo
    else:
        assert "all-to-all" not in hlo and "collective-permute" not in hlo


def test_ulysses_needs_divisible_heads():
    q, k, v, _ = _inputs(0, 2, T, None)
    mesh, rules = create_mesh(dict(sequence=8)), logical_rules()
    match = "2 attention heads divisible by the 8"
    with (
        jax.set_mesh(mesh),
        nn.logical_axis_rules(rules),
        sequence_mode("ulysses"),
        pytest.raises(ValueError, match=match),
    ):
        jax.jit(dot_product_attention)(q, k, v)
    with pytest.raises(ValueError, match="sequence mode 'rings' is invalid"), sequence_mode("rings"):
        pass


def test_sequence_rule_is_a_no_op_where_the_mesh_has_no_sequence_axis():
    """act_length maps to ``sequence`` by default; meshes without that axis (sampling pipelines, text encoders) and
    meshes where it has size 1 keep tokens whole."""
    assert dict(DEFAULT_RULES)["act_length"] == "sequence"
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    x = jnp.ones((4, 16, 8))
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules()):
        assert sequence_axes() == ()
        y = jax.jit(lambda x: constrain(x, ("act_batch", "act_length", "act_embed")))(x)
    assert {shard.data.shape for shard in y.addressable_shards} == {(1, 16, 8)}  # rows split, tokens whole
    with jax.set_mesh(create_mesh(dict(data=8))), nn.logical_axis_rules(logical_rules()):
        assert sequence_axes() == ()


SEQ_MESH = dict(data=2, sequence=2, tensor=2)


@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_pixart_forward_with_sequence_parallel_attention(mode):
    """Self-attention (one layer KV-compressed) and masked caption cross-attention of a tiny PixArt-Σ over
    data=2 × sequence=2 × tensor=2 equal the single-device forward."""
    model_config = tiny_pixart(kv_compress_layers=(1,))
    model = build(model_config)
    batch = data(0, n=4, captions=True)
    t = jnp.linspace(0.1, 0.9, 4)
    inputs = (batch["x"], t, batch["caption"], batch["caption_mask"])
    params = model.init(jax.random.key(0), *inputs)["params"]
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), nn.meta.unbox(params))
    apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    ref = apply(params, *inputs)
    with jax.set_mesh(create_mesh(SEQ_MESH)), nn.logical_axis_rules(logical_rules()), sequence_mode(mode):
        hlo = apply.lower(params, *inputs).compile().as_text()
        out = apply(params, *inputs)
    assert ("all-to-all" if mode == "ulysses" else "collective-permute") in hlo
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


TRAIN_MODEL = tiny_pixart(kv_compress_layers=(1,), scan_blocks=True, remat="full")


@functools.cache
def _single_device_step():
    return run_steps(dict(data=1), jax.devices()[:1], [data(0, captions=True)], model=TRAIN_MODEL)


@pytest.mark.parametrize(
    "mesh", [SEQ_MESH, dict(fsdp=2, sequence=4)], ids=["ulysses-data2-seq2-tensor2", "ring-fsdp2-seq4"]
)
def test_pixart_train_step_with_sequence_parallel_attention(mesh):
    """One flow-matching step (AdamW, EMA; scanned stages with remat, KV compression in one layer) over a mesh with
    a sequence axis equals the single-device step: loss, gradient norm, parameters, optimizer state. The 2 heads
    take Ulysses over sequence=2 and the ring over sequence=4."""
    one, m1, _ = _single_device_step()
    many, m8, _ = run_steps(mesh, jax.devices(), [data(0, captions=True)], model=TRAIN_MODEL)
    np.testing.assert_allclose(m1[0]["loss"], m8[0]["loss"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m1[0]["grad_norm"], m8[0]["grad_norm"], rtol=1e-5, atol=1e-5)
    assert_trees_close(one.params, many.params)
    assert_trees_close(one.ema_params, many.ema_params)
    assert_trees_close(one.opt_state, many.opt_state)
