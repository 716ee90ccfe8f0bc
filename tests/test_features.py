"""DiT features for correspondence (``dit_jax.features``, DiTF): the AdaLN-modulated block input equals what the block
itself computes, massive channels are found and discarded, nearest-neighbour matching and PCK, and DiTF on a DiT
trained on scikit-learn digits, matched against copies warped by known affine maps."""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import features as F
from dit_jax.diffusion import DDPMSchedule, FlowSchedule, q_sample
from dit_jax.models import build, family_of, init_params, preset, set_scan
from dit_jax.nn.layers import layer_norm, modulate


def tiny_dit(**overrides):
    kw = dict(input_size=8, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10, learn_sigma=False)
    return preset("DiT-S/2", **{**kw, **overrides})


def randomized(config, seed=0):
    """Parameters of ``config``, every one drawn at random (a fresh model's adaLN layers are zero, which would make
    the modulation trivial); only their shapes come from the model's init."""
    leaves, tree = jax.tree.flatten(jax.eval_shape(lambda: init_params(config, 0)))
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [0.3 * rng.normal(size=x.shape).astype(np.float32) for x in leaves])


def attention_inputs(config, params, x_t, t, y):
    """What each block's self-attention (and the final layer's linear) reads, recorded from a plain forward pass."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        path = tuple(context.module.path)
        if context.method_name == "__call__" and len(path) == 2 and path[1] in ("attn", "linear"):
            seen[path[0]] = np.asarray(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        build(config).apply({"params": params}, x_t, t, y)
    return seen


def test_modulated_features_are_the_blocks_own_modulated_layernorm():
    config = tiny_dit()
    params = randomized(config)
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    noise = jax.random.normal(jax.random.key(2), x.shape)
    schedule = DDPMSchedule()
    t = jnp.array([260, 260, 900])
    x_t = q_sample(schedule, x, t, noise)
    seen = attention_inputs(config, params, x_t, t.astype(jnp.float32), jnp.full((3,), config.num_classes))
    for block, name in [(0, "blocks_0"), (1, "blocks_1"), (2, "final_layer")]:
        kw = dict(block=block, t=t, noise=noise, discard_massive=False, schedule=schedule)
        with jax.disable_jit():  # op by op, as the reference ran: the same operations give the same bits
            feats = F.extract_features(config, params, x, **kw)
        assert feats.shape == (3, 4, 4, 32)
        np.testing.assert_array_equal(np.asarray(feats).reshape(3, 16, 32), seen[name])
    # compiled (XLA fuses differently: float32 rounding), from the scanned parameter layout
    scanned_config, scanned = set_scan(config, jax.tree.map(np.asarray, params), True)
    kw = dict(block=2, t=t, noise=noise, discard_massive=False)
    jitted = np.asarray(F.extract_features(scanned_config, scanned, x, **kw)).reshape(3, 16, 32)
    scale = np.abs(seen["final_layer"]).max()
    np.testing.assert_allclose(jitted, seen["final_layer"], rtol=1e-5, atol=1e-5 * scale)
    raw = np.asarray(F.extract_features(config, params, x, **kw, modulate=False)).reshape(3, 16, 32)
    assert np.abs(raw - seen["final_layer"]).max() > 0.1 * scale


def test_class_condition_and_flow_noise():
    """A class label changes the modulation (the null class is the default); a flow schedule noises as
    (1 − σ)·x₀ + σ·ε with σ = t / 1000."""
    config = tiny_dit()
    params = randomized(config)
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    noise = jax.random.normal(jax.random.key(2), x.shape)
    kw = dict(block=2, t=300.0, noise=noise, schedule=FlowSchedule())
    null = F.block_input(config, params, x, **kw)
    explicit = F.block_input(config, params, x, **kw, condition={"y": jnp.full((3,), 10)})
    labels = jnp.array([3, 7, 10])
    labelled = F.block_input(config, params, x, **kw, condition={"y": labels})
    np.testing.assert_array_equal(np.asarray(null.shift), np.asarray(explicit.shift))
    assert not np.allclose(np.asarray(null.shift)[:2], np.asarray(labelled.shift)[:2])
    seen = attention_inputs(config, params, 0.7 * x + 0.3 * noise, jnp.full((3,), 300.0), labels)
    ours = np.asarray(F.ditf(labelled)).reshape(3, 16, 32)
    scale = np.abs(seen["final_layer"]).max()
    np.testing.assert_allclose(ours, seen["final_layer"], rtol=1e-5, atol=1e-5 * scale)


def test_massive_channels_are_found_and_zeroed():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 64, 48)).astype(np.float32)  # B N D
    hidden[..., 5] = 3000.0 * (1 + 0.2 * rng.normal(size=(2, 64)))  # on every token, ~3000x the median
    hidden[..., 31] = -800.0 + rng.normal(size=(2, 64))
    hidden[0, :3, 12] = 5000.0  # huge on 3 tokens only: not a massive channel
    np.testing.assert_array_equal(F.massive_channels(hidden), [5, 31])
    np.testing.assert_array_equal(F.massive_channels(hidden, ratio=1e4), [])
    shift, scale = rng.normal(size=(2, 2, 48)).astype(np.float32)
    inputs = F.BlockInput(jnp.asarray(hidden), jnp.asarray(shift), jnp.asarray(scale), 1e-6, (8, 8))
    feats = np.asarray(F.ditf(inputs, discard=F.massive_mask(inputs.hidden))).reshape(2, 64, 48)
    assert (feats[..., [5, 31]] == 0).all()
    kept = hidden.copy()
    kept[..., [5, 31]] = 0.0  # discarded before the LayerNorm, so its statistics come from the other channels
    expected = np.array(modulate(layer_norm(jnp.asarray(kept), 1e-6), jnp.asarray(shift), jnp.asarray(scale)))
    expected[..., [5, 31]] = 0.0
    np.testing.assert_array_equal(feats, expected)
    by_index = np.asarray(F.ditf(inputs, discard=[5, 31])).reshape(2, 64, 48)
    np.testing.assert_array_equal(by_index, feats)
    raw = np.asarray(F.ditf(inputs, modulate_features=False, discard=[5, 31])).reshape(2, 64, 48)
    np.testing.assert_array_equal(raw, kept)


def test_match_recovers_a_known_integer_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 6, 7, 16)).astype(np.float32)
    b = np.roll(a, (2, -3), axis=(1, 2))  # b[i + 2, j − 3] = a[i, j] (cyclically)
    pred = np.asarray(F.match(a, b))
    rows, cols = np.meshgrid(np.arange(6), np.arange(7), indexing="ij")
    true = np.stack([(rows + 2) % 6, (cols - 3) % 7], -1)
    np.testing.assert_array_equal(pred, np.broadcast_to(true, pred.shape))
    np.testing.assert_array_equal(F.match(a[0], 5.0 * b[0]), true)  # cosine: the scale of a feature does not count
    assert F.pck(pred, true[None], 0.1) == 1.0
    assert F.pck(pred + np.array([0, 1]), true[None], 0.1, size=7) == 0.0
    assert F.pck(pred + np.array([0, 1]), true[None], 0.15, size=7) == 1.0
    assert F.pck([[0, 0], [0, 3]], [[0, 0], [0, 0]], 0.5, size=4, valid=[True, False]) == 1.0
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        F.pck(np.zeros((3, 3)), np.zeros((3, 3)), 0.1)


def test_known_warps_move_the_image_as_the_map_says():
    image = np.zeros((1, 16, 16, 1), np.float32)
    image[0, 4, 6] = 1.0
    a, b = F.affine_about_center((16, 16), shift=(2.0, -3.0))
    np.testing.assert_array_equal(F.warp(image, a, b)[0, 6, 3, 0], 1.0)
    a, b = F.affine_about_center((16, 16), angle=90.0)
    v = np.rint(a @ np.array([4.0, 6.0]) + b).astype(int)
    np.testing.assert_allclose(np.asarray(F.warp(image, a, b))[0, v[0], v[1], 0], 1.0, atol=1e-5)
    np.testing.assert_array_equal(v, [9, 4])  # above-left of the centre → below-left: counter-clockwise


def test_bad_requests_get_one_clear_error():
    config = tiny_dit(depth=1)
    params = {}  # every request below is refused before the model runs
    x = jnp.zeros((1, 8, 8, 1))
    with pytest.raises(ValueError, match=r"block=2 is invalid: expected 0 … 1"):
        F.extract_features(config, params, x, block=2, t=100, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"expected model inputs \(B, H, W, 1\)"):
        F.extract_features(config, params, jnp.zeros((1, 8, 8, 3)), block=0, t=100, key=jax.random.key(0))
    with pytest.raises(ValueError, match="pass key="):
        F.extract_features(config, params, x, block=0, t=100)


# ---- a trained model ---------------------------------------------------------------------------------------------

BLOCK, T, PAIRS = 2, 100.0, 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-block DiT (width 32, 8 × 8 digits, one token per pixel) trained with flow matching for 150 steps through
    the public trainer, as the quickstart is; its EMA weights."""
    from dit_jax.runs import load_ema_params
    from dit_jax.train.config import base_config
    from dit_jax.train.trainer import train_and_evaluate

    c = base_config()
    c.model = dict(
        name="DiT-S/2",
        input_size=8,
        patch_size=1,
        in_channels=1,
        num_classes=10,
        hidden_size=32,
        depth=3,
        num_heads=2,
        learn_sigma=False,
        scan_blocks=True,  # compiles faster; the features run the looped layout of the same weights
    )
    c.objective = "flow"
    c.diffusion = dict(weighting="logit_normal")
    c.data = dict(name="digits", image_size=8, num_threads=1, prefetch_buffer_size=16)
    c.optimizer.lr = 2e-3
    c.optimizer.warmup_steps = 20
    c.optimizer.decay = "cosine"
    c.optimizer.grad_clip = 1.0
    c.batch_size = 64
    c.total_steps = 150
    c.ema_decay = 0.99
    c.ema_warmup = True
    c.cfg_dropout_prob = 0.1
    c.log_every = 100
    c.checkpoint_every = 0
    c.sample.enabled = False
    workdir = str(tmp_path_factory.mktemp("ditf_run"))
    start = time.time()
    train_and_evaluate(c, workdir)
    print(f"\ntrained the DiTF test model in {time.time() - start:.1f} s")
    config, params = load_ema_params(workdir)
    return set_scan(config, jax.tree.map(np.asarray, params), False)


def with_massive_activations(params, block, channels, magnitude):
    """A stand-in for the massive activations large DiTs grow, written into the residual stream through the weights:
    block ``block − 1``'s MLP adds, on every token, ``magnitude`` × a content-poor positive mix of its hidden units
    to each channel (opposite signs, different mixes, so their ratio varies over the tokens)."""
    params = jax.tree.map(np.copy, params)
    kernel = params[f"blocks_{block - 1}"]["mlp"]["fc2"]["kernel"]  # hidden D
    rng = np.random.default_rng(1)
    for sign, c in zip((1.0, -1.0), channels):
        kernel[:, c] += sign * magnitude * rng.uniform(0.0, 2.0, kernel.shape[0]) / kernel.shape[0]
    return params


def test_ditf_on_a_trained_model(trained):
    """Without massive activations (a 3-block model trained for seconds grows none) DiTF is the AdaLN modulation alone
    and matches warped digits about as well as the raw features (within 0.03 PCK), both far above the identity
    guess. With two massive channels written into the residual stream raw and modulated-only features fail, and DiTF,
    which finds and discards them, is unaffected: its features are those of the clean model with the same channels
    discarded, bit for bit."""
    config, params = trained
    schedule = FlowSchedule()
    images, warped, maps = F.warped_digits(PAIRS, 8, seed=0)
    key = jax.random.key(0)
    kw = dict(block=BLOCK, t=T, key=key, schedule=schedule)

    inputs = F.block_input(config, params, jnp.asarray(images), **kw)
    magnitude = np.median(np.abs(np.asarray(inputs.hidden)).reshape(-1, 32), axis=0)
    assert F.massive_channels(inputs.hidden).size == 0, "the tiny model has grown massive activations"
    clean = F.correspondence_scores(config, params, images, warped, maps, **kw)
    print(f"no massive activations (largest channel {magnitude.max() / np.median(magnitude):.1f} x the median):", clean)
    assert clean["ditf"] >= clean["identity"] + 0.15
    assert clean["raw"] >= clean["identity"] + 0.15
    assert clean["ditf"] >= clean["raw"] - 0.03  # no massive channel found: DiTF is the modulation alone

    channels = [5, 12]
    planted = with_massive_activations(params, BLOCK, channels, 2e4 * np.median(magnitude))
    inputs = F.block_input(config, planted, jnp.asarray(images), **kw)
    np.testing.assert_array_equal(F.massive_channels(inputs.hidden), channels)
    planted_magnitude = np.median(np.abs(np.asarray(inputs.hidden)).reshape(-1, 32), axis=0)
    ratios = planted_magnitude[channels] / np.median(planted_magnitude)
    massive = F.correspondence_scores(config, planted, images, warped, maps, **kw)
    print(f"two massive channels planted ({ratios[0]:.0f}, {ratios[1]:.0f} x the median):", massive)
    assert massive["ditf"] >= massive["raw"] + 0.1
    assert massive["ditf"] >= massive["modulated"] + 0.1
    both = jnp.concatenate([jnp.asarray(images), jnp.asarray(warped)])
    ours = F.extract_features(config, planted, both, **kw)
    reference = F.extract_features(config, params, both, discard_massive=channels, **kw)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference))


def text_model(family):
    """A tiny PixArt-Σ or SD3 with every parameter re-drawn, a text condition and the modules whose inputs are each
    block's modulated LayerNorm (PixArt: the self-attention; SD3: the image stream's q/k/v projection)."""
    rng = np.random.default_rng(0)
    if family == "pixart":
        config = preset(
            "PixArt-Sigma-XL-2-256x256",
            input_size=8,
            hidden_size=32,
            depth=1,
            num_heads=2,
            caption_channels=16,
            caption_length=4,
            pe_interpolation=1.0,
        )
        condition = {"caption": rng.normal(size=(2, 4, 16)), "caption_mask": np.array([[1, 1, 1, 0], [1, 1, 0, 0]])}
        reads = lambda k: ((f"blocks_{k}", "attn"), "__call__")  # noqa: E731
    else:
        config = preset(
            "SD3-medium",
            input_size=8,
            in_channels=4,
            out_channels=4,
            hidden_size=32,
            depth=1,
            num_heads=2,
            joint_attention_dim=16,
            pooled_projection_dim=8,
            pos_embed_max_size=8,
        )
        condition = {"context": rng.normal(size=(2, 5, 16)), "pooled": rng.normal(size=(2, 8))}
        reads = lambda k: ((f"blocks_{k}", "x_block", "attn"), "project")  # noqa: E731
    condition = {k: jnp.asarray(v, jnp.float32) for k, v in condition.items()}
    return config, randomized(config), condition, reads


@pytest.mark.parametrize("family", ["pixart", "sd3"])
def test_modulated_features_of_text_to_image_families(family):
    config, params, condition, reads = text_model(family)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, config.in_channels))
    noise = jax.random.normal(jax.random.key(2), x.shape)
    schedule = FlowSchedule()
    watch = {reads(k): f"blocks_{k}" for k in range(config.depth)} | {(("final_layer", "linear"), "__call__"): "final"}

    @jax.jit
    def reference(params, x_t, t, condition):
        seen = {}

        def record(next_fun, args, kwargs, context):
            name = watch.get((tuple(context.module.path), context.method_name))
            if name:
                seen[name] = args[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            family_of(config).apply(build(config), params, x_t, t, condition)
        return seen

    seen = reference(params, F.noised(schedule, x, 250.0, noise), jnp.full((2,), 250.0), condition)
    seen = {k: np.asarray(v) for k, v in seen.items()}
    for block, name in [(0, "blocks_0"), (1, "final")]:
        kw = dict(block=block, t=250.0, noise=noise, condition=condition, discard_massive=False, schedule=schedule)
        feats = np.asarray(F.extract_features(config, params, x, **kw)).reshape(2, 16, 32)
        scale = np.abs(seen[name]).max()  # both compiled, differently fused: float32 rounding
        np.testing.assert_allclose(feats, seen[name], rtol=1e-5, atol=1e-5 * scale)
    with pytest.raises(ValueError, match="need condition="):
        F.extract_features(config, params, x, block=0, t=250.0, noise=noise)
