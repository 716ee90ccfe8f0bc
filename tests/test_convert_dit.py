"""DiT conversion: diffusers ``DiTTransformer2DModel`` and original-format checkpoints against their own numerics.

Parity criterion: max abs error ≤ 1e-5 · max(1, max|reference|), fp32 on CPU. Every parameter is re-randomised
(zero-initialised adaLN/output layers would hide mapping bugs). Round trips torch → JAX → torch are bit-exact.
"""

import numpy as np
import pytest
import torch
import torch_reference as ref
from parity import (
    assert_bit_exact,
    check_parity,
    nchw,
    nhwc,
    randomize_,
    randomize_normal_,
    state_dict_numpy,
    state_dict_torch,
)

from dit_jax import convert, models

TINY = dict(  # MODELS.md §7 (tests/models/transformers/test_models_dit_transformer2d.py)
    in_channels=4,
    out_channels=8,
    activation_fn="gelu-approximate",
    num_attention_heads=2,
    attention_head_dim=4,
    attention_bias=True,
    num_layers=1,
    norm_type="ada_norm_zero",
    num_embeds_ada_norm=8,
    patch_size=2,
    sample_size=8,
)
# Larger: depth 3, width 80 with 5 heads (not a published width), no learned sigma, 10 classes.
LARGER = dict(TINY, num_attention_heads=5, attention_head_dim=16, num_layers=3, out_channels=4, num_embeds_ada_norm=10)
LARGER_SAMPLE = 16


def diffusers_dit(cfg: dict, seed: int, original_numerics: bool = False, **kw):
    """A diffusers DiT with every parameter re-randomised and the per-block embedder copies tied (as converted
    checkpoints have them). ``original_numerics``: frequency shift 0 and MLP-norm eps 1e-6 (MODELS.md §1.4)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    m = randomize_normal_(DiTTransformer2DModel(**{**cfg, **kw}).eval(), 0.1)
    for block in m.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(m.transformer_blocks[0].norm1.emb.state_dict())
    if original_numerics:
        for block in m.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 0
            block.norm3.eps = 1e-6
    return m


def inputs(size: int, classes: int, seed: int = 0):
    rs = np.random.RandomState(seed)
    x = rs.randn(2, 4, size, size).astype(np.float32)  # NCHW
    t = np.array([3.0, 711.5], np.float32)
    y = np.array([1, classes], np.int64)  # a class and the null class
    return x, t, y


def run_diffusers(m, x, t, y) -> np.ndarray:
    with torch.no_grad():
        out = m(torch.from_numpy(x), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample
    return out.numpy()


def run_jax(config, params, x, t, y) -> np.ndarray:
    return nchw(models.build(config).apply({"params": params}, nhwc(x), t, y.astype(np.int32)))


def original_from_diffusers(sd: dict, depth: int, input_size: int, patch: int) -> dict:
    """MODELS.md §1.3 mapping, written independently of dit_jax.convert (+ the stored pos_embed)."""
    e = "transformer_blocks.0.norm1.emb."
    o = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "y_embedder.embedding_table.weight": sd[e + "class_embedder.embedding_table.weight"],
        "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
        "final_layer.linear.weight": sd["proj_out_2.weight"],
        "final_layer.linear.bias": sd["proj_out_2.bias"],
    }
    for j, n in ((0, 1), (2, 2)):
        for w in ("weight", "bias"):
            o[f"t_embedder.mlp.{j}.{w}"] = sd[f"{e}timestep_embedder.linear_{n}.{w}"]
    for i in range(depth):
        b = f"transformer_blocks.{i}."
        for w in ("weight", "bias"):
            o[f"blocks.{i}.attn.qkv.{w}"] = np.concatenate([sd[f"{b}attn1.to_{c}.{w}"] for c in "qkv"], 0)
            o[f"blocks.{i}.attn.proj.{w}"] = sd[f"{b}attn1.to_out.0.{w}"]
            o[f"blocks.{i}.mlp.fc1.{w}"] = sd[f"{b}ff.net.0.proj.{w}"]
            o[f"blocks.{i}.mlp.fc2.{w}"] = sd[f"{b}ff.net.2.{w}"]
            o[f"blocks.{i}.adaLN_modulation.1.{w}"] = sd[f"{b}norm1.linear.{w}"]
    d = sd["pos_embed.proj.weight"].shape[0]
    gs = input_size // patch
    o["pos_embed"] = ref.sincos_pos_embed(d, gs, gs)[None]
    return o


# ---- diffusers format ---------------------------------------------------------------------------------------------


def test_diffusers_tiny_parity_and_round_trip(tmp_path):
    m = diffusers_dit(TINY, seed=0)
    m.save_pretrained(tmp_path / "dit")  # config.json + diffusion_pytorch_model.safetensors
    config, params = convert.from_torch(tmp_path / "dit")
    assert (config.depth, config.hidden_size, config.num_heads, config.num_classes) == (1, 8, 2, 8)
    assert config.timestep_freq_shift == 1.0 and config.mlp_norm_eps == 1e-5 and config.learn_sigma
    x, t, y = inputs(8, 8)
    check_parity("DiT diffusers tiny", run_jax(config, params, x, t, y), run_diffusers(m, x, t, y))
    assert_bit_exact(convert.to_torch(config, params, format="diffusers"), state_dict_numpy(m))


def test_diffusers_larger_parity_scan_and_folder_export(tmp_path):
    from diffusers import DiTTransformer2DModel

    m = diffusers_dit(LARGER, seed=1, sample_size=LARGER_SAMPLE)
    m.save_pretrained(tmp_path / "dit", safe_serialization=False)  # the .bin flavour of a diffusers folder
    config, params = convert.from_torch(tmp_path / "dit", scan_blocks=True)
    assert config.scan_blocks and "stage_0" in params and config.num_heads == 5 and not config.learn_sigma
    x, t, y = inputs(LARGER_SAMPLE, 10, seed=1)
    want = run_diffusers(m, x, t, y)
    check_parity("DiT diffusers depth 3 width 80 (scanned)", run_jax(config, params, x, t, y), want)
    # scanned params export to the same state dict; a written folder loads back into diffusers
    assert_bit_exact(convert.to_torch(config, params, format="diffusers"), state_dict_numpy(m))
    out = convert.save_torch(tmp_path / "exported", config, params, format="diffusers")
    m2 = DiTTransformer2DModel.from_pretrained(out).eval()
    np.testing.assert_array_equal(run_diffusers(m2, x, t, y), want)


def test_diffusers_safetensors_without_config_needs_overrides(tmp_path):
    from safetensors.numpy import save_file

    m = diffusers_dit(LARGER, seed=2, sample_size=LARGER_SAMPLE)
    path = tmp_path / "dit.safetensors"
    save_file(state_dict_numpy(m), str(path))
    with pytest.raises(convert.ConversionError, match=r"cannot infer .*num_heads.*input_size") as e:
        convert.from_torch(path)
    print(e.value)
    config, params = convert.from_torch(path, num_heads=5, input_size=LARGER_SAMPLE)
    assert config.timestep_freq_shift == 1.0 and config.mlp_norm_eps == 1e-5
    x, t, y = inputs(LARGER_SAMPLE, 10, seed=2)
    check_parity("DiT diffusers .safetensors + overrides", run_jax(config, params, x, t, y), run_diffusers(m, x, t, y))


def test_diffusers_per_block_embedders_must_agree():
    m = diffusers_dit(LARGER, seed=3, sample_size=LARGER_SAMPLE)
    sd = state_dict_numpy(m)
    sd["transformer_blocks.2.norm1.emb.timestep_embedder.linear_1.bias"] += 1.0
    with pytest.raises(convert.ConversionError, match=r"transformer_blocks\.2\.norm1\.emb\.timestep_embedder"):
        convert.from_state_dict(sd, diffusers_config=dict(m.config, _class_name="DiTTransformer2DModel"))


# ---- original format ----------------------------------------------------------------------------------------------


def test_original_pt_ema_and_model_weights(tmp_path):
    """A diffusers DiT with shift 0 / eps 1e-6 is the original; its §1.3 mapping saved as {"model", "ema", ...}."""
    import argparse

    ema = diffusers_dit(TINY, seed=4, original_numerics=True, num_layers=2)
    raw = diffusers_dit(TINY, seed=5, original_numerics=True, num_layers=2)
    sd_ema = original_from_diffusers(state_dict_numpy(ema), 2, 8, 2)
    sd_raw = original_from_diffusers(state_dict_numpy(raw), 2, 8, 2)
    path = tmp_path / "0100000.pt"
    torch.save(
        {
            "model": state_dict_torch(sd_raw),
            "ema": state_dict_torch(sd_ema),
            "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]},
            "args": argparse.Namespace(model="DiT-tiny", image_size=64),
        },
        path,
    )
    x, t, y = inputs(8, 8, seed=4)
    config, params = convert.from_torch(path, num_heads=2)  # EMA by default
    assert config.timestep_freq_shift == 0.0 and config.mlp_norm_eps == 1e-6 and config.input_size == 8
    check_parity("DiT original .pt (ema)", run_jax(config, params, x, t, y), run_diffusers(ema, x, t, y))
    config_m, params_m = convert.from_torch(path, weights="model", num_heads=2)
    check_parity("DiT original .pt (model)", run_jax(config_m, params_m, x, t, y), run_diffusers(raw, x, t, y))
    assert_bit_exact(convert.to_torch(config, params, format="original"), sd_ema)

    torch.save({"model": state_dict_torch(sd_raw)}, tmp_path / "model_only.pt")
    with pytest.raises(convert.ConversionError, match=r"no 'ema' entry; available keys: \['model'\]"):
        convert.from_torch(tmp_path / "model_only.pt", num_heads=2)


@pytest.mark.filterwarnings("ignore:exporting a DiT")
def test_original_reference_parity_override_and_round_trips(tmp_path):
    """tests/torch_reference.OrigDiT (original key names and numerics) at a non-published width."""
    torch_model = randomize_(
        ref.OrigDiT(input_size=16, patch_size=4, hidden_size=80, depth=2, num_heads=5, num_classes=10), seed=6
    ).eval()
    sd = state_dict_numpy(torch_model)
    path = tmp_path / "DiT-custom.pt"
    torch.save(state_dict_torch(sd), path)
    with pytest.raises(convert.ConversionError, match="num_heads: .*width 80"):
        convert.from_torch(path)
    config, params = convert.from_torch(path, num_heads=5)
    assert (config.input_size, config.patch_size, config.depth, config.num_classes) == (16, 4, 2, 10)
    x, t, y = inputs(16, 10, seed=6)
    with torch.no_grad():
        want = torch_model(*(torch.from_numpy(a) for a in (x, t, y))).numpy()
    check_parity("DiT original (torch reference, width 80, p=4)", run_jax(config, params, x, t, y), want)

    # round trips: .pt and .safetensors, original and diffusers formats, bit-exact
    for fmt, name in (("original", "a.pt"), ("original", "a.safetensors"), ("diffusers", "b.safetensors")):
        out = convert.save_torch(tmp_path / name, config, params, format=fmt)
        c2, p2 = convert.from_torch(out, num_heads=5, input_size=16)
        assert c2.replace(timestep_freq_shift=0.0, mlp_norm_eps=1e-6) == config
        again = convert.to_torch(c2, p2, format=fmt)
        assert_bit_exact(again, convert.to_torch(config, params, format=fmt))
    assert_bit_exact(convert.to_torch(config, params, format="original"), sd)
    with pytest.warns(UserWarning, match="downscale_freq_shift=1: outputs will differ"):
        convert.to_torch(config, params, format="diffusers")


def test_preset_supplies_fields_and_detection():
    sd = state_dict_numpy(ref.OrigDiT(input_size=8, patch_size=2, hidden_size=384, depth=1, num_heads=6))
    family_format = convert.detect(sd)
    assert family_format == ("dit", "original")
    config, _ = convert.from_state_dict(sd)
    assert config.num_heads == 6  # from the published width
    config, _ = convert.from_state_dict(sd, preset="DiT-S/2")
    assert config.num_heads == 6 and config.depth == 1 and config.input_size == 8
    with pytest.raises(ValueError, match="is a PixArtConfig, but"):
        convert.from_state_dict(sd, preset="PixArt-XL-2-256x256")
    with pytest.raises(convert.ConversionError, match="requested but the checkpoint is in the original format"):
        convert.from_state_dict(sd, format="diffusers")
    bad = dict(sd, pos_embed=sd["pos_embed"] + 0.5)  # not the fixed sin-cos table: not silently dropped
    with pytest.raises(convert.ConversionError, match="pe_interpolation: the stored pos_embed is not a sin-cos"):
        convert.from_state_dict(bad)
