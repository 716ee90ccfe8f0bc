"""CLIP text encoder: parity with transformers CLIPTextModel / CLIPTextModelWithProjection (random weights, legacy
and real EOS pooling, with and without a padding mask), conversion of saved folders both ways, sharding, bf16,
preset sizes against transformers built on the meta device, and error paths."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from parity import assert_bit_exact, assert_trees_equal, check_parity, randomize_encoder_, rel_err, state_dict_numpy

from dit_jax.convert.clip import (
    clip_from_torch,
    clip_to_torch,
    config_from_transformers,
    config_to_transformers,
    write_clip_folder,
)
from dit_jax.convert.rules import ConversionError
from dit_jax.encoders.clip import PRESETS, CLIPTextConfig, CLIPTextEncoder, clip_preset
from dit_jax.parallel.rules import DEFAULT_RULES

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=16)  # fmt: skip
BOS, LEGACY_EOS_TOKEN, REAL_EOS = 62, 63, 7  # legacy configs: the EOS token has the largest id of the vocabulary


def tiny_clip(projection: bool, hidden_act: str = "quick_gelu", eos_token_id: int = 2, seed: int = 0, **overrides):
    """A transformers CLIPTextModel(WithProjection) with every weight drawn afresh (LayerNorm scales 1 ± 0.1, biases
    ±0.1, embeddings N(0, 1), linears N(0, 1/fan_in))."""
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    kw = dict(TINY, projection_dim=24, hidden_act=hidden_act, eos_token_id=eos_token_id, bos_token_id=BOS,
              pad_token_id=1, layer_norm_eps=1e-5)  # fmt: skip
    hf = HFConfig(**{**kw, **overrides})
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(hf).eval()
    return randomize_encoder_(model, seed, norms="layer_norm", unit=("token_embedding", "position_embedding"))


def _config(model) -> CLIPTextConfig:
    """Our config of a transformers model (its config names no architecture until it is saved)."""
    return config_from_transformers(model.config.to_dict(), projection=hasattr(model, "text_projection"))


def _inputs(rng, b: int, length: int, eos: int):
    """Tokenizer-like rows ``<bos> words <eos> <eos>…`` (CLIP-L pads with its EOS) and their masks; the first row
    fills the length."""
    lengths = [length] + [int(rng.integers(3, length + 1)) for _ in range(b - 1)]
    words = rng.integers(3, 60, (b, length))
    words = np.where(words == REAL_EOS, 8, words)
    ids = np.full((b, length), eos)
    mask = np.zeros((b, length), np.int64)
    for r, n in enumerate(lengths):
        ids[r, 0], ids[r, 1 : n - 1] = BOS, words[r, 1 : n - 1]
        mask[r, :n] = 1
    return ids, mask


def _torch_outputs(model, ids, mask):
    """``(last_hidden_state, hidden_states, pooler_output, text_embeds | None)`` as numpy."""
    import torch

    t_ids = torch.as_tensor(np.asarray(ids, np.int64))
    t_mask = None if mask is None else torch.as_tensor(np.asarray(mask, np.int64))
    text_model = getattr(model, "text_model", model)
    with torch.no_grad():
        out = text_model(input_ids=t_ids, attention_mask=t_mask, output_hidden_states=True)
        embeds = None
        if hasattr(model, "text_projection"):
            embeds = model(input_ids=t_ids, attention_mask=t_mask).text_embeds.numpy()
    hidden = tuple(h.numpy() for h in out.hidden_states)
    return out.last_hidden_state.numpy(), hidden, out.pooler_output.numpy(), embeds


def _apply(config):
    return jax.jit(
        lambda p, i, m: CLIPTextEncoder(config).apply({"params": p}, i, m, output_hidden_states=True),
    )


@pytest.mark.parametrize(
    "projection, act, eos_token_id, attn",
    [
        (True, "quick_gelu", 2, "sdpa"),  # SD3's CLIP-L: projected, legacy argmax pooling
        (False, "quick_gelu", 2, "eager"),  # Flux's CLIP-L: pooler_output, no projection
        (True, "gelu", REAL_EOS, "sdpa"),  # bigG-like exact GELU, pooling at the first real EOS id
        (False, "gelu_new", REAL_EOS, "eager"),
    ],
)
def test_parity_with_transformers(projection, act, eos_token_id, attn):
    model = tiny_clip(projection, act, eos_token_id, seed=1, attn_implementation=attn)
    config, params = clip_from_torch(state_dict_numpy(model), config=_config(model))
    assert config.hidden_act == act and config.eos_token_id == eos_token_id
    assert (config.projection_dim is not None) == projection
    apply = _apply(config)
    eos = LEGACY_EOS_TOKEN if eos_token_id == 2 else REAL_EOS
    ids, mask = _inputs(np.random.default_rng(2), 3, 12, eos)
    assert mask.min() == 0  # some rows are padded
    name = f"{'projected' if projection else 'plain'} {act} eos {eos_token_id} ({attn})"
    for m in (None, mask):
        last, hidden, pooled, embeds = _torch_outputs(model, ids, m)
        got = apply(params, ids.astype(np.int32), None if m is None else m.astype(np.int32))
        case = f"{name}, {'masked' if m is not None else 'no mask'}"
        assert got.last_hidden_state.dtype == jnp.float32 and got.last_hidden_state.shape == (3, 12, 32)
        check_parity(f"{case}: last_hidden_state", np.asarray(got.last_hidden_state), last)
        check_parity(f"{case}: hidden_states[-2]", np.asarray(got.penultimate), hidden[-2])
        check_parity(f"{case}: pooler_output", np.asarray(got.pooler_output), pooled)
        assert len(got.hidden_states) == len(hidden) == 4
        for j, h in enumerate(hidden):
            np.testing.assert_allclose(got.hidden_states[j], h, rtol=0, atol=1e-5 * max(1, np.abs(h).max()))
        if projection:
            check_parity(f"{case}: text_embeds", np.asarray(got.text_embeds), embeds)
        else:
            assert got.text_embeds is None
    # the mask matters for padded rows, and pooling picks each row's EOS position
    unmasked = apply(params, ids, None)
    assert rel_err(unmasked.last_hidden_state, _torch_outputs(model, ids, mask)[0]) > 1e-3
    lengths = mask.sum(1)
    np.testing.assert_array_equal(got.pooler_output, np.asarray(got.last_hidden_state)[np.arange(3), lengths - 1])


def test_conversion_round_trip_folders_and_export(tmp_path):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    projected = tiny_clip(True, seed=3)
    plain = tiny_clip(False, seed=4)
    sd = state_dict_numpy(projected)
    assert "text_projection.weight" in sd and "text_model.embeddings.position_ids" not in sd
    config, params = clip_from_torch(sd, config=_config(projected))
    assert_bit_exact(clip_to_torch(config, params), sd)
    assert_trees_equal(params, clip_from_torch(clip_to_torch(config, params), config=config)[1])

    # transformers 5's CLIPTextModel has no text_model. prefix; the Hub layout (and the position_ids buffer of older
    # checkpoints) reads the same
    plain_sd = state_dict_numpy(plain)
    assert "embeddings.token_embedding.weight" in plain_sd
    plain_config, plain_params = clip_from_torch(plain_sd, config=_config(plain))
    assert plain_config.projection_dim is None and "text_projection" not in plain_params
    assert_bit_exact(clip_to_torch(plain_config, plain_params, prefix=""), plain_sd)
    hub = clip_to_torch(plain_config, plain_params)
    hub["text_model.embeddings.position_ids"] = np.arange(16)[None]
    assert_trees_equal(plain_params, clip_from_torch(hub, config=plain_config)[1])

    # saved folders: a pipeline (text_encoder/ found by itself, text_encoder_2/ given), a sharded one; the config
    # (with or without projection) comes from config.json
    plain.save_pretrained(tmp_path / "pipe" / "text_encoder")
    projected.save_pretrained(tmp_path / "pipe" / "text_encoder_2")
    projected.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    for folder, want_config, want_params in (
        (tmp_path / "pipe", plain_config, plain_params),
        (tmp_path / "pipe" / "text_encoder", plain_config, plain_params),
        (tmp_path / "pipe" / "text_encoder_2", config, params),
        (tmp_path / "sharded", config, params),
    ):
        c, p = clip_from_torch(folder)
        assert c == want_config, folder
        assert_trees_equal(want_params, p)
    assert clip_from_torch(tmp_path / "pipe" / "text_encoder_2", dtype="bfloat16")[0].dtype == "bfloat16"

    # a full CLIPModel state dict: the vision tower is ignored; the shapes alone give the config (up to the head
    # count, activation and EOS id)
    full = dict(sd, **{"vision_model.post_layernorm.weight": np.ones(8), "logit_scale": np.zeros(())})
    full["visual_projection.weight"] = np.zeros((24, 8))
    inferred, p = clip_from_torch(full, num_attention_heads=4)
    assert inferred == config
    assert_trees_equal(params, p)

    # exported folders load in transformers and give the same outputs
    ids, mask = _inputs(np.random.default_rng(5), 2, 10, LEGACY_EOS_TOKEN)
    for cls, model, c, p in ((CLIPTextModelWithProjection, projected, config, params),
                             (CLIPTextModel, plain, plain_config, plain_params)):  # fmt: skip
        out = write_clip_folder(tmp_path / f"exported_{cls.__name__}", c, p)
        assert json.loads((out / "config.json").read_text())["architectures"] == [cls.__name__]
        reloaded = cls.from_pretrained(out).eval()
        assert config_from_transformers(reloaded.config.to_dict()) == c
        got, want = _torch_outputs(reloaded, ids, mask), _torch_outputs(model, ids, mask)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)


def test_sharded_remat_and_bfloat16():
    model = tiny_clip(True, "gelu", REAL_EOS, seed=6)
    config, params = clip_from_torch(state_dict_numpy(model), config=_config(model))
    ids, mask = _inputs(np.random.default_rng(7), 4, 16, REAL_EOS)
    apply = lambda c: lambda p, i, m: CLIPTextEncoder(c).apply({"params": p}, i, m)
    want = jax.jit(apply(config))(params, ids, mask)

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    remat = config.replace(remat="full")
    specs = nn.get_partition_spec(
        jax.eval_shape(lambda k: CLIPTextEncoder(remat).init(k, ids, mask), jax.random.key(0))
    )
    shardings = nn.logical_to_mesh_sharding(specs["params"], mesh, DEFAULT_RULES)
    assert shardings["blocks_0"]["mlp"]["fc1"]["kernel"].spec == P("fsdp", "tensor")
    assert shardings["blocks_0"]["attention"]["q"]["kernel"].spec == P("fsdp", "tensor", None)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        p = jax.device_put(params, shardings)
        got = jax.jit(apply(remat), in_shardings=(shardings, batch, batch))(
            p, *(jax.device_put(a, batch) for a in (ids, mask))
        )
    assert len(got.last_hidden_state.sharding.device_set) == 8
    for field in ("last_hidden_state", "penultimate", "pooler_output", "text_embeds"):
        err = rel_err(getattr(got, field), getattr(want, field))
        print(f"sharded (data 2 × fsdp 2 × tensor 2, remat full) vs unsharded {field}: max relative error {err:.1e}")
        assert err <= 1e-5

    last, hidden, pooled, embeds = _torch_outputs(model, ids, mask)
    bf16 = CLIPTextEncoder(config.replace(dtype="bfloat16")).apply({"params": params}, ids, mask)
    for field, ref in (("last_hidden_state", last), ("penultimate", hidden[-2]), ("text_embeds", embeds)):
        assert getattr(bf16, field).dtype == jnp.float32
        err = rel_err(getattr(bf16, field), ref)
        print(f"bf16 compute vs fp32 torch {field}: max relative error {err:.1e}")
        assert err < 5e-2


def test_presets_match_transformers_sizes():
    import torch
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from dit_jax.models import abstract_params, config_from_dict, count_params

    counts = {
        ("clip-vit-large-patch14", True): 123_650_304,  # SD3's text_encoder
        ("clip-vit-large-patch14", False): 123_060_480,  # Flux's text_encoder
        ("clip-vit-bigG-14", True): 694_659_840,  # SD3's and SDXL's text_encoder_2
    }
    for (name, projected), want in counts.items():
        config = clip_preset(name) if projected else clip_preset(name, projection_dim=None)
        assert count_params(abstract_params(config)) == want, name
        hf = HFConfig(**{k: v for k, v in config_to_transformers(config).items() if k not in ("architectures",)})
        with torch.device("meta"):
            model = (CLIPTextModelWithProjection if projected else CLIPTextModel)(hf)
        assert sum(p.numel() for p in model.parameters()) == want, name
        assert config_from_transformers(config_to_transformers(config)) == config
        assert config_from_dict(config.to_dict()) == config
    big = PRESETS["clip-vit-bigG-14"]
    assert (big.hidden_size, big.intermediate_size, big.num_hidden_layers, big.num_attention_heads, big.hidden_act) == (
        1280, 5120, 32, 20, "gelu")  # fmt: skip
    specs = nn.get_partition_spec(abstract_params(big))
    assert specs["blocks_0"]["attention"]["o"]["kernel"] == P("heads", "kv", "embed")
    assert specs["token_embedding"] == P("vocab", "embed")


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        clip_from_torch(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="not a transformers CLIP folder"):
        clip_from_torch(tmp_path / "empty")

    model = tiny_clip(True)
    config = _config(model)
    sd = state_dict_numpy(model)
    bad = dict(sd, **{"text_model.encoder.layers.1.self_attn.q_proj.weight": np.zeros((16, 32), np.float32)})
    with pytest.raises(ConversionError, match=r"layers\.1\.self_attn\.q_proj\.weight: expected \(32, 32\), found"):
        clip_from_torch(bad, config=config)
    missing = {k: v for k, v in sd.items() if "layers.2.mlp.fc2" not in k}
    with pytest.raises(ConversionError, match=r"missing keys:\n  text_model\.encoder\.layers\.2\.mlp\.fc2\.bias"):
        clip_from_torch(missing, config=config)
    with pytest.raises(ConversionError, match=r"unexpected keys:\n  text_model\.encoder\.layers\.3\.extra"):
        clip_from_torch(dict(sd, **{"text_model.encoder.layers.3.extra": np.zeros(3)}), config=config)
    model.save_pretrained(tmp_path / "wrong_arch")  # a projected checkpoint whose config.json says CLIPTextModel
    hf = json.loads((tmp_path / "wrong_arch" / "config.json").read_text())
    (tmp_path / "wrong_arch" / "config.json").write_text(json.dumps(dict(hf, architectures=["CLIPTextModel"])))
    with pytest.raises(ConversionError, match=r"(?s)wrong_arch.*unexpected keys:\n  text_projection\.weight"):
        clip_from_torch(tmp_path / "wrong_arch")
    with pytest.raises(ConversionError, match="model_type='siglip_text_model'"):
        config_from_transformers({"model_type": "siglip_text_model"})

    _, params = clip_from_torch(sd, config=config)
    with pytest.raises(ValueError, match="no text_projection"):
        clip_to_torch(config, params, prefix="")
    write_clip_folder(tmp_path / "out", config, params)
    with pytest.raises(FileExistsError, match="already exists"):
        write_clip_folder(tmp_path / "out", config, params)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # nothing half-written

    with pytest.raises(ValueError, match="hidden_act='relu'"):
        CLIPTextConfig(**TINY, hidden_act="relu")
    with pytest.raises(ValueError, match="hidden_size=30 is invalid: expected a multiple of num_attention_heads=4"):
        CLIPTextConfig(**dict(TINY, hidden_size=30))
    with pytest.raises(ValueError, match="projection_dim=0"):
        CLIPTextConfig(**TINY, projection_dim=0)
    with pytest.raises(ValueError, match="unknown CLIP preset 'clip-l'"):
        clip_preset("clip-l")
    encoder = CLIPTextEncoder(config)
    with pytest.raises(ValueError, match="17 tokens exceed max_position_embeddings=16"):
        encoder.init(jax.random.key(0), jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="attention_mask shape"):
        encoder.init(jax.random.key(0), jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 4), jnp.int32))


def test_generic_converter_takes_t5_and_clip_folders(tmp_path):
    """``dit_jax.convert.from_torch``/``to_torch``/``save_torch`` and the convert CLI handle the text encoders:
    transformers folders (and a pipeline folder's text_encoder/), state dicts, and folders written back."""
    from test_t5 import save_tiny_t5

    from dit_jax import convert
    from dit_jax.checkpoint import load_model
    from dit_jax.convert.__main__ import main as convert_main
    from dit_jax.convert.t5 import t5_from_torch

    clip = tiny_clip(projection=True)
    clip.save_pretrained(tmp_path / "clip")
    want_config, want_params = clip_from_torch(tmp_path / "clip")
    config, params = convert.from_torch(tmp_path / "clip")
    assert config == want_config
    assert_trees_equal(params, want_params)
    assert_bit_exact(convert.to_torch(config, params, format="diffusers"), clip_to_torch(config, params))
    config2, params2 = convert.from_state_dict(state_dict_numpy(clip), diffusers_config=config_to_transformers(config))
    assert_trees_equal(params2, want_params)
    out = convert.save_torch(tmp_path / "clip_back", config, params, format="diffusers")
    assert_trees_equal(convert.from_torch(out)[1], want_params)

    save_tiny_t5(tmp_path / "pipe")
    t5_config, t5_params = t5_from_torch(tmp_path / "pipe")
    config3, params3 = convert.from_torch(tmp_path / "pipe")  # a pipeline folder: its text_encoder/
    assert config3 == t5_config
    assert_trees_equal(params3, t5_params)
    assert convert_main([str(tmp_path / "pipe" / "text_encoder"), str(tmp_path / "t5_dir")]) == 0
    config4, params4 = load_model(tmp_path / "t5_dir")
    assert config4 == t5_config
    assert_trees_equal(params4, t5_params)
