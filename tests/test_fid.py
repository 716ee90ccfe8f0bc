"""FID / sFID / IS / precision-recall: the Flax FID Inception against a torch InceptionV3 FID variant written here
from the published architecture (random weights and BatchNorm statistics, converted through the rule table), the
metrics against direct computations, the ADM ``.npz`` reader/writer, and ``python -m dit_jax.evaluate --fid``.

One image size and batch is used throughout, so the sharded feature extractor compiles once for the whole file.
"""

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from parity import assert_bit_exact, rel_err, state_dict_numpy

from dit_jax import convert, metrics
from dit_jax.convert.inception import WEIGHTS_URL, inception_to_torch, load_inception
from dit_jax.convert.rules import ConversionError
from dit_jax.encoders.inception import InceptionConfig
from dit_jax.evaluate import main

tnn, F = torch.nn, torch.nn.functional

# Non-square inputs: the height is shrunk to 299 and the width enlarged, so both resize directions are compared.
SIZE = (320, 64)
N_IMAGES = 4

# ---- the torch reference: pytorch-fid's FID InceptionV3 (torchvision names), written from the architecture ------


class BasicConv2d(tnn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = tnn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = tnn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg(x):  # the FID graph's average pools leave the padding out of the mean
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(tnn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg(x))], 1)


class InceptionB(tnn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class FIDInceptionC(tnn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg(x))], 1)


class InceptionD(tnn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class FIDInceptionE(tnn.Module):
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(tnn.Module):
    """Returns (pool (B, 2048), spatial (B, 2023), logits (B, 1008)) of NCHW images in [0, 1]."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = (
            FIDInceptionA(c, p) for c, p in ((192, 32), (256, 64), (288, 64))
        )
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = (
            FIDInceptionC(768, c) for c in (128, 160, 160, 192)
        )
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = FIDInceptionE(1280, False), FIDInceptionE(2048, True)
        self.fc = tnn.Linear(2048, 1008)

    def forward(self, x, size=299):
        x = 2 * F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) - 1
        x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            if name == "6d":  # TF's mixed_6/conv: Mixed_6d's 1×1 branch, first 7 channels, flattened (h, w, c)
                spatial = self.Mixed_6d.branch1x1(x)[:, :7].permute(0, 2, 3, 1).flatten(1)
            x = getattr(self, f"Mixed_{name}")(x)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return pool, spatial, self.fc(pool)


@pytest.fixture(scope="module")
def torch_inception():
    """The reference with random weights; BatchNorm statistics drawn around those of a batch (one train-mode pass
    with momentum 1, at 139 px to save time), so activations keep a healthy scale through all 94 layers."""
    torch.manual_seed(0)
    model = FIDInceptionV3()
    bns = [m for m in model.modules() if isinstance(m, tnn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
            bn.momentum = 1.0
        model.fc.bias.normal_(0.0, 0.5)
        model.train()(torch.rand(2, 3, 64, 64), size=139)
        for bn in bns:
            bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.7, 1.4))
            bn.running_mean.add_(0.2 * bn.running_var.sqrt() * torch.randn_like(bn.running_mean))
    return model.eval()


@pytest.fixture(scope="module")
def weights(torch_inception, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(torch_inception.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def extractor(weights):
    return metrics.InceptionExtractor(*load_inception(weights), batch_size=2)


@pytest.fixture(scope="module")
def images():
    """The reference batch and the samples of every test here (one shape: one compilation)."""
    return {"reference": _images(1), "samples": _images(2)}


def _split(features, n: int = N_IMAGES) -> dict:
    return {"reference": [f[:n] for f in features], "samples": [f[n:] for f in features]}


@pytest.fixture(scope="module")
def torch_features(torch_inception, images):
    return _split(_torch_features(torch_inception, np.concatenate([images["reference"], images["samples"]])))


@pytest.fixture(scope="module")
def flax_features(extractor, images):
    """Features of the reference and the samples in one batch of 8 (one per device)."""
    out = _split(extractor(np.concatenate([images["reference"], images["samples"]])))
    return {k: metrics.Activations(*v) for k, v in out.items()}


def _images(seed: int, n: int = N_IMAGES) -> np.ndarray:
    """Smooth random uint8 RGB images (N, H, W, 3): noise would make every image look alike to the network."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 255, (n, 5, 4, 3))
    x = np.kron(low, np.ones((SIZE[0] // 5, SIZE[1] // 4, 1))) + rng.normal(0, 20, (n, *SIZE, 3))
    return np.clip(x, 0, 255).astype(np.uint8)


def _torch_features(model, images: np.ndarray):
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        pool, spatial, logits = model(x)
        softmax_logits = pool @ model.fc.weight.T
    return [t.numpy() for t in (pool, spatial, logits, softmax_logits)]


# ---- the network -------------------------------------------------------------------------------------------------


def test_features_match_the_torch_fid_inception(extractor, flax_features, torch_features):
    """pool, spatial, logits (and pool·W) through the sharded extractor (8 devices) against torch."""
    assert extractor.batch_size == 8  # --batch-size 2 rounded up to the device count
    for part in ("reference", "samples"):
        got, want = flax_features[part], torch_features[part]
        assert got.pool.shape == (N_IMAGES, 2048) and got.spatial.shape == (N_IMAGES, 2023)
        assert got.logits.shape == got.softmax_logits.shape == (N_IMAGES, 1008)
        assert want[0].std() > 0.05 and np.abs(want[0][0] - want[0][1]).max() > 0.01  # informative features
        for name, g, w in zip(got._fields, got, want):
            err = rel_err(g, w)
            print(f"{part} {name}: relative error {err:.2e} (max |ref| {np.abs(w).max():.2f})")
            assert err <= 1e-5, name


def test_conversion_round_trip_and_errors(torch_inception, weights, tmp_path):
    config, params = convert.from_torch(weights)  # the public path detects the family
    assert isinstance(config, InceptionConfig) and config.num_classes == 1008
    want = {k: v for k, v in state_dict_numpy(torch_inception).items() if not k.endswith("num_batches_tracked")}
    assert_bit_exact(inception_to_torch(config, params), want)
    assert_bit_exact(convert.to_torch(config, params, format="original"), want)

    sd = dict(want)
    del sd["Mixed_6d.branch1x1.bn.running_var"]
    sd["Mixed_7c.branch_pool.conv.weight"] = np.zeros((192, 2048, 3, 3), np.float32)
    sd["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    with pytest.raises(ConversionError) as e:
        convert.from_state_dict(sd)
    msg = str(e.value)
    assert "Mixed_6d.branch1x1.bn.running_var" in msg and "AuxLogits.fc.weight" in msg
    assert "Mixed_7c.branch_pool.conv.weight: expected (192, 2048, 1, 1), found (192, 2048, 3, 3)" in msg

    with pytest.raises(FileNotFoundError) as e:
        load_inception(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    assert WEIGHTS_URL in str(e.value) and "downloads nothing" in str(e.value)


# ---- the metrics ------------------------------------------------------------------------------------------------


def _direct_fid(mu1, s1, mu2, s2):
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))


def test_frechet_distance_of_known_gaussians():
    rng = np.random.default_rng(0)
    d = 6
    a = rng.normal(size=(d, d))
    x = rng.normal(size=(500, d)) @ a + 1.0
    y = rng.normal(size=(400, d)) * np.linspace(0.5, 2.0, d) - 0.5
    mu1, s1 = metrics.activation_statistics(x.astype(np.float32))
    mu2, s2 = metrics.activation_statistics(y)
    assert mu1.dtype == s1.dtype == np.float64
    np.testing.assert_allclose(mu1, x.astype(np.float32).astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(s1, np.cov(x.astype(np.float32).astype(np.float64).T), rtol=1e-12)
    fid = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert fid == pytest.approx(_direct_fid(mu1, s1, mu2, s2), rel=1e-10)
    # diagonal covariances: sum (m1 − m2)² + (√v1 − √v2)²
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    closed = float(np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2))
    assert metrics.frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(closed, rel=1e-10)
    assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_singular_and_complex_cases(monkeypatch):
    rng = np.random.default_rng(1)
    mu1, s1 = metrics.activation_statistics(rng.normal(size=(4, 8)))  # rank 3 of 8
    mu2, s2 = metrics.activation_statistics(rng.normal(size=(5, 8)))
    assert np.isfinite(metrics.frechet_distance(mu1, s1, mu2, s2))
    # a non-finite square root is retried with eps on the diagonals (as pytorch-fid)
    real, calls = scipy.linalg.sqrtm, []

    def first_fails(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", first_fails)
    eps = np.eye(8) * 1e-6
    got = metrics.frechet_distance(mu1, s1, mu2, s2)
    monkeypatch.setattr(scipy.linalg, "sqrtm", real)
    assert len(calls) == 2 and np.allclose(calls[1], (s1 + eps) @ (s2 + eps))
    want = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(real(calls[1]).real))
    assert got == pytest.approx(want, rel=1e-12)
    # an indefinite "covariance": the square root's imaginary part is not round-off
    with pytest.raises(ValueError, match="imaginary component"):
        metrics.frechet_distance(np.zeros(2), np.array([[0.0, 1.0], [1.0, 0.0]]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="do not match"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_inception_score_of_known_logits():
    assert metrics.inception_score(np.zeros((100, 1008))) == pytest.approx(1.0)
    # every split holds 7 classes, each predicted with certainty: the score is 7
    labels = np.tile(np.arange(7), 30)
    logits = np.where(np.arange(1008)[None] == labels[:, None], 60.0, 0.0)
    assert metrics.inception_score(logits, splits=10) == pytest.approx(7.0, rel=1e-6)
    # the improved-GAN / ADM formula over equal parts
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (50, 20))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    parts = [p[i : i + 5] for i in range(0, 50, 5)]
    want = np.mean([np.exp(np.mean(np.sum(q * (np.log(q) - np.log(q.mean(0, keepdims=True))), 1))) for q in parts])
    assert metrics.inception_score(logits) == pytest.approx(want, rel=1e-10)


def _brute_force_pr(ref, smp, k=3):
    def d2(a, b):
        return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)

    r_ref, r_smp = np.sort(d2(ref, ref), 1)[:, k], np.sort(d2(smp, smp), 1)[:, k]
    precision = np.mean((d2(smp, ref) <= r_ref[None]).any(1))
    recall = np.mean((d2(ref, smp) <= r_smp[None]).any(1))
    return precision, recall


def test_precision_recall_against_brute_force():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(37, 5)).astype(np.float32)
    smp = (rng.normal(size=(29, 5)) * 0.8 + 0.6).astype(np.float32)
    got = metrics.precision_recall(ref, smp, batch_size=8)  # blocks of 8 rows, the last padded
    want = _brute_force_pr(ref, smp)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0 < got[0] < 1 and 0 < got[1] < 1
    assert metrics.precision_recall(ref, ref, batch_size=8) == (1.0, 1.0)
    assert metrics.precision_recall(ref, ref + 100.0) == (0.0, 0.0)
    radii = metrics.manifold_radii(ref, batch_size=8)
    np.testing.assert_allclose(radii, np.sort(((ref[:, None] - ref[None]) ** 2).sum(-1), 1)[:, 3], rtol=1e-4)
    with pytest.raises(ValueError, match="more than 3"):
        metrics.manifold_radii(ref[:3])


# ---- ADM .npz files ----------------------------------------------------------------------------------------------


def test_npz_writer_and_reader_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 6, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 1000, 7)
    acts = metrics.Activations(*(rng.normal(size=(7, d)).astype(np.float32) for d in (16, 12, 10, 10)))
    path = metrics.write_npz(tmp_path / "samples.npz", images, labels, acts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]  # no temporary left behind
    with np.load(path) as z:
        assert sorted(z.files) == ["arr_0", "arr_1", "mu", "mu_s", "sigma", "sigma_s"]
        np.testing.assert_array_equal(z["arr_1"], labels)
    ref = metrics.read_reference(path)
    np.testing.assert_array_equal(np.concatenate(list(ref.images.batches(3))), images)
    assert [len(b) for b in ref.images.batches(3)] == [3, 3, 1] and len(ref.images) == 7
    mu, sigma = metrics.activation_statistics(acts.pool)
    np.testing.assert_array_equal(ref.mu, mu)
    np.testing.assert_array_equal(ref.sigma, sigma)
    np.testing.assert_array_equal(ref.sigma_s, metrics.activation_statistics(acts.spatial)[1])
    # ADM's own files: np.savez(path, arr) (also compressed), and a statistics-only file
    np.savez_compressed(tmp_path / "c.npz", images)
    np.testing.assert_array_equal(np.concatenate(list(metrics.open_images(tmp_path / "c.npz").batches(4))), images)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    stats = metrics.read_reference(tmp_path / "stats.npz")
    assert stats.images is None and stats.mu_s is None and np.array_equal(stats.mu, mu)
    np.savez(tmp_path / "bad.npz", mu=mu)
    with pytest.raises(ValueError, match="without 'sigma'"):
        metrics.read_reference(tmp_path / "bad.npz")
    np.savez(tmp_path / "empty.npz", x=mu)
    with pytest.raises(ValueError, match="neither images"):
        metrics.read_reference(tmp_path / "empty.npz")


# ---- the command line ---------------------------------------------------------------------------------------------


def test_cli_fid_end_to_end(weights, images, torch_features, flax_features, tmp_path, capsys, monkeypatch):
    """A PNG folder against an ADM reference batch, then an .npz of the same samples against statistics only.

    The Fréchet distance itself is checked above: here it only records the statistics it is given (checked against
    the torch reference's features), since one 2048-d ``sqrtm`` takes minutes on this project's 2-core host, and
    with 4 images the covariances are singular anyway."""
    from PIL import Image

    seen = []

    def recording_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
        seen.append((mu1, sigma1, mu2, sigma2))
        return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2))

    monkeypatch.setattr(metrics, "frechet_distance", recording_distance)
    np.savez(tmp_path / "ref.npz", images["reference"])  # as ADM writes its batches: arr_0
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, im in enumerate(images["samples"]):
        Image.fromarray(im).save(folder / f"{i:06d}.png")
    out = tmp_path / "report.json"
    args = ["--fid", str(tmp_path / "ref.npz"), "--inception", str(weights), "--batch-size", "2"]
    assert main([*args, "--samples", str(folder), "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(out.read_text())
    assert set(report) >= {"fid", "sfid", "inception_score", "precision", "recall"}
    assert report["num_samples"] == report["num_reference"] == N_IMAGES
    assert report["reference_statistics"] == "computed from arr_0"

    # the statistics FID and sFID were computed from, and IS and precision/recall, against the torch features
    (fid_args, sfid_args), (ref_t, smp_t) = seen, (torch_features["reference"], torch_features["samples"])
    want = [*metrics.activation_statistics(smp_t[0]), *metrics.activation_statistics(ref_t[0])]
    want_s = [*metrics.activation_statistics(smp_t[1]), *metrics.activation_statistics(ref_t[1])]
    for got, w in zip((*fid_args, *sfid_args), (*want, *want_s)):
        assert rel_err(got, w) <= 1e-5
    assert report["fid"] == recording_distance(*fid_args) and report["sfid"] == recording_distance(*sfid_args)
    assert report["inception_score"] == pytest.approx(metrics.inception_score(smp_t[3]), rel=1e-4)
    assert (report["precision"], report["recall"]) == pytest.approx(metrics.precision_recall(ref_t[0], smp_t[0]))

    # the samples as an .npz against a statistics-only reference (pytorch-fid's mu/sigma): no sFID, no precision;
    # the features of these known images are served from the ones computed above (the network ran enough)
    seen.clear()
    metrics.write_npz(tmp_path / "smp.npz", images["samples"])
    mu, sigma = metrics.activation_statistics(flax_features["reference"].pool)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    again = metrics.evaluate_samples(tmp_path / "stats.npz", tmp_path / "smp.npz", _Known(images, flax_features))
    assert again["precision"] is again["recall"] is again["sfid"] is None
    assert again["reference_statistics"] == "stored" and again["num_reference"] is None
    assert again["inception_score"] == pytest.approx(report["inception_score"], rel=1e-6)
    assert len(seen) == 1 and np.array_equal(seen[0][2], mu) and np.array_equal(seen[0][3], sigma)
    assert rel_err(seen[0][1], fid_args[1]) <= 1e-6  # the same samples as PNGs and as arr_0


class _Known(metrics.InceptionExtractor):
    """Serves the features of known images (it reads the images as the real extractor does, runs no network)."""

    def __init__(self, images: dict, features: dict):
        self.batch_size = 3
        self.known = {
            im.tobytes(): row for k in images for im, row in zip(images[k], zip(*features[k]))
        }  # fmt: skip

    def __call__(self, batches, progress=None):
        rows = [self.known[im.tobytes()] for batch in batches for im in batch]
        return metrics.Activations(*(np.stack(f) for f in zip(*rows)))


def test_cli_errors_and_the_quickstart_mode(tmp_path, capsys, monkeypatch):
    np.savez(tmp_path / "ref.npz", np.zeros((4, 8, 8, 3), np.uint8))
    ref = str(tmp_path / "ref.npz")
    for argv, message in (
        (["--fid", ref, "--samples", ref, "--inception", "w.pth", "--workdir", "runs/x"], "cannot be combined"),
        (["--fid", ref, "--samples", ref], "--fid needs --inception"),
        (["--samples", ref], "need --fid"),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    missing = str(tmp_path / "pt_inception.pth")
    assert main(["--fid", ref, "--samples", ref, "--inception", missing, "--out", str(tmp_path / "r.json")]) == 2
    assert WEIGHTS_URL in capsys.readouterr().err and not (tmp_path / "r.json").exists()

    # the digits-run mode keeps its defaults
    import dit_jax.evaluate as ev

    seen = {}

    def fake(workdir, **kwargs):
        seen.update(workdir=workdir, **kwargs)
        per_class = {str(c): 1.0 for c in range(10)}
        return dict(step=1, workdir=workdir, samples_per_class=100, method="euler", num_steps=32, guidance_scale=2.0,
                    sampling_seconds=1.0, classifier_cv_accuracy_on_real=0.97, per_class_accuracy=per_class,
                    accuracy=1.0, min_class_accuracy=1.0, passed=True, json="x.json")  # fmt: skip

    monkeypatch.setattr(ev, "evaluate", fake)
    assert main([]) == 0
    assert seen == dict(workdir="runs/quickstart", step=None, samples_per_class=100, num_steps=None,
                        guidance_scale=None, method=None, seed=1234)  # fmt: skip
