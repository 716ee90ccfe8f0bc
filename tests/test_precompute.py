"""Precompute: VAE latents into ArrayRecord shards, read back by the 'latents' source; resume; buckets; captions."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from PIL import Image

from dit_jax.data import bucket_table, center_crop_arr, closest_bucket, create_dataset
from dit_jax.data.precompute import LatentEncoder, main, precompute_latents
from dit_jax.data.records import decode_latent_record

FAST = {"num_threads": 2, "prefetch_buffer_size": 16}


def _save_png(path, h, w, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A random-weight AutoencoderKL saved as a diffusers folder: (folder, config, params)."""
    from safetensors.numpy import save_file

    from dit_jax.convert.vae import config_to_diffusers, vae_to_torch
    from dit_jax.encoders.vae import AutoencoderKL, VAEConfig

    config = VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, scaling_factor=0.5)
    model = AutoencoderKL(config)
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 16, 16, 3)))["params"], jax.random.key(0))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), nn.meta.unbox(shapes))
    folder = tmp_path_factory.mktemp("vae")
    save_file(vae_to_torch(config, params), str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config_to_diffusers(config)))
    return folder, model, params


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    shapes = [(20, 30), (33, 17), (24, 24), (40, 16), (16, 50), (18, 18), (32, 20)]
    for j, (h, w) in enumerate(shapes):
        (root / f"c{j % 2}").mkdir(exist_ok=True)
        _save_png(root / f"c{j % 2}" / f"{j}.png", h, w, seed=j)
    (root / "c1" / "9_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def _records(out):
    manifest = json.loads((out / "manifest.json").read_text())
    recs = []
    for name in sorted(manifest["files"]):
        reader = ArrayRecordReader(str(out / name))
        recs += [decode_latent_record(r) for r in reader.read_all()]
        reader.close()
    return manifest, recs


def test_precompute_cli_round_trip_resume_and_corrupt_records(tmp_path, tiny_vae, class_folder):
    vae_dir, model, params = tiny_vae
    out = tmp_path / "latents"
    argv = ["--source", str(class_folder), "--out", str(out), "--vae", str(vae_dir), "--image-size", "16",
            "--batch-size", "2", "--flip", "both", "--shard-size", "3", "--num-threads", "2"]  # fmt: skip
    summary = main(argv)
    assert summary.written == [0, 1, 2] and summary.skipped == 1
    manifest, recs = _records(out)
    assert manifest["complete"] and manifest["num_records"] == 7 and manifest["num_skipped"] == 1
    assert manifest["config"]["scaling_factor"] == 0.5 and manifest["config"]["num_classes"] == 2
    assert sorted(manifest["files"]) == [f"latents-0000{k}.array_record" for k in range(3)]

    # the stored posterior is the VAE's, for the image and its mirror, with the right label
    files = sorted(p for p in class_folder.rglob("*.png") if "broken" not in p.name)
    pixels = np.stack([center_crop_arr(Image.open(p).convert("RGB"), 16) / 127.5 - 1 for p in files])
    encode = jax.jit(lambda x: model.apply({"params": params}, x, method="encode"))
    mean, logvar = (np.asarray(a) for a in encode(pixels.astype(np.float32)))
    fmean, _ = (np.asarray(a) for a in encode(pixels[:, :, ::-1].astype(np.float32)))
    by_file = {str(p): i for i, p in enumerate(files)}
    all_files = sorted(str(p) for p in class_folder.rglob("*.png"))
    assert len(recs) == 7
    for rec in recs:
        i = by_file[all_files[rec["source_index"]]]
        assert rec["latent_mean"].shape == (2, 2, 4)
        np.testing.assert_allclose(rec["latent_mean"], mean[i], atol=1e-5)
        np.testing.assert_allclose(rec["latent_logvar"], logvar[i], atol=1e-5)
        np.testing.assert_allclose(rec["flipped_mean"], fmean[i], atol=1e-5)
        assert rec["label"] == int(files[i].parent.name[1])

    # the 'latents' source: scaled means, labels; sampling adds exp(logvar/2)·N(0, 1); flips use stored mirrors
    base = {"name": "latents", "path": str(out), "shuffle": False, "num_epochs": 1, **FAST}
    ds = create_dataset({**base, "random_flip": False, "latent_sample": False}, batch_size=7, seed=0,
                        shard_index=0, shard_count=1)  # fmt: skip
    assert ds.x_shapes == [(2, 2, 4)] and ds.num_classes == 2
    (batch,) = list(ds)
    np.testing.assert_allclose(batch["x"], np.stack([r["latent_mean"] for r in recs]) * 0.5, atol=1e-6)
    np.testing.assert_array_equal(batch["y"], [r["label"] for r in recs])
    (sampled,) = list(create_dataset({**base, "random_flip": False}, batch_size=7, seed=0, shard_index=0,
                                     shard_count=1))  # fmt: skip
    eps = (sampled["x"] / 0.5 - batch["x"] / 0.5) / np.exp(0.5 * np.stack([r["latent_logvar"] for r in recs]))
    assert 0.6 < eps.std() < 1.5 and abs(eps.mean()) < 0.4
    (flipped,) = list(create_dataset({**base, "latent_sample": False}, batch_size=7, seed=1, shard_index=0,
                                     shard_count=1))  # fmt: skip
    is_mirror = [np.allclose(x, r["flipped_mean"] * 0.5) for x, r in zip(flipped["x"], recs)]
    is_plain = [np.allclose(x, r["latent_mean"] * 0.5) for x, r in zip(flipped["x"], recs)]
    assert all(m or p for m, p in zip(is_mirror, is_plain)) and any(is_mirror) and any(is_plain)

    # resume: a finished run does nothing; a deleted shard (or one without its marker) is redone alone
    assert main(argv).written == []
    kept = {k: os.stat(out / f"latents-0000{k}.array_record").st_ino for k in (0, 2)}
    os.remove(out / "latents-00001.array_record")
    (out / "latents-00002.array_record.tmp-1").write_bytes(b"left over")
    summary = main(argv)
    assert summary.written == [1] and summary.manifest["num_records"] == 7
    assert {k: os.stat(out / f"latents-0000{k}.array_record").st_ino for k in (0, 2)} == kept
    os.remove(out / "latents-00002.json")
    assert main(argv).written == [2]
    assert not list(out.glob("*.tmp-*"))
    assert _records(out)[0]["num_records"] == 7

    # different settings into the same directory: a clear error
    with pytest.raises(ValueError, match="image_size"):
        main([*argv[:7], "32", *argv[8:]])

    # a corrupt record inside an ArrayRecord shard is counted and skipped
    path = str(out / "latents-00000.array_record")
    reader = ArrayRecordReader(path)
    raw = reader.read_all()
    reader.close()
    writer = ArrayRecordWriter(path, "group_size:1")
    for j, r in enumerate(raw):
        writer.write(b"\x93garbage" if j == 1 else r)
    writer.close()
    ds = create_dataset({**base, "random_flip": False}, batch_size=1, seed=0, shard_index=0, shard_count=1)
    assert len(list(ds)) == 6 and ds.skipped.count == 1


def _pool_encoder():
    """A tiny Flax-free encoder: 8×8 average pooling to 4 channels, logvar −2."""

    def apply(params, x):
        b, h, w, _ = x.shape
        pooled = x.reshape(b, h // 8, 8, w // 8, 8, 3).mean(axis=(2, 4))
        mean = jnp.concatenate([pooled, pooled[..., :1] * params["w"]], axis=-1)
        return mean, jnp.full_like(mean, -2.0)

    return LatentEncoder(apply=apply, params={"w": jnp.float32(2.0)}, scaling_factor=1.0, name="pool")


def test_bucketed_caption_precompute_with_text_embeddings(tmp_path):
    src = tmp_path / "captions"
    src.mkdir()
    shapes = [(32, 64)] * 4 + [(48, 48)] * 4
    for j, (h, w) in enumerate(shapes):
        _save_png(src / f"{j}.png", h, w, seed=j)
        (src / f"{j}.txt").write_text("x" * (j + 1))

    def text_encoder(texts):
        lengths = np.array([len(t) for t in texts])
        emb = np.broadcast_to(lengths[:, None, None], (len(texts), 5, 3)).astype(np.float32)
        mask = (np.arange(5)[None, :] < np.minimum(lengths, 5)[:, None]).astype(np.int32)
        return emb, mask

    out = tmp_path / "latents"
    summary = precompute_latents({"name": "folder", "path": str(src)}, str(out), _pool_encoder(), image_size=32,
                                 batch_size=2, buckets=True, text_encoder=text_encoder, text_encoder_name="len",
                                 num_threads=2, progress=False)  # fmt: skip
    table = bucket_table(32)
    wide, square = table[closest_bucket(32, 64, table)], table[closest_bucket(48, 48, table)]
    files = summary.manifest["files"]
    assert sorted(files) == sorted(f"latents-00000-{h}x{w}.array_record" for h, w in (wide, square))
    assert {tuple(f["shape"]) for f in files.values()} == {(wide[0] // 8, wide[1] // 8, 4), (4, 4, 4)}

    config = {"name": "latents", "path": str(out), "latent_sample": False, "random_flip": False, **FAST}
    runs = [create_dataset(config, batch_size=1, seed=0, shard_index=i, shard_count=2) for i in (0, 1)]
    assert len(runs[0].x_shapes) == 2
    shapes_seen = set()
    it0, it1 = iter(runs[0]), iter(runs[1])
    for _ in range(8):
        b0, b1 = next(it0), next(it1)
        assert b0["x"].shape == b1["x"].shape and b0["caption"].shape == (1, 5, 3)
        shapes_seen.add(b0["x"].shape[1:])
        for b in (b0, b1):
            n = int(b["caption"][0, 0, 0])
            np.testing.assert_array_equal(b["caption_mask"][0], np.arange(5) < min(n, 5))
            np.testing.assert_allclose(b["x"][0, ..., 3], 2.0 * b["x"][0, ..., 0], atol=1e-6)
    assert shapes_seen == {(wide[0] // 8, wide[1] // 8, 4), (4, 4, 4)}


def test_load_vae_encoder_from_a_model_directory_and_bad_paths(tmp_path, tiny_vae):
    from dit_jax.checkpoint import save_model
    from dit_jax.data.precompute import load_vae_encoder

    vae_dir, model, params = tiny_vae
    save_model(tmp_path / "vae_model", model.config, params)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    want = model.apply({"params": params}, x, method="encode")
    for path in (tmp_path / "vae_model", vae_dir):
        encoder = load_vae_encoder(str(path))
        assert encoder.scaling_factor == 0.5 and encoder.name == os.path.abspath(path)
        for got, ref in zip(encoder.apply(encoder.params, x), want):
            np.testing.assert_allclose(got, ref, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="missing_vae"):
        load_vae_encoder(str(tmp_path / "missing_vae"))


def test_precompute_from_a_tfds_source_with_limit(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
        summary = precompute_latents({"name": "tfds", "tfds_name": "imagenet2012"}, str(tmp_path), _pool_encoder(),
                                     image_size=8, batch_size=2, shard_size=2, limit=4, dtype="float16",
                                     num_threads=2, progress=False)  # fmt: skip
        labels = [int(tfds.data_source("imagenet2012", split="train", download=False)[i]["label"]) for i in range(4)]
    assert summary.manifest["num_records"] == 4 and summary.manifest["config"]["num_classes"] == 1000
    manifest, recs = _records(tmp_path)
    assert len(manifest["files"]) == 2 and [r["source_index"] for r in recs] == [0, 1, 2, 3]
    assert [r["label"] for r in recs] == labels
    assert all(r["latent_mean"].dtype == np.float16 and r["latent_mean"].shape == (1, 1, 4) for r in recs)


def test_precompute_cli_with_a_t5_text_encoder(tmp_path, tiny_vae):
    from test_t5 import save_tiny_t5

    from dit_jax.pipelines import TextEncoder

    vae_dir, _, _ = tiny_vae
    save_tiny_t5(tmp_path / "pipe")
    src = tmp_path / "captions"
    src.mkdir()
    captions = ["a cat on the red sofa", "", "photo of an astronaut riding a horse on the blue sofa sitting"]
    for j, text in enumerate(captions):
        _save_png(src / f"{j}.png", 16, 16, seed=j)
        (src / f"{j}.txt").write_text(text)
    out = tmp_path / "latents"
    argv = ["--source", str(src), "--out", str(out), "--vae", str(vae_dir), "--image-size", "16", "--batch-size", "2",
            "--num-threads", "2", "--text-encoder", str(tmp_path / "pipe"), "--max-length", "12",
            "--text-dtype", "float32"]  # fmt: skip
    summary = main(argv)
    assert summary.manifest["config"]["text_encoder"].endswith("(max_length=12, dtype=float32)")
    _, recs = _records(out)
    want_emb, want_mask = TextEncoder.from_pretrained(tmp_path / "pipe", max_length=12, dtype="float32")(captions)
    assert [r["caption"] for r in recs] == captions
    for i, rec in enumerate(recs):
        assert rec["caption_embedding"].shape == (12, 32) and rec["caption_mask"].shape == (12,)
        np.testing.assert_array_equal(rec["caption_mask"], want_mask[i])
        np.testing.assert_allclose(rec["caption_embedding"], want_emb[i], rtol=0, atol=1e-5)
    assert recs[1]["caption_mask"].sum() == 1 and recs[2]["caption_mask"].sum() == 12  # "" → </s>; truncated

    base = {"name": "latents", "path": str(out), "shuffle": False, "num_epochs": 1, "random_flip": False, **FAST}
    (batch,) = list(create_dataset(base, batch_size=3, seed=0, shard_index=0, shard_count=1))
    np.testing.assert_allclose(batch["caption"], want_emb, atol=1e-5)
    np.testing.assert_array_equal(batch["caption_mask"], want_mask)
    with pytest.raises(ValueError, match="--text-encoder: the source has no captions"):
        main([*argv[:1], "tfds:imagenet2012", *argv[2:]])
