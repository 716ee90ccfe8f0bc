"""``python -m dit_jax.evaluate``: the classifier recognises real digits through the same resize/shrink path, and a
trained run's evaluation writes per-class accuracies."""

import json
import os

import jax
import numpy as np
import pytest

from dit_jax.data import load_digits_arrays
from dit_jax.evaluate import fit_classifier, main, shrink


@pytest.fixture(autouse=True)
def _fast_compile():
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


def test_shrink_inverts_the_training_resize_onto_the_sklearn_scale():
    from sklearn.datasets import load_digits

    x16, y = load_digits_arrays(16)
    feats = shrink(x16)
    raw = load_digits().images.reshape(len(y), 64)
    assert feats.shape == raw.shape and feats.min() >= 0 and feats.max() <= 16
    assert np.corrcoef(feats.ravel(), raw.ravel())[0, 1] > 0.95


def test_classifier_recognises_real_digits_per_class():
    x, y = load_digits_arrays(16)
    clf, cv = fit_classifier(16)
    assert cv > 0.95
    pred = clf.predict(shrink(x))
    for c in range(10):
        assert np.mean(pred[y == c] == c) >= 0.9


def test_evaluate_a_training_run(tmp_path, capsys):
    from dit_jax.train.config import base_config
    from dit_jax.train.trainer import train_and_evaluate

    c = base_config()
    c.model = dict(name="DiT-S/2", input_size=8, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    c.data = dict(name="digits", image_size=8, num_threads=1, prefetch_buffer_size=8)
    c.batch_size, c.total_steps, c.log_every = 8, 2, 1
    c.sample.enabled = False
    run = str(tmp_path / "run")
    train_and_evaluate(c, run)
    code = main(["--workdir", run, "--samples_per_class", "3", "--num_steps", "2", "--guidance_scale", "2"])
    assert code in (0, 1)  # an untrained model fails the bar; the report is what matters here
    report_path = os.path.join(run, "eval", "step_0000002.json")
    with open(report_path) as f:
        report = json.load(f)
    assert set(report["per_class_accuracy"]) == {str(i) for i in range(10)}
    assert report["samples_per_class"] == 3 and report["num_steps"] == 2 and report["guidance_scale"] == 2.0
    assert os.path.exists(report_path.replace(".json", ".png"))
    out = capsys.readouterr().out
    assert "class 9" in out and "overall" in out
