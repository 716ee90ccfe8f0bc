"""PixArt conversion: diffusers ``PixArtTransformer2DModel`` and original-format checkpoints (incl. qk-norm, KV
compression and α's learned null caption) against their references.

Parity criterion: max abs error ≤ 1e-5 · max(1, max|reference|), fp32 on CPU, every parameter re-randomised.
"""

import json

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

BASE = dict(
    in_channels=4,
    out_channels=8,
    attention_bias=True,
    activation_fn="gelu-approximate",
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    patch_size=2,
)
# MODELS.md §7: no caption projection (captions of width 8 go straight to attn2), no micro-conditions.
TINY = dict(
    BASE,
    sample_size=8,
    num_layers=1,
    attention_head_dim=2,
    num_attention_heads=2,
    cross_attention_dim=8,
    num_embeds_ada_norm=8,
    use_additional_conditions=False,
    caption_channels=None,
)
# MODELS.md §7 pipeline tiny + micro-conditions and interpolation_scale 2.
PIPE = dict(
    BASE,
    sample_size=8,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=3,
    caption_channels=32,
    cross_attention_dim=24,
    num_embeds_ada_norm=1000,
    use_additional_conditions=True,
    interpolation_scale=2,
)
# Larger: depth 3, width 96 = 4 heads × 24 (not a published width), defaults for interpolation (→ 1).
LARGER = dict(PIPE, sample_size=16, num_layers=3, attention_head_dim=24, num_attention_heads=4, caption_channels=40)
LARGER.pop("interpolation_scale")
LARGER["cross_attention_dim"] = 96


def diffusers_pixart(cfg: dict, seed: int):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return randomize_normal_(PixArtTransformer2DModel(**cfg).eval(), 0.1)


def inputs(height: int, width: int, caption_len: int, caption_width: int, seed: int = 0):
    rs = np.random.RandomState(seed)
    x = rs.randn(2, 4, height, width).astype(np.float32)  # NCHW
    t = np.array([5.0, 633.5], np.float32)
    caption = rs.randn(2, caption_len, caption_width).astype(np.float32)
    mask = np.ones((2, caption_len), np.int64)
    mask[1, caption_len // 2 :] = 0  # padded caption tokens
    hw = np.array([[8.0 * height, 8.0 * width]] * 2, np.float32)
    ar = hw[:, :1] / hw[:, 1:]
    return x, t, caption, mask, hw, ar


def run_diffusers(m, x, t, caption, mask, hw, ar) -> np.ndarray:
    micro = m.config.use_additional_conditions or (
        m.config.use_additional_conditions is None and m.config.sample_size == 128
    )
    added = {"resolution": torch.from_numpy(hw), "aspect_ratio": torch.from_numpy(ar)} if micro else None
    with torch.no_grad():
        out = m(
            torch.from_numpy(x),
            encoder_hidden_states=torch.from_numpy(caption),
            timestep=torch.from_numpy(t),
            encoder_attention_mask=torch.from_numpy(mask),
            added_cond_kwargs=added or {"resolution": None, "aspect_ratio": None},
        ).sample
    return out.numpy()


def run_jax(config, params, x, t, caption, mask, hw, ar, drop=None) -> np.ndarray:
    micro = (hw, ar) if config.micro_conditions else (None, None)
    out = models.build(config).apply({"params": params}, nhwc(x), t, caption, mask, *micro, drop_caption=drop)
    return nchw(out)


def original_from_diffusers(sd: dict, depth: int, grid: int, interpolation: float) -> dict:
    """MODELS.md §2.3 mapping backwards, written independently of dit_jax.convert (+ pos_embed)."""
    o = {}

    def mlp(dst, src, names=("0", "2")):
        for n, s in zip(names, ("linear_1", "linear_2")):
            for w in ("weight", "bias"):
                o[f"{dst}.{n}.{w}"] = sd[f"{src}.{s}.{w}"]

    for w in ("weight", "bias"):
        o[f"x_embedder.proj.{w}"] = sd[f"pos_embed.proj.{w}"]
        o[f"t_block.1.{w}"] = sd[f"adaln_single.linear.{w}"]
        o[f"final_layer.linear.{w}"] = sd[f"proj_out.{w}"]
    o["final_layer.scale_shift_table"] = sd["scale_shift_table"]
    mlp("t_embedder.mlp", "adaln_single.emb.timestep_embedder")
    if "caption_projection.linear_1.weight" in sd:
        mlp("y_embedder.y_proj", "caption_projection", ("fc1", "fc2"))
    if "adaln_single.emb.resolution_embedder.linear_1.weight" in sd:
        mlp("csize_embedder.mlp", "adaln_single.emb.resolution_embedder")
        mlp("ar_embedder.mlp", "adaln_single.emb.aspect_ratio_embedder")
    for i in range(depth):
        b, n = f"transformer_blocks.{i}", f"blocks.{i}"
        o[f"{n}.scale_shift_table"] = sd[f"{b}.scale_shift_table"]
        for w in ("weight", "bias"):
            o[f"{n}.attn.qkv.{w}"] = np.concatenate([sd[f"{b}.attn1.to_{c}.{w}"] for c in "qkv"], 0)
            o[f"{n}.attn.proj.{w}"] = sd[f"{b}.attn1.to_out.0.{w}"]
            o[f"{n}.cross_attn.q_linear.{w}"] = sd[f"{b}.attn2.to_q.{w}"]
            o[f"{n}.cross_attn.kv_linear.{w}"] = np.concatenate([sd[f"{b}.attn2.to_{c}.{w}"] for c in "kv"], 0)
            o[f"{n}.cross_attn.proj.{w}"] = sd[f"{b}.attn2.to_out.0.{w}"]
            o[f"{n}.mlp.fc1.{w}"] = sd[f"{b}.ff.net.0.proj.{w}"]
            o[f"{n}.mlp.fc2.{w}"] = sd[f"{b}.ff.net.2.{w}"]
    d = sd["pos_embed.proj.weight"].shape[0]
    o["pos_embed"] = ref.sincos_pos_embed(d, grid, grid, base_size=grid, interpolation=interpolation)[None]
    return o


# ---- diffusers format ---------------------------------------------------------------------------------------------


def test_diffusers_tiny_no_caption_projection(tmp_path):
    m = diffusers_pixart(TINY, seed=0)
    m.save_pretrained(tmp_path / "pixart")
    config, params = convert.from_torch(tmp_path / "pixart")
    assert config.caption_channels is None and config.cross_attention_dim == 8 and not config.micro_conditions
    assert config.pe_interpolation == 1.0 and not config.learned_null_caption
    args = inputs(8, 8, 6, 8)
    check_parity(
        "PixArt diffusers tiny (no caption projection)", run_jax(config, params, *args), run_diffusers(m, *args)
    )
    assert_bit_exact(convert.to_torch(config, params, format="diffusers"), state_dict_numpy(m))


def test_diffusers_pipeline_folder_micro_conditions_non_square(tmp_path):
    """A pipeline folder (model_index.json + transformer/), micro-conditions, interpolation 2, 8×12 latents, masks."""
    m = diffusers_pixart(PIPE, seed=1)
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
    m.save_pretrained(tmp_path / "pipe" / "transformer")
    config, params = convert.from_torch(tmp_path / "pipe")
    assert config.micro_conditions and config.pe_interpolation == 2.0 and config.caption_channels == 32
    args = inputs(8, 12, 7, 32, seed=1)
    want = run_diffusers(m, *args)
    check_parity(
        "PixArt diffusers pipeline tiny (micro-cond, interp 2, 8x12, mask)", run_jax(config, params, *args), want
    )
    assert_bit_exact(convert.to_torch(config, params, format="diffusers"), state_dict_numpy(m))


def test_diffusers_larger_sharded_and_exported_folder(tmp_path):
    from diffusers import PixArtTransformer2DModel

    m = diffusers_pixart(LARGER, seed=2)
    m.save_pretrained(tmp_path / "pixart", max_shard_size="200KB")  # sharded safetensors + index
    assert (tmp_path / "pixart" / "diffusion_pytorch_model.safetensors.index.json").exists()
    config, params = convert.from_torch(tmp_path / "pixart", scan_blocks=True)
    assert config.num_heads == 4 and config.hidden_size == 96 and config.pe_interpolation == 1.0
    args = inputs(16, 24, 9, 40, seed=2)
    want = run_diffusers(m, *args)
    check_parity("PixArt diffusers depth 3 width 96 (sharded, scanned, 16x24)", run_jax(config, params, *args), want)
    out = convert.save_torch(tmp_path / "exported", config, params, format="diffusers")
    m2 = PixArtTransformer2DModel.from_pretrained(out).eval()
    np.testing.assert_array_equal(run_diffusers(m2, *args), want)
    assert_bit_exact(convert.to_torch(config, params, format="diffusers"), state_dict_numpy(m))


# ---- original format ----------------------------------------------------------------------------------------------


def test_original_from_diffusers_mapping_with_null_caption(tmp_path):
    """diffusers ≡ original (MODELS.md §2.3): map the state dict to original keys + y_embedding + pos_embed."""
    m = diffusers_pixart(PIPE, seed=3)
    sd = original_from_diffusers(state_dict_numpy(m), depth=2, grid=4, interpolation=2.0)
    caption_len = 7
    sd["y_embedder.y_embedding"] = np.random.RandomState(3).randn(caption_len, 32).astype(np.float32)
    path = tmp_path / "PixArt-tiny.pth"
    torch.save({"state_dict": state_dict_torch(sd)}, path)
    config, params = convert.from_torch(path, num_heads=3)
    assert (config.input_size, config.pe_interpolation, config.caption_length) == (8, 2.0, caption_len)
    assert config.learned_null_caption and config.micro_conditions

    x, t, caption, mask, hw, ar = inputs(8, 12, caption_len, 32, seed=3)
    want = run_diffusers(m, x, t, caption, mask, hw, ar)
    check_parity("PixArt original (mapped from diffusers)", run_jax(config, params, x, t, caption, mask, hw, ar), want)
    # the learned null caption: dropping row 0's caption = feeding y_embedding to the diffusers model
    null_caption = caption.copy()
    null_caption[0] = sd["y_embedder.y_embedding"]
    want = run_diffusers(m, x, t, null_caption, mask, hw, ar)
    drop = np.array([True, False])
    got = run_jax(config, params, x, t, caption, mask, hw, ar, drop=drop)
    check_parity("PixArt original, learned null caption", got, want)

    for name in ("a.pth", "a.safetensors"):
        out = convert.save_torch(tmp_path / name, config, params, format="original")
        back, _, _ = convert.read_checkpoint(out)
        assert_bit_exact(back, sd)
    with pytest.warns(UserWarning, match="no learned null caption"):
        exported = convert.to_torch(config, params, format="diffusers")
    assert_bit_exact(exported, state_dict_numpy(m))


def test_original_reference_qk_norm_kv_compress(tmp_path):
    """tests/torch_reference.OrigPixArtMS with qk-norm and conv KV compression on layers 1–2 of 3."""
    kv = {"sampling": "conv", "scale_factor": 2, "kv_compress_layer": [1, 2]}
    torch_model = ref.OrigPixArtMS(
        input_size=8,
        patch_size=2,
        hidden_size=48,
        depth=3,
        num_heads=4,
        caption_channels=16,
        model_max_length=6,
        pe_interpolation=0.5,
        qk_norm=True,
        kv_compress_config=kv,
    )
    torch_model = randomize_(torch_model, seed=4).eval()
    sd = state_dict_numpy(torch_model)
    assert "blocks.1.attn.sr.weight" in sd and "blocks.0.attn.q_norm.weight" in sd
    path = tmp_path / "sigma-kv.safetensors"
    from safetensors.numpy import save_file

    save_file(sd, str(path))
    config, params = convert.from_torch(path, num_heads=4)
    assert config.qk_norm and config.kv_compress_layers == (1, 2) and config.kv_compress_ratio == 2
    assert config.pe_interpolation == 0.5 and config.caption_length == 6
    x, t, caption, mask, _, _ = inputs(8, 12, 6, 16, seed=4)
    drop = np.array([False, True])
    with torch.no_grad():
        want = torch_model(
            *(torch.from_numpy(a) for a in (x, t, caption, mask)), force_drop_ids=torch.from_numpy(drop.astype(int))
        ).numpy()
    got = run_jax(config, params, x, t, caption, mask, None, None, drop=drop)
    check_parity("PixArt original (torch reference, qk-norm, KV compress 1-2, 8x12)", got, want)
    assert_bit_exact(convert.to_torch(config, params, format="original"), sd)
    with pytest.raises(convert.ConversionError, match="no KV compression"):
        convert.to_torch(config, params, format="diffusers")


def test_pe_interpolation_inference():
    def sd_for(interp, grid=4, d=24):
        m = ref.OrigPixArtMS(
            input_size=2 * grid, patch_size=2, hidden_size=d, depth=1, num_heads=3, caption_channels=8,
            model_max_length=4, pe_interpolation=interp,
        )  # fmt: skip
        return state_dict_numpy(m)

    for interp in (0.5, 1.0, 2.0, 4.0):
        config, _ = convert.from_state_dict(sd_for(interp), num_heads=3)
        assert config.pe_interpolation == interp
    sd = sd_for(1.0, grid=1)  # a 1×1 grid fits every interpolation
    with pytest.raises(convert.ConversionError, match="pe_interpolation: the stored pos_embed fits several"):
        convert.from_state_dict(sd, num_heads=3)
    assert convert.from_state_dict(sd, pe_interpolation=3.0, num_heads=3)[0].pe_interpolation == 3.0
    sd = sd_for(1.0)
    sd["pos_embed"] = sd["pos_embed"] + 0.5
    with pytest.raises(convert.ConversionError, match="matches no sin-cos table"):
        convert.from_state_dict(sd, num_heads=3)
    del sd["pos_embed"]
    with pytest.raises(convert.ConversionError, match="input_size: the checkpoint stores no pos_embed"):
        convert.from_state_dict(sd, num_heads=3)
    config, _ = convert.from_state_dict(sd, preset="PixArt-XL-2-512x512", num_heads=3)
    assert (config.input_size, config.pe_interpolation, config.hidden_size) == (64, 1.0, 24)
