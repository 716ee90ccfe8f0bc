"""T5 encoder: parity with transformers T5EncoderModel (random weights), buckets, conversion, sharding, bf16,
the caption TextEncoder on a saved folder, and error paths."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from parity import assert_bit_exact, assert_trees_equal, randomize_encoder_, rel_err, state_dict_numpy

from dit_jax.convert.rules import ConversionError
from dit_jax.convert.t5 import config_from_transformers, config_to_transformers, t5_from_torch, t5_to_torch
from dit_jax.encoders.t5 import PRESETS, T5Config, T5Encoder, relative_position_buckets, t5_preset
from dit_jax.parallel.rules import DEFAULT_RULES
from dit_jax.pipelines import TextEncoder

TINY = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
WORDS = (
    "a",
    "cat",
    "dog",
    "on",
    "the",
    "red",
    "blue",
    "sofa",
    "sitting",
    "photo",
    "of",
    "an",
    "astronaut",
    "riding",
    "horse",
)


def tiny_t5(feed_forward_proj: str = "gated-gelu", seed: int = 0, attn: str = "sdpa", **overrides):
    """A transformers T5EncoderModel with every weight drawn afresh (norm scales 1 ± 0.1, embeddings N(0, 1), linears
    N(0, 1/fan_in))."""
    from transformers import T5Config as HFConfig
    from transformers import T5EncoderModel

    kw = dict(TINY, relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0)
    hf = HFConfig(**{**kw, **overrides}, feed_forward_proj=feed_forward_proj, attn_implementation=attn)
    model = T5EncoderModel(hf).eval()
    return randomize_encoder_(model, seed, norms="layer_norm", unit=("shared", "relative_attention_bias"))


def tiny_tokenizer():
    """A T5 tokenizer (Unigram; ``<pad>`` 0, ``</s>`` 1 appended, ``<unk>`` 2) over a tiny vocabulary, built offline."""
    from transformers import T5Tokenizer

    pieces = ["▁" + w for w in WORDS] + list("abcdefghijklmnopqrstuvwxyz") + ["▁"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -1.0 - 0.01 * i) for i, p in enumerate(pieces)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def save_tiny_t5(root, *, pipeline: bool = True, seed: int = 0):
    """A tiny random T5 + tokenizer saved as a diffusers pipeline (text_encoder/ + tokenizer/) or one folder."""
    model = tiny_t5(seed=seed)
    model_dir = root / "text_encoder" if pipeline else root
    model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(root / "tokenizer" if pipeline else root)
    return model


def _torch_encode(model, ids, mask):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(ids, np.int64)), attention_mask=torch.as_tensor(mask))
    return out.last_hidden_state.numpy()


def _inputs(rng, b: int, length: int, vocab: int = 64):
    ids = rng.integers(0, vocab, (b, length))
    lengths = [length] + [int(rng.integers(1, length + 1)) for _ in range(b - 1)]
    mask = (np.arange(length)[None] < np.array(lengths)[:, None]).astype(np.int64)
    return ids * mask, mask  # padded positions hold <pad> = 0, as a tokenizer gives them


@pytest.mark.parametrize(
    "ff, attn, buckets, lengths",
    [
        ("gated-gelu", "sdpa", (32, 128), (1, 9, 300)),  # T5 v1.1 (XXL's buckets), PixArt-Σ's 300 tokens
        ("relu", "eager", (8, 20), (5, 40)),  # T5 v1.0, offsets past max_distance
        ("gelu", "eager", (16, 32), (17,)),
        ("gated-relu", "sdpa", (8, 16), (12,)),
    ],
)
def test_parity_with_transformers(ff, attn, buckets, lengths):
    model = tiny_t5(
        ff, attn=attn, relative_attention_num_buckets=buckets[0], relative_attention_max_distance=buckets[1]
    )
    config, params = t5_from_torch(model.state_dict(), config=config_from_transformers(model.config.to_dict()))
    assert config.feed_forward_proj == ff and config.relative_attention_num_buckets == buckets[0]
    apply = jax.jit(lambda p, i, m: T5Encoder(config).apply({"params": p}, i, m))
    rng = np.random.default_rng(1)
    for length in lengths:
        ids, mask = _inputs(rng, 3, length)
        want = _torch_encode(model, ids, mask)
        got = apply(params, ids.astype(np.int32), mask.astype(np.int32))
        assert got.dtype == jnp.float32 and got.shape == (3, length, 32)
        err = rel_err(got, want)
        print(f"{ff} ({attn}, buckets {buckets}) length {length}: max relative error {err:.1e}")
        assert err <= 1e-5
    # the mask matters: without it the padded rows differ
    ids, mask = _inputs(np.random.default_rng(2), 3, lengths[-1])
    if mask.min() == 0:
        assert rel_err(apply(params, ids, np.ones_like(mask)), _torch_encode(model, ids, mask)) > 1e-3


def test_relative_position_buckets_match_transformers():
    import torch
    from transformers.models.t5.modeling_t5 import T5Attention

    for num_buckets, max_distance in ((32, 128), (32, 64), (8, 20), (16, 32), (64, 256), (4, 8)):
        got = relative_position_buckets(400, 700, num_buckets, max_distance)
        rel = torch.arange(700)[None, :] - torch.arange(400)[:, None]
        want = T5Attention._relative_position_bucket(rel, True, num_buckets, max_distance).numpy()
        np.testing.assert_array_equal(got, want, err_msg=f"buckets {num_buckets}, max distance {max_distance}")
        assert got.max() == num_buckets - 1 and got.min() == 0


def test_conversion_round_trip_folders_and_export(tmp_path):
    from transformers import T5EncoderModel

    model = tiny_t5("gated-gelu", seed=3)
    sd = state_dict_numpy(model)
    assert "encoder.embed_tokens.weight" in sd
    config, params = t5_from_torch(model.state_dict(), config=config_from_transformers(model.config.to_dict()))
    back = t5_to_torch(config, params)
    assert_bit_exact(back, sd)
    _, again = t5_from_torch(back, config=config)
    assert_trees_equal(params, again)

    # a sharded transformers folder, a pipeline folder (text_encoder/) and a T5ForConditionalGeneration-style dict
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    model.save_pretrained(tmp_path / "pipe" / "text_encoder")
    for folder in (tmp_path / "sharded", tmp_path / "pipe"):
        c, p = t5_from_torch(folder)
        assert c == config
        assert_trees_equal(params, p)
    seq2seq = {k: v for k, v in sd.items() if k != "shared.weight"}
    seq2seq.update({"decoder.block.0.layer.0.SelfAttention.q.weight": sd["shared.weight"][:4], "lm_head.weight": 0})
    assert_trees_equal(params, t5_from_torch(seq2seq, config=config)[1])

    # the weight shapes alone give the config (up to max distance and eps), and an exported folder loads in torch
    inferred = t5_from_torch(sd)[0]
    assert inferred == config
    out = tmp_path / "exported"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config_to_transformers(config)))
    from safetensors.numpy import save_file

    save_file(t5_to_torch(config, params, tied_copy=False), str(out / "model.safetensors"))
    reloaded = T5EncoderModel.from_pretrained(out).eval()
    ids, mask = _inputs(np.random.default_rng(0), 2, 11)
    np.testing.assert_array_equal(_torch_encode(reloaded, ids, mask), _torch_encode(model, ids, mask))


def test_sharded_over_8_devices_equals_unsharded():
    model = tiny_t5("gated-gelu", seed=4)
    config, params = t5_from_torch(model.state_dict(), config=config_from_transformers(model.config.to_dict()))
    ids, mask = _inputs(np.random.default_rng(5), 4, 24)
    apply = lambda p, i, m: T5Encoder(config).apply({"params": p}, i, m)
    want = np.asarray(jax.jit(apply)(params, ids, mask))

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    specs = nn.get_partition_spec(jax.eval_shape(lambda k: T5Encoder(config).init(k, ids, mask), jax.random.key(0)))
    shardings = nn.logical_to_mesh_sharding(specs["params"], mesh, DEFAULT_RULES)
    assert shardings["blocks_0"]["ff"]["wi_0"]["kernel"].spec == P("fsdp", "tensor")
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        p = jax.device_put(params, shardings)
        got = jax.jit(apply, in_shardings=(shardings, batch, batch))(
            p, *(jax.device_put(a, batch) for a in (ids, mask))
        )
    assert len(got.sharding.device_set) == 8
    err = rel_err(got, want)
    print(f"sharded (data 2 × fsdp 2 × tensor 2) vs unsharded: max relative error {err:.1e}")
    assert err <= 1e-5


def test_bfloat16_compute_stays_close():
    model = tiny_t5("gated-gelu", seed=6)
    config, params = t5_from_torch(model.state_dict(), config=config_from_transformers(model.config.to_dict()))
    ids, mask = _inputs(np.random.default_rng(7), 3, 30)
    want = _torch_encode(model, ids, mask)
    got = T5Encoder(config.replace(dtype="bfloat16")).apply({"params": params}, ids, mask)
    assert got.dtype == jnp.float32
    err = rel_err(got, want)
    print(f"bf16 compute vs fp32 torch: max relative error {err:.1e}")
    assert err < 5e-2


def test_text_encoder_on_saved_folders_matches_torch(tmp_path):
    from dit_jax.checkpoint import save_model

    model = save_tiny_t5(tmp_path / "pipe")
    tok = tiny_tokenizer()
    captions = ["a cat on the red sofa", "", "photo of an astronaut riding a horse on the blue sofa sitting xyz!"] * 3
    enc = TextEncoder.from_pretrained(tmp_path / "pipe", max_length=16, dtype="float32", batch_size=4)
    assert enc.batch_size == 8 and enc.config.num_layers == 2 and "max_length=16" in enc.name
    emb, mask = enc(captions)  # 9 captions: two sharded batches of 8, the second padded
    ref = tok(captions, max_length=16, padding="max_length", truncation=True, return_tensors="np")
    assert emb.shape == (9, 16, 32) and emb.dtype == np.float32 and mask.dtype == np.int32
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    assert mask[1].sum() == 1 and mask[2].sum() == 16  # "" is just </s>; the long caption is truncated
    want = _torch_encode(model, ref["input_ids"], ref["attention_mask"])
    err = rel_err(emb, want)
    print(f"TextEncoder (fp32) vs torch on the same tokens: max relative error {err:.1e}")
    assert err <= 1e-5
    assert enc([])[0].shape == (0, 16, 32)

    # bf16 compute (kernels stored in bf16), and a dit_jax model directory with the tokenizer given
    bf16 = TextEncoder.from_pretrained(tmp_path / "pipe", max_length=16)
    assert bf16.params["blocks_0"]["ff"]["wo"]["kernel"].dtype == jnp.bfloat16
    assert rel_err(bf16(captions)[0], want) < 5e-2
    config, params = t5_from_torch(tmp_path / "pipe")
    # its kernels were made bf16 as they were read (kernel_dtype): the params and features of a cast after import
    cast_after = TextEncoder(config.replace(dtype="bfloat16"), params, tok, max_length=16)
    assert_trees_equal(jax.device_get(bf16.params), jax.device_get(cast_after.params))
    np.testing.assert_array_equal(bf16(captions)[0], cast_after(captions)[0])
    _, as_read = t5_from_torch(tmp_path / "pipe", kernel_dtype=jnp.bfloat16)
    dtypes = {p[-1].key: x.dtype for p, x in jax.tree_util.tree_leaves_with_path(as_read)}
    assert dtypes["kernel"] == jnp.bfloat16 and dtypes["scale"] == np.float32 and dtypes["shared"] == np.float32
    save_model(tmp_path / "t5_model", config, params)
    local = TextEncoder.from_pretrained(tmp_path / "t5_model", tokenizer=tmp_path / "pipe" / "tokenizer",
                                        max_length=16, dtype="float32")  # fmt: skip
    np.testing.assert_allclose(local(captions)[0], emb, rtol=0, atol=1e-6)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        TextEncoder.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        t5_from_torch(tmp_path / "nowhere")
    tiny_t5().save_pretrained(tmp_path / "no_tokenizer")
    with pytest.raises(FileNotFoundError, match="no tokenizer found"):
        TextEncoder.from_pretrained(tmp_path / "no_tokenizer")
    tiny_t5().save_pretrained(tmp_path / "bad_tokenizer" / "text_encoder")
    (tmp_path / "bad_tokenizer" / "tokenizer").mkdir()
    (tmp_path / "bad_tokenizer" / "tokenizer" / "spiece.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match=r"cannot load the tokenizer \(a folder with only spiece.model"):
        TextEncoder.from_pretrained(tmp_path / "bad_tokenizer")
    tiny_t5(vocab_size=40).save_pretrained(tmp_path / "small_vocab")
    tiny_tokenizer().save_pretrained(tmp_path / "small_vocab")
    with pytest.raises(ValueError, match="the tokenizer has 45 tokens, the encoder only 40"):
        TextEncoder.from_pretrained(tmp_path / "small_vocab")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="not a transformers T5 folder"):
        t5_from_torch(tmp_path / "empty")

    model = tiny_t5()
    config = config_from_transformers(model.config.to_dict())
    sd = state_dict_numpy(model)
    bad = dict(sd, **{"encoder.block.1.layer.0.SelfAttention.q.weight": np.zeros((16, 32), np.float32)})
    with pytest.raises(ConversionError, match=r"block\.1\.layer\.0\.SelfAttention\.q\.weight: expected \(32, 32\)"):
        t5_from_torch(bad, config=config)
    missing = {k: v for k, v in sd.items() if "block.1.layer.1.DenseReluDense.wi_1" not in k}
    with pytest.raises(ConversionError, match=r"missing keys:\n  encoder\.block\.1\.layer\.1\.DenseReluDense\.wi_1"):
        t5_from_torch(missing, config=config)
    with pytest.raises(ConversionError, match=r"unexpected keys:\n  encoder\.block\.2\.extra"):
        t5_from_torch(dict(sd, **{"encoder.block.2.extra": np.zeros(3)}), config=config)
    untied = dict(sd, **{"encoder.embed_tokens.weight": sd["shared.weight"] + 1})
    with pytest.raises(ConversionError, match="differs from shared.weight"):
        t5_from_torch(untied, config=config)
    with pytest.raises(ConversionError, match="model_type='bart'"):  # umt5 is supported (test_text_encoders_more)
        config_from_transformers({"model_type": "bart"})
    with pytest.raises(ValueError, match="feed_forward_proj='swish'"):
        T5Config(**TINY, feed_forward_proj="swish")
    with pytest.raises(ValueError, match="unknown T5 preset 'xxl'"):
        t5_preset("xxl")
    with pytest.raises(ValueError, match="attention_mask shape"):
        T5Encoder(config).init(jax.random.key(0), jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 4), jnp.int32))


def test_xxl_preset_size_and_shardable_abstract_params():
    from dit_jax.models import abstract_params, config_from_dict, count_params

    xxl = PRESETS["t5-v1_1-xxl"]
    assert (xxl.d_model, xxl.d_kv, xxl.d_ff, xxl.num_layers, xxl.num_heads, xxl.vocab_size) == (
        4096, 64, 10240, 24, 64, 32128)  # fmt: skip
    abstract = abstract_params(xxl)
    assert count_params(abstract) == 4_762_310_656  # 19.0 GB as float32
    specs = nn.get_partition_spec(abstract)
    assert specs["blocks_0"]["attention"]["q"]["kernel"] == P("embed", "heads", "kv")
    assert specs["shared"] == P("vocab", "embed")
    assert config_from_dict(xxl.to_dict()) == xxl
