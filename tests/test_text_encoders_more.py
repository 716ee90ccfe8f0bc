"""Hunyuan-DiT's and Wan's text encoders: BERT, mT5 and UMT5 against transformers ``BertModel``, ``MT5EncoderModel``
and ``UMT5EncoderModel`` (tiny configs, every weight re-drawn, padding masks), UMT5's per-layer position bias, exact
export round trips, ``TextEncoder`` on saved folders, error paths and the real presets' sizes."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from parity import assert_bit_exact, assert_trees_equal, randomize_encoder_, rel_err, state_dict_numpy

from dit_jax.convert import from_state_dict, from_torch, save_torch, to_torch
from dit_jax.convert.bert import bert_from_torch, bert_to_torch, config_from_transformers
from dit_jax.convert.rules import ConversionError
from dit_jax.convert.t5 import t5_from_torch, t5_to_torch
from dit_jax.encoders.bert import BertConfig, BertEncoder, bert_preset
from dit_jax.encoders.t5 import T5Config, T5Encoder, t5_preset
from dit_jax.pipelines import TextEncoder

BERT_TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                 max_position_embeddings=80, type_vocab_size=2)  # fmt: skip
T5_TINY = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4)
BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "dog", "on", "the", "red", "sofa", "photo",
              "of", "##s", "猫", "狗", "红", "的", "沙", "发", "上"]  # fmt: skip
T5_WORDS = ("a", "cat", "dog", "on", "the", "red", "sofa", "photo", "of", "an", "astronaut", "riding", "horse")
CAPTIONS = ["a cat on the red sofa", "", "红的猫 on the 沙发上 photo of a dog dog dog dog dog dog dog dog", "狗"] * 2


# ---- references ------------------------------------------------------------------------------------------------


def tiny_bert(seed: int = 0, attn: str = "sdpa", pooler: bool = True, **overrides):
    """A transformers BertModel with every weight drawn afresh (LayerNorm scales 1 ± 0.1, embedding tables N(0, 1),
    biases ±0.1, linears N(0, 1/fan_in))."""
    from transformers import BertConfig as HFConfig
    from transformers import BertModel

    hf = HFConfig(**{**BERT_TINY, **overrides}, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  attn_implementation=attn)  # fmt: skip
    model = BertModel(hf, add_pooling_layer=pooler).eval()
    return randomize_encoder_(model, seed, norms="LayerNorm", unit=("_embeddings",))


def tiny_t5(kind: str, seed: int = 0, attn: str = "sdpa", **overrides):
    """A transformers MT5EncoderModel or UMT5EncoderModel (``kind``), every weight drawn afresh."""
    import transformers

    name = {"mt5": "MT5", "umt5": "UMT5"}[kind]
    hf = getattr(transformers, f"{name}Config")(**{**T5_TINY, **overrides}, dropout_rate=0.0, attn_implementation=attn)
    model = getattr(transformers, f"{name}EncoderModel")(hf).eval()
    return randomize_encoder_(model, seed, norms="layer_norm", unit=("shared", "relative_attention_bias"))


def bert_tokenizer():
    """A BERT WordPiece tokenizer over a tiny bilingual vocabulary (Chinese characters are one token each)."""
    from transformers import BertTokenizer

    return BertTokenizer(vocab={w: i for i, w in enumerate(BERT_WORDS)})


def t5_tokenizer():
    """A T5 (Unigram) tokenizer over a tiny vocabulary: ``<pad>`` 0, ``</s>`` 1 appended, ``<unk>`` 2."""
    from transformers import T5Tokenizer

    pieces = ["▁" + w for w in T5_WORDS] + list("abcdefghijklmnopqrstuvwxyz") + ["▁"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -1.0 - 0.01 * i) for i, p in enumerate(pieces)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def torch_encode(model, ids, mask, token_type_ids=None):
    """``(last_hidden_state, pooler_output or None)`` of a transformers encoder, as numpy."""
    import torch

    kw = {} if token_type_ids is None else {"token_type_ids": torch.as_tensor(np.asarray(token_type_ids, np.int64))}
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(ids, np.int64)), attention_mask=torch.as_tensor(mask), **kw)
    pooled = getattr(out, "pooler_output", None)
    return out.last_hidden_state.numpy(), None if pooled is None else pooled.numpy()


def padded_inputs(rng, b: int, length: int, vocab: int = 64):
    """Random ids (b, length) with rows padded (id 0) after a random length; the first row is full."""
    ids = rng.integers(1, vocab, (b, length))
    lengths = [length] + [int(rng.integers(1, length + 1)) for _ in range(b - 1)]
    mask = (np.arange(length)[None] < np.array(lengths)[:, None]).astype(np.int64)
    return ids * mask, mask


def import_public(model):
    """``(config, params)`` through ``dit_jax.convert.from_state_dict`` with the model's transformers config."""
    return from_state_dict(state_dict_numpy(model), diffusers_config=model.config.to_dict())


# ---- parity ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "act, attn, pooler, lengths",
    [("gelu", "sdpa", True, (9, 77)), ("gelu_new", "eager", False, (13,))],  # 77: Hunyuan's BERT tokens
)
def test_bert_parity_with_transformers(act, attn, pooler, lengths):
    model = tiny_bert(seed=1, attn=attn, pooler=pooler, hidden_act=act)
    config, params = import_public(model)
    assert (config.family, config.hidden_act, config.add_pooling_layer, config.layer_norm_eps) == (
        "bert", act, pooler, 1e-12)  # fmt: skip
    apply = jax.jit(lambda p, i, m, t: BertEncoder(config).apply({"params": p}, i, m, t, return_pooled=pooler))
    rng = np.random.default_rng(2)
    for length in lengths:
        ids, mask = padded_inputs(rng, 3, length)
        types = (rng.random((3, length)) < 0.5).astype(np.int64) * mask * (length == lengths[-1])  # 0 or 0/1
        want, want_pooled = torch_encode(model, ids, mask, types)
        got = apply(params, ids, mask, types)
        got, got_pooled = got if pooler else (got, None)
        assert got.dtype == jnp.float32 and got.shape == (3, length, 32)
        err = rel_err(got, want)
        print(f"BERT {act} ({attn}) length {length}{' with token types' if types.any() else ''}: "
              f"max relative error {err:.1e}")  # fmt: skip
        assert err <= 1e-5
        if pooler:
            assert rel_err(got_pooled, want_pooled) <= 1e-5
    # the mask matters: without it the padded rows differ
    ids, mask = padded_inputs(np.random.default_rng(3), 3, lengths[-1])
    assert mask.min() == 0
    got = apply(params, ids, np.ones_like(mask), np.zeros_like(mask))
    assert rel_err(got[0] if pooler else got, torch_encode(model, ids, mask)[0]) > 1e-3
    # bfloat16 compute stays close (norms, softmax and the residual stream in float32)
    bf16 = jax.jit(lambda p, i, m: BertEncoder(config.replace(dtype="bfloat16")).apply({"params": p}, i, m))
    bf16 = bf16(params, ids, mask)  # the hidden state only
    assert bf16.dtype == jnp.float32 and rel_err(bf16, torch_encode(model, ids, mask)[0]) < 5e-2


@pytest.mark.parametrize(
    "kind, attn, buckets, lengths",
    [
        ("mt5", "sdpa", (32, 128), (9, 256)),  # Hunyuan-DiT's mT5: 256 tokens
        ("umt5", "sdpa", (32, 128), (512,)),  # Wan's UMT5: 512 tokens
        ("umt5", "eager", (8, 20), (40,)),  # offsets past max_distance
    ],
)
def test_mt5_umt5_parity_with_transformers(kind, attn, buckets, lengths):
    model = tiny_t5(kind, seed=4, attn=attn, relative_attention_num_buckets=buckets[0],
                    relative_attention_max_distance=buckets[1])  # fmt: skip
    config, params = import_public(model)
    assert (config.model_type, config.relative_bias_per_layer) == (kind, kind == "umt5")
    assert config.feed_forward_proj == "gated-gelu" and config.relative_attention_num_buckets == buckets[0]
    apply = jax.jit(lambda p, i, m: T5Encoder(config).apply({"params": p}, i, m))
    rng = np.random.default_rng(5)
    for length in lengths:
        ids, mask = padded_inputs(rng, 3, length)
        want = torch_encode(model, ids, mask)[0]
        got = apply(params, ids, mask)
        assert got.dtype == jnp.float32 and got.shape == (3, length, 32)
        err = rel_err(got, want)
        print(f"{kind} ({attn}, buckets {buckets}) length {length}: max relative error {err:.1e}")
        assert err <= 1e-5
    ids, mask = padded_inputs(np.random.default_rng(6), 3, lengths[-1])
    assert mask.min() == 0 and rel_err(apply(params, ids, np.ones_like(mask)), torch_encode(model, ids, mask)[0]) > 1e-3


def test_umt5_needs_its_bias_in_every_layer():
    """Only block 0's table (T5's sharing) is not UMT5: the output moves far; and torch's UMT5 with every block's table
    set to block 0's equals that shared variant, so the difference is exactly the per-layer tables."""
    import torch

    model = tiny_t5("umt5", seed=7)
    config, params = import_public(model)
    tables = [params[f"blocks_{i}"]["relative_attention_bias"] for i in range(config.num_layers)]
    assert "relative_attention_bias" not in params and not np.array_equal(tables[0], tables[1])
    ids, mask = padded_inputs(np.random.default_rng(8), 3, 30)
    want = torch_encode(model, ids, mask)[0]
    apply = jax.jit(lambda c, p: T5Encoder(c).apply({"params": p}, ids, mask), static_argnums=0)
    assert rel_err(apply(config, params), want) <= 1e-5

    shared_config = config.replace(model_type="mt5", relative_bias_per_layer=False)
    shared = {k: {n: w for n, w in v.items() if n != "relative_attention_bias"} if k.startswith("blocks_") else v
              for k, v in params.items()}  # fmt: skip
    shared["relative_attention_bias"] = tables[0]
    only_first = apply(shared_config, shared)
    err = rel_err(only_first, want)
    print(f"UMT5 with block 0's bias shared by every block: max relative error {err:.1e}")
    assert err > 1e-2

    with torch.no_grad():
        first = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        for block in model.encoder.block[1:]:
            block.layer[0].SelfAttention.relative_attention_bias.weight.copy_(first)
    assert rel_err(only_first, torch_encode(model, ids, mask)[0]) <= 1e-5


def test_float16_compute_keeps_wo_in_float32():
    """float16 compute runs the feed-forward output projection in float32 (transformers keeps ``wo`` float32 in
    float16), and the encoder stays close to the float32 reference."""
    model = tiny_t5("umt5", seed=9)
    config, params = import_public(model)
    ids, mask = padded_inputs(np.random.default_rng(10), 2, 16)
    fp16 = config.replace(dtype="float16")
    apply = lambda p: T5Encoder(fp16).apply({"params": p}, ids, mask)
    got = jax.jit(apply)(params)
    assert got.dtype == jnp.float32 and rel_err(got, torch_encode(model, ids, mask)[0]) < 5e-2
    jaxpr = str(jax.make_jaxpr(apply)(params))
    # each block's wo kernel (d_ff × d_model = 48 × 32) enters a float32 dot, no float16 one
    assert "f32[48,32]" in jaxpr and "f16[48,32]" not in jaxpr


# ---- conversion ------------------------------------------------------------------------------------------------


def test_bert_export_round_trips_and_other_layouts(tmp_path):
    from transformers import BertModel

    model = tiny_bert(seed=11)
    sd = state_dict_numpy(model)
    config, params = import_public(model)
    assert_bit_exact(to_torch(config, params, format="diffusers"), sd)
    assert_bit_exact(bert_to_torch(config, params), sd)
    assert_trees_equal(params, bert_from_torch(bert_to_torch(config, params), config=config)[1])

    # a pre-training checkpoint (bert. prefix, cls. heads, TensorFlow-era LayerNorm.gamma/beta) gives the same params
    renamed = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in sd.items()}  # fmt: skip
    renamed.update({"cls.predictions.bias": np.zeros(64, np.float32), "bert.embeddings.position_ids": np.arange(80)})
    assert_trees_equal(params, bert_from_torch(renamed, config=config)[1])

    # a saved folder round trip: dit_jax writes a folder transformers loads, with the same outputs, and reads it back
    save_torch(tmp_path / "exported", config, params, format="diffusers")
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["architectures"] == ["BertModel"]
    reloaded = BertModel.from_pretrained(tmp_path / "exported").eval()
    ids, mask = padded_inputs(np.random.default_rng(12), 2, 11)
    for a, b in zip(torch_encode(reloaded, ids, mask), torch_encode(model, ids, mask)):
        np.testing.assert_array_equal(a, b)
    model.save_pretrained(tmp_path / "pipe" / "text_encoder")
    for folder in (tmp_path / "exported", tmp_path / "pipe"):
        c, p = from_torch(folder)
        assert c == config
        assert_trees_equal(params, p)
    # without a config.json the shapes give the config, up to the head count (64-wide heads by default)
    assert bert_from_torch(sd, num_attention_heads=4)[0] == config
    no_pooler = tiny_bert(seed=11, pooler=False)
    assert bert_from_torch(state_dict_numpy(no_pooler), num_attention_heads=4)[0].add_pooling_layer is False


@pytest.mark.parametrize("kind", ["mt5", "umt5"])
def test_mt5_umt5_export_round_trips(kind, tmp_path):
    import transformers

    model = tiny_t5(kind, seed=13)
    sd = state_dict_numpy(model)
    assert "encoder.embed_tokens.weight" in sd
    config, params = import_public(model)
    assert_bit_exact(to_torch(config, params, format="diffusers"), sd)
    assert_bit_exact(t5_to_torch(config, params), sd)
    assert_trees_equal(params, t5_from_torch(t5_to_torch(config, params), config=config)[1])

    save_torch(tmp_path / "exported", config, params, format="diffusers")
    arch = {"mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}[kind]
    written = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert (written["architectures"], written["model_type"]) == ([arch], kind)
    reloaded = getattr(transformers, arch).from_pretrained(tmp_path / "exported").eval()
    ids, mask = padded_inputs(np.random.default_rng(14), 2, 11)
    np.testing.assert_array_equal(torch_encode(reloaded, ids, mask)[0], torch_encode(model, ids, mask)[0])
    model.save_pretrained(tmp_path / "pipe" / "text_encoder")
    for folder in (tmp_path / "exported", tmp_path / "pipe"):
        c, p = from_torch(folder)
        assert c == config
        assert_trees_equal(params, p)
    if kind == "umt5":  # the weights alone tell UMT5 (a table in block 1)
        assert t5_from_torch(sd)[0] == config


def test_bad_checkpoints_and_configs_name_the_problem():
    bert = tiny_bert(seed=15)
    sd = state_dict_numpy(bert)
    config = config_from_transformers(bert.config.to_dict())
    missing = {k: v for k, v in sd.items() if k != "encoder.layer.1.output.dense.bias"}
    with pytest.raises(ConversionError, match=r"missing keys:\n  encoder\.layer\.1\.output\.dense\.bias"):
        bert_from_torch(missing, config=config)
    misshaped = dict(sd, **{"embeddings.word_embeddings.weight": sd["embeddings.word_embeddings.weight"][:60]})
    with pytest.raises(ConversionError, match=r"embeddings\.word_embeddings\.weight: expected \(64, 32\), found"):
        bert_from_torch(misshaped, config=config)
    with pytest.raises(ConversionError, match="position_embedding_type='relative_key' is not supported"):
        config_from_transformers({"model_type": "bert", "position_embedding_type": "relative_key"})

    umt5 = state_dict_numpy(tiny_t5("umt5", seed=16))
    as_mt5 = T5Config(**T5_TINY, model_type="mt5")
    bias1 = r"encoder\.block\.1\.layer\.0\.SelfAttention\.relative_attention_bias\.weight"
    unexpected = rf"MT5EncoderModel keys\) does not match(.|\n)*unexpected keys(.|\n)*{bias1}"
    with pytest.raises(ConversionError, match=unexpected):
        t5_from_torch(umt5, config=as_mt5)
    mt5 = state_dict_numpy(tiny_t5("mt5", seed=16))
    with pytest.raises(ConversionError, match=rf"missing keys:(.|\n)*{bias1}"):
        t5_from_torch(mt5, config=as_mt5.replace(model_type="umt5", relative_bias_per_layer=True))

    with pytest.raises(ValueError, match="relative_bias_per_layer=False is invalid: expected True for model_type='um"):
        T5Config(**T5_TINY, model_type="umt5")
    with pytest.raises(ValueError, match="model_type='bert' is invalid"):
        T5Config(**T5_TINY, model_type="bert")
    with pytest.raises(ValueError, match="hidden_size=30 is invalid: expected a multiple of num_attention_heads=4"):
        BertConfig(**{**BERT_TINY, "hidden_size": 30})
    with pytest.raises(ValueError, match="81 tokens exceed max_position_embeddings=80"):
        BertEncoder(BertConfig(**BERT_TINY)).init(jax.random.key(0), np.zeros((1, 81), np.int32))
    with pytest.raises(ValueError, match="unknown BERT preset"):
        bert_preset("bert-huge")


# ---- TextEncoder on saved folders --------------------------------------------------------------------------------


def _check_features(enc, model, tok, length):
    feats = enc.features(CAPTIONS)
    ref = tok(CAPTIONS, max_length=length, padding="max_length", truncation=True, return_tensors="np")
    assert set(feats) == {"hidden", "mask"} and feats["hidden"].dtype == np.float32
    np.testing.assert_array_equal(feats["mask"], ref["attention_mask"])
    tokens = feats["mask"].sum(1)
    assert 0 < tokens.min() < length and tokens.max() == length  # padded rows and a truncated one
    err = rel_err(feats["hidden"], torch_encode(model, ref["input_ids"], ref["attention_mask"])[0])
    print(f"TextEncoder {enc.config.family}/{getattr(enc.config, 'model_type', 'bert')} vs torch: {err:.1e}")
    assert err <= 1e-5
    return feats


def test_text_encoder_loads_hunyuan_and_wan_style_folders(tmp_path):
    """A Hunyuan-DiT-style pipeline folder (text_encoder/ BERT + tokenizer/, text_encoder_2/ mT5 + tokenizer_2/),
    a UMT5 folder holding its tokenizer, and a BERT folder whose tokenizer is only ``vocab.txt``."""
    bert, mt5, umt5 = tiny_bert(seed=17), tiny_t5("mt5", seed=18), tiny_t5("umt5", seed=19)
    btok, ttok = bert_tokenizer(), t5_tokenizer()
    root = tmp_path / "hunyuan"
    bert.save_pretrained(root / "text_encoder")
    btok.save_pretrained(root / "tokenizer")
    mt5.save_pretrained(root / "text_encoder_2")
    ttok.save_pretrained(root / "tokenizer_2")

    enc = TextEncoder.from_pretrained(root, max_length=12, dtype="float32", batch_size=4)
    assert enc.config.family == "bert" and enc.batch_size == 8  # 8 captions over the 8 devices
    _check_features(enc, bert, btok, 12)
    enc2 = TextEncoder.from_pretrained(root / "text_encoder_2", tokenizer=root / "tokenizer_2", max_length=10,
                                       dtype="float32")  # fmt: skip
    assert (enc2.config.family, enc2.config.model_type) == ("t5", "mt5")
    _check_features(enc2, mt5, ttok, 10)

    umt5.save_pretrained(tmp_path / "umt5")
    ttok.save_pretrained(tmp_path / "umt5")
    enc3 = TextEncoder.from_pretrained(tmp_path / "umt5", max_length=10, dtype="float32")
    assert enc3.config.relative_bias_per_layer
    _check_features(enc3, umt5, ttok, 10)

    bert.save_pretrained(tmp_path / "bert_vocab_only")
    (tmp_path / "bert_vocab_only" / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    enc4 = TextEncoder.from_pretrained(tmp_path / "bert_vocab_only", max_length=12, dtype="float32")
    for a, b in zip(enc4.tokenize(CAPTIONS), enc.tokenize(CAPTIONS)):
        np.testing.assert_array_equal(a, b)
    assert_trees_equal(jax.device_get(enc4.params), jax.device_get(enc.params))


# ---- presets ---------------------------------------------------------------------------------------------------


def test_real_presets_sizes_and_sharding():
    from dit_jax.models import abstract_params, config_from_dict, count_params

    expected = {  # FAMILIES.md: mT5-XL 1.670 B, UMT5-XXL 5.681 B; Hunyuan's BERT ("CLIP") 350 M
        "mT5-XL": (t5_preset("mT5-XL"), 1_669_958_656),
        "UMT5-XXL": (t5_preset("UMT5-XXL"), 5_680_910_336),
        "HunyuanDiT-BERT": (bert_preset("HunyuanDiT-BERT"), 352_035_840),
    }
    specs = {}
    for name, (config, count) in expected.items():
        abstract = abstract_params(config)
        print(f"{name}: {count_params(abstract) / 1e9:.3f} B parameters")
        assert count_params(abstract) == count, name
        assert config_from_dict(config.to_dict()) == config
        specs[name] = nn.get_partition_spec(abstract)
    pooler = specs["HunyuanDiT-BERT"]["pooler"]
    assert 352_035_840 - 1024 * 1024 - 1024 == 350_986_240 and set(pooler) == {"kernel", "bias"}  # without it
    mt5 = t5_preset("mT5-XL")
    assert (mt5.d_model, mt5.num_layers, mt5.num_heads, mt5.d_ff, mt5.vocab_size) == (2048, 24, 32, 5120, 250112)
    assert specs["UMT5-XXL"]["blocks_23"]["relative_attention_bias"] == P(None, "heads")
    assert "relative_attention_bias" not in specs["mT5-XL"]["blocks_1"]
    assert specs["HunyuanDiT-BERT"]["blocks_0"]["attention"]["q"]["kernel"] == P("embed", "heads", "kv")
    assert specs["HunyuanDiT-BERT"]["word_embeddings"] == P("vocab", "embed")
