"""Data pipelines: digits, process sharding, iterator checkpoints, TFDS (mocked), image folders, buckets."""

import math

import grain
import numpy as np
import pytest
from PIL import Image

from dit_jax.data import (
    ASPECT_RATIO_256,
    ASPECT_RATIO_512,
    ASPECT_RATIO_1024,
    bucket_table,
    center_crop_arr,
    closest_bucket,
    create_dataset,
    load_digits_arrays,
    validate_data_config,
)
from dit_jax.data import sources as sources_lib

FAST = {"num_threads": 2, "prefetch_buffer_size": 16}


def _digits(**kw):
    return {"name": "digits", **FAST, **kw}


def _take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def _rows(x):
    """Examples of a batch as sorted byte strings (a multiset that ignores order)."""
    return sorted(np.ascontiguousarray(r).tobytes() for r in x)


def adm_center_crop_arr(pil_image, image_size):
    """Reference: guided-diffusion's center_crop_arr, written from its published description."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def _save_png(path, h, w, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


# ------------------------------------------------------------------------------------------------ digits


def test_digits_batches_shapes_range_labels_and_determinism():
    ds = create_dataset(_digits(), batch_size=16, seed=3, shard_index=0, shard_count=1)
    assert ds.x_shapes == [(16, 16, 1)] and ds.num_classes == 10 and ds.num_records == 1797
    a = _take(ds, 3)
    for b in a:
        assert b["x"].shape == (16, 16, 16, 1) and b["x"].dtype == np.float32
        assert b["y"].shape == (16,) and b["y"].dtype == np.int32
        assert b["x"].min() >= -1.0 and b["x"].max() <= 1.0 and b["x"].max() > 0.9 and b["x"].min() < -0.9
        assert set(b["y"].tolist()) <= set(range(10))
    again = _take(create_dataset(_digits(), batch_size=16, seed=3, shard_index=0, shard_count=1), 3)
    other = _take(create_dataset(_digits(), batch_size=16, seed=4, shard_index=0, shard_count=1), 3)
    for b, c in zip(a, again):
        np.testing.assert_array_equal(b["x"], c["x"])
        np.testing.assert_array_equal(b["y"], c["y"])
    assert not np.array_equal(a[0]["x"], other[0]["x"])
    # the examples are the shipped digits, labels attached correctly
    images, labels = load_digits_arrays(16)
    lookup = {img.tobytes(): lab for img, lab in zip(images, labels)}
    assert all(lookup[x.tobytes()] == y for x, y in zip(a[0]["x"], a[0]["y"]))


def test_digits_every_epoch_is_a_new_permutation_of_all_images():
    n = 1797
    ds = create_dataset(_digits(num_epochs=2), batch_size=n, seed=0, shard_index=0, shard_count=1)
    epochs = list(ds)
    assert len(epochs) == 2
    images, _ = load_digits_arrays(16)
    assert _rows(epochs[0]["x"]) == _rows(epochs[1]["x"]) == _rows(images)
    assert not np.array_equal(epochs[0]["y"], epochs[1]["y"])


def test_digits_sizes_and_flip_option():
    x8, y8 = load_digits_arrays(None)
    x32, _ = load_digits_arrays(32)
    assert x8.shape == (1797, 8, 8, 1) and x32.shape == (1797, 32, 32, 1) and y8.shape == (1797,)
    assert np.abs(x32).max() <= 1.0
    flip = _take(create_dataset(_digits(random_flip=True), batch_size=64, seed=0, shard_index=0, shard_count=1), 1)[0]
    plain = _take(create_dataset(_digits(), batch_size=64, seed=0, shard_index=0, shard_count=1), 1)[0]
    np.testing.assert_array_equal(flip["y"], plain["y"])  # flips do not change the order
    flipped = [not np.array_equal(a, b) and np.array_equal(a, b[:, ::-1]) for a, b in zip(flip["x"], plain["x"])]
    assert 10 < sum(flipped) < 54


def test_process_shards_are_disjoint_and_make_the_global_batch():
    whole = _take(create_dataset(_digits(), batch_size=8, seed=1, shard_index=0, shard_count=1), 2)
    default = _take(create_dataset(_digits(), batch_size=8, seed=1), 2)  # one process: jax.process_index() == 0
    np.testing.assert_array_equal(default[1]["x"], whole[1]["x"])
    parts = [_take(create_dataset(_digits(), batch_size=4, seed=1, shard_index=i, shard_count=2), 2) for i in (0, 1)]
    for step in range(2):
        p0, p1 = parts[0][step]["x"], parts[1][step]["x"]
        assert p0.shape == p1.shape == (4, 16, 16, 1)
        assert _rows(np.concatenate([p0, p1])) == _rows(whole[step]["x"])
        assert not set(_rows(p0)) & set(_rows(p1))


def test_iterator_checkpoint_restore_yields_the_next_batch(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    config = _digits(random_flip=True)
    it = iter(create_dataset(config, batch_size=8, seed=5, shard_index=0, shard_count=1))
    for _ in range(3):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        save = ocp.args.Composite(
            state=ocp.args.StandardSave({"w": np.arange(3)}), data_iter=grain.checkpoint.CheckpointSave(it)
        )
        mngr.save(3, args=save)
        mngr.wait_until_finished()
    expected = [next(it) for _ in range(2)]
    fresh = iter(create_dataset(config, batch_size=8, seed=5, shard_index=0, shard_count=1))
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        restore = ocp.args.Composite(
            state=ocp.args.StandardRestore({"w": np.zeros(3, np.int64)}),
            data_iter=grain.checkpoint.CheckpointRestore(fresh),
        )
        mngr.restore(3, args=restore)
    for want in expected:
        got = next(fresh)
        np.testing.assert_array_equal(got["x"], want["x"])
        np.testing.assert_array_equal(got["y"], want["y"])


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "config, message",
    [
        ({"name": "mnist"}, "data.name"),
        ({"name": "digits", "image_size": 12}, "multiple of 8"),
        ({"name": "digits", "colour": True}, "data.colour"),
        ({"name": "folder", "image_size": 32}, "data.path"),
        ({"name": "tfds", "tfds_name": "x"}, "data.image_size"),
        ({"name": "digits", "random_flip": "yes"}, "data.random_flip"),
        ({"name": "folder", "path": "/nonexistent/images", "image_size": 32}, "/nonexistent/images"),
        ({"name": "latents", "path": "/nonexistent/latents"}, "/nonexistent/latents"),
        ({"name": "digits", "num_classes": 7}, "data.num_classes"),
    ],
)
def test_bad_configs_get_one_clear_error(config, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        create_dataset(config, batch_size=2, seed=0, shard_index=0, shard_count=1)


def test_config_defaults_and_configdict():
    ml_collections = pytest.importorskip("ml_collections")
    cfg = validate_data_config(ml_collections.ConfigDict({"name": "digits"}))
    assert cfg["image_size"] == 16 and cfg["random_flip"] is False and cfg["shuffle"] is True
    assert validate_data_config({"name": "digits", "image_size": None, "num_classes": None})["image_size"] == 16
    tfds_cfg = validate_data_config({"name": "tfds", "tfds_name": "x", "image_size": 32, "label_key": None})
    assert tfds_cfg["label_key"] is None and tfds_cfg["image_key"] == "image"
    assert validate_data_config({"name": "folder", "path": "p", "image_size": 64})["random_flip"] is True
    with pytest.raises(ValueError, match="split"):
        create_dataset({"name": "digits"}, batch_size=2, seed=0, split="validation", shard_index=0, shard_count=1)


# ------------------------------------------------------------------------------------------------ tfds


def test_center_crop_matches_adm_reference():
    rng = np.random.default_rng(0)
    for h, w, size in [(300, 200, 64), (64, 257, 32), (40, 40, 64), (513, 1024, 256)]:
        pil = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        np.testing.assert_array_equal(center_crop_arr(pil, size), adm_center_crop_arr(pil, size))


def test_tfds_mock_source_crops_like_adm_and_keeps_labels():
    tfds = pytest.importorskip("tensorflow_datasets")
    config = {"name": "tfds", "tfds_name": "imagenet2012", "image_size": 8, "random_flip": False, "shuffle": False}
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = create_dataset({**config, **FAST}, batch_size=3, seed=0, shard_index=0, shard_count=1)
        batches = _take(ds, 2)
        src = tfds.data_source("imagenet2012", split="train", download=False)
        examples = [src[i] for i in range(6)]
    assert ds.num_classes == 1000
    x = np.concatenate([b["x"] for b in batches])
    y = np.concatenate([b["y"] for b in batches])
    assert x.shape == (6, 8, 8, 3)
    assert any(min(ex["image"].shape[:2]) >= 16 for ex in examples)  # the BOX halving path is exercised
    for i, ex in enumerate(examples):
        want = adm_center_crop_arr(Image.fromarray(ex["image"]), 8).astype(np.float32) / 127.5 - 1
        np.testing.assert_allclose(x[i], want, atol=1e-6)
        assert y[i] == ex["label"]


def test_tfds_corrupt_image_bytes_are_counted_and_skipped():
    class Source:
        dataset_info = None

        def __len__(self):
            return 3

        def __getitem__(self, i):
            image = b"\x89PNG not really" if i == 1 else np.full((20, 30, 3), 10 * i, np.uint8)
            return {"image": image, "label": i}

    skipped = sources_lib.SkipCounter("tfds")
    src = sources_lib.TfdsSource("fake", "train", None, "image", "label", 8, False, skipped, data_source=Source())
    rng = np.random.default_rng(0)
    out = [src.load(i, rng) for i in range(3)]
    assert out[1] is None and skipped.count == 1
    assert out[2]["x"].shape == (8, 8, 3) and out[2]["y"] == 2


# ------------------------------------------------------------------------------------------------ folders


def test_class_folders_label_by_sorted_name_and_skip_corrupt_files(tmp_path):
    sizes = {"cat": [(20, 30), (33, 17)], "ant": [(24, 24), (40, 16), (16, 50)]}
    for name, shapes in sizes.items():
        (tmp_path / name).mkdir()
        for j, (h, w) in enumerate(shapes):
            _save_png(tmp_path / name / f"{j}.png", h, w, seed=hash((name, j)) % 1000)
    (tmp_path / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    config = {"name": "folder", "path": str(tmp_path), "image_size": 16, "random_flip": False, "shuffle": False}
    ds = create_dataset({**config, **FAST, "num_epochs": 1}, batch_size=2, seed=0, shard_index=0, shard_count=1)
    assert ds.num_classes == 2 and ds.num_records == 6
    batches = list(ds)
    assert len(batches) == 2  # 5 readable images, batches of 2, remainder dropped
    assert ds.skipped.count == 1
    x = np.concatenate([b["x"] for b in batches])
    y = np.concatenate([b["y"] for b in batches])
    files = [("ant", 0), ("ant", 1), ("ant", 2), ("cat", 0)]  # sorted order; 'ant' is class 0
    for i, (name, j) in enumerate(files):
        assert y[i] == (0 if name == "ant" else 1)
        want = adm_center_crop_arr(Image.open(tmp_path / name / f"{j}.png").convert("RGB"), 16) / 127.5 - 1
        np.testing.assert_allclose(x[i], want, atol=1e-6)


def test_caption_pairs_expose_text_and_skip_corrupt_and_uncaptioned(tmp_path):
    for j in range(4):
        _save_png(tmp_path / f"img{j}.png", 24, 32, seed=j)
        (tmp_path / f"img{j}.txt").write_text(f"  a photo number {j}\n")
    _save_png(tmp_path / "nocaption.png", 24, 32, seed=9)
    (tmp_path / "img4.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "img4.txt").write_text("broken")
    config = {"name": "folder", "path": str(tmp_path), "image_size": 16, "shuffle": False, "num_epochs": 1, **FAST}
    ds = create_dataset(config, batch_size=4, seed=0, shard_index=0, shard_count=1)
    assert ds.num_records == 5 and ds.num_classes is None
    (batch,) = list(ds)
    assert set(batch) == {"x", "caption_text"}
    assert batch["x"].shape == (4, 16, 16, 3)
    assert batch["caption_text"].tolist() == [f"a photo number {j}" for j in range(4)]
    assert ds.skipped.count == 1


# ------------------------------------------------------------------------------------------------ buckets


@pytest.mark.parametrize("base, table, step", [(256, ASPECT_RATIO_256, 16), (512, ASPECT_RATIO_512, 32),
                                               (1024, ASPECT_RATIO_1024, 64)])  # fmt: skip
def test_pixart_bucket_tables(base, table, step):
    """PixArt's tables (also diffusers' binning tables: tests/test_pipelines_pixart.py checks them entry by entry)."""
    assert (base, base) in table and len(table) == 33
    ratios = [h / w for h, w in table]
    assert ratios == sorted(ratios) and min(ratios) == 0.25 and max(ratios) == 4.0
    for h, w in table:
        assert h % step == 0 and w % step == 0 and 0.9 * base * base <= h * w <= base * base


@pytest.mark.parametrize("base", [384, 768])
def test_generated_bucket_tables(base):
    """Other base resolutions: multiples of the step, area just below base², symmetric in h and w."""
    table = bucket_table(base)
    step = max(16, base // 16)
    assert (base, base) in table
    ratios = [h / w for h, w in table]
    assert ratios == sorted(ratios) and min(ratios) >= 0.25 and max(ratios) <= 4.0
    for h, w in table:
        assert h % step == 0 and w % step == 0 and 0.85 * base * base <= h * w <= base * base
        assert (w, h) in table


def test_closest_bucket_uses_log_ratio():
    table = ASPECT_RATIO_256
    assert table[closest_bucket(100, 100, table)] == (256, 256)
    h, w = table[closest_bucket(300, 600, table)]
    assert abs(math.log(h / w) - math.log(0.5)) < 0.07
    h2, w2 = table[closest_bucket(600, 300, table)]
    assert abs(math.log(h2 / w2) - math.log(2.0)) < 0.07
    assert table[closest_bucket(10, 1000, table)] == table[0]  # beyond the range: the extreme bucket


def test_bucketed_folder_batches_have_one_static_shape_per_bucket_on_every_process(tmp_path):
    shapes = [(64, 128)] * 8 + [(128, 64)] * 8 + [(64, 64)] * 8
    (tmp_path / "a").mkdir()
    for j, (h, w) in enumerate(shapes):
        _save_png(tmp_path / "a" / f"{j:02d}.png", h, w, seed=j)
    (tmp_path / "a" / "zz_broken.png").write_bytes(b"nope")
    config = {"name": "folder", "path": str(tmp_path), "image_size": 64, "buckets": True, "random_flip": False, **FAST}
    table = bucket_table(64)
    expected = {table[closest_bucket(h, w, table)] for h, w in shapes}
    assert len(expected) == 3
    runs = [create_dataset(config, batch_size=2, seed=0, shard_index=i, shard_count=2) for i in (0, 1)]
    assert sorted(s[:2] for s in runs[0].x_shapes) == sorted(expected)
    steps = [_take(ds, 12) for ds in runs]  # 24 images / global batch 4 = 6 batches per epoch: two epochs
    assert runs[0].skipped.count == 1  # the broken file is found when buckets are assigned
    seen = set()
    for b0, b1 in zip(*steps):
        assert b0["x"].shape == b1["x"].shape  # the same bucket on every process at every step
        assert b0["x"].shape[1:3] in expected and b0["x"].shape[0] == 2
        assert not set(_rows(b0["x"])) & set(_rows(b1["x"]))
        seen.add(b0["x"].shape[1:3])
    assert seen == expected
