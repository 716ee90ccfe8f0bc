"""Precompute of a text-to-image model's whole text condition (``--model``): SD3's CLIP-L + CLIP-G + T5 features
against diffusers ``StableDiffusion3Pipeline.encode_prompt``, read back by the 'latents' source and trained on."""

import json

import jax
import numpy as np
import pytest
import torch
from test_pipelines_mmdit import SD3_TRANSFORMER, clip_tokenizer, tiny_clip, tiny_vae
from test_precompute import FAST, _records, _save_png
from test_t5 import tiny_t5, tiny_tokenizer

from dit_jax.checkpoint import save_model
from dit_jax.data import create_dataset
from dit_jax.data.precompute import main
from dit_jax.models import build
from dit_jax.models.mmdit import MMDiTConfig

CAPTIONS = [
    "a cat on the red sofa",
    "the red cat",
    "photo of an astronaut riding a horse on the blue sofa",
    "",
    "red",
    "a horse",
    "the sofa on the cat",
    "an astronaut",
]  # one global batch of the 8 test devices
T5_TOKENS = 12
TINY_SD3 = dict(input_size=8, in_channels=16, out_channels=16, hidden_size=32, depth=1, num_heads=4,
                joint_attention_dim=32, pooled_projection_dim=16, pos_embed_max_size=16)  # fmt: skip


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    """The text encoders, tokenizers and VAE of a tiny SD3 pipeline folder, and the torch pipeline holding them."""
    from diffusers import StableDiffusion3Pipeline

    assert SD3_TRANSFORMER["joint_attention_dim"] == TINY_SD3["joint_attention_dim"]
    root = tmp_path_factory.mktemp("sd3_text")
    parts = dict(
        text_encoder=tiny_clip(True, 16, "quick_gelu", seed=5),
        tokenizer=clip_tokenizer(),
        text_encoder_2=tiny_clip(True, 12, "gelu", seed=6),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        text_encoder_3=tiny_t5(seed=4),
        tokenizer_3=tiny_tokenizer(),
        vae=tiny_vae("sd3"),
    )
    for name, part in parts.items():
        part.save_pretrained(root / name)
    pipe = StableDiffusion3Pipeline(transformer=None, scheduler=None, **parts)
    return root, pipe


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    src = tmp_path_factory.mktemp("captioned")
    for j, text in enumerate(CAPTIONS):
        _save_png(src / f"{j}.png", 16, 16, seed=j)
        (src / f"{j}.txt").write_text(text)
    return src


def _argv(folder, src, out, *extra):
    return ["--source", str(src), "--out", str(out), "--vae", str(folder / "vae"), "--image-size", "16",
            "--batch-size", "2", "--num-threads", "2", "--text-dtype", "float32", *extra]  # fmt: skip


def test_sd3_text_condition_precompute_matches_diffusers_and_trains(tmp_path, sd3_folder, captioned):
    folder, pipe = sd3_folder
    config = MMDiTConfig(**TINY_SD3)
    params = build(config).init(jax.random.key(0), *config.dummy_inputs(1))["params"]
    save_model(tmp_path / "model", config, params)
    out = tmp_path / "latents"
    summary = main(_argv(folder, captioned, out, "--text-encoder", str(folder), "--model", str(tmp_path / "model"),
                         "--max-length", str(T5_TOKENS)))  # fmt: skip
    manifest = summary.manifest["config"]
    assert manifest["has_condition"] and not manifest["has_embeddings"]
    assert "SD3 text condition" in manifest["text_encoder"]

    with torch.no_grad():
        want, _, want_pooled, _ = pipe.encode_prompt(
            CAPTIONS, None, None, do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS
        )
    _, recs = _records(out)
    assert [r["caption"] for r in recs] == CAPTIONS
    got = np.stack([r["condition"]["context"] for r in recs])
    got_pooled = np.stack([r["condition"]["pooled"] for r in recs])
    assert got.shape == (8, 77 + T5_TOKENS, 32) and got_pooled.shape == (8, 16)
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(got_pooled, want_pooled.numpy(), rtol=0, atol=2e-5)

    data = {"name": "latents", "path": str(out), "shuffle": False, "num_epochs": 1, "random_flip": False, **FAST}
    (batch,) = list(create_dataset(data, batch_size=8, seed=0, shard_index=0, shard_count=1))
    np.testing.assert_array_equal(batch["context"], got)
    np.testing.assert_array_equal(batch["pooled"], got_pooled)
    assert batch["x"].shape == (8, 8, 8, 16)

    from dit_jax.train.config import base_config
    from dit_jax.train.metrics import read_metrics
    from dit_jax.train.trainer import train_and_evaluate

    c = base_config()
    c.model = dict(name="SD3-medium", **TINY_SD3)
    c.diffusion = dict(shift=3.0, weighting="logit_normal")
    c.data = dict(name="latents", path=str(out), num_threads=1, prefetch_buffer_size=4)
    c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 8, 2, 1, 2
    c.cfg_dropout_prob = 0.5
    c.sample.enabled = False
    train_and_evaluate(c, str(tmp_path / "run"))
    losses = [r["loss"] for r in read_metrics(str(tmp_path / "run"))]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_text_condition_precompute_errors(tmp_path, sd3_folder, captioned):
    folder, _ = sd3_folder
    out = tmp_path / "latents"
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    try:
        with pytest.raises(ValueError, match="several text encoders; pass --model"):
            main(_argv(folder, captioned, out, "--text-encoder", str(folder)))
    finally:
        (folder / "model_index.json").unlink()
    with pytest.raises(ValueError, match="--text-encoders needs --model"):
        main(_argv(folder, captioned, out, "--text-encoders", f"t5={folder / 'text_encoder_3'}"))
    with pytest.raises(ValueError, match="neither a model directory nor a preset"):
        main(_argv(folder, captioned, out, "--text-encoder", str(folder), "--model", "SD9"))
    with pytest.raises(ValueError, match="is not SLOT=DIR"):
        main(_argv(folder, captioned, out, "--model", "SD3-medium", "--text-encoders", "t5"))
    with pytest.raises(ValueError, match="not a text slot"):
        main(_argv(folder, captioned, out, "--model", "SD3-medium", "--text-encoders", f"t3={folder}"))
    assert not out.exists() or not any(out.iterdir())  # nothing written before the arguments are checked
