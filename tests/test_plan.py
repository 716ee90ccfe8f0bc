"""``dit_jax.plan`` compiles the real train step ahead of time and reports its memory and FLOPs."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from dit_jax import plan as plan_lib
from dit_jax.train import load_config_file
from dit_jax.train.setup import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    c = load_config_file(os.path.join(REPO, "configs", "quickstart.py"))
    c.model.update(hidden_size=32, depth=1, num_heads=2)
    c.batch_size = 16
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def test_plan_compiles_the_step_on_the_mesh_and_reports_memory():
    report = plan_lib.plan(tiny_config(mesh=dict(data=2, fsdp=2, tensor=2)))
    assert report["fits"] and report["mesh"].startswith("data=2 fsdp=2 tensor=2")
    assert report["parameters"] > 0 and report["step_tflops"] >= 0
    assert report["bytes_per_device"]["arguments"] > 0 and report["bytes_per_device"]["temporaries"] > 0


def test_fsdp_shrinks_the_per_device_state():
    """The planner sees the real shardings: FSDP over 8 devices holds far less state per device than replication."""
    replicated = plan_lib.plan(tiny_config(mesh=dict(data=8, fsdp=1, tensor=1)))["bytes_per_device"]["arguments"]
    sharded = plan_lib.plan(tiny_config(mesh=dict(data=1, fsdp=8, tensor=1)))["bytes_per_device"]["arguments"]
    assert sharded < replicated / 2  # 2.7× at this width (small biases stay replicated)


def test_plan_reports_a_bad_mesh_as_a_config_error():
    from dit_jax.train import ConfigError

    with pytest.raises(ConfigError, match="mesh"):
        plan_lib.plan(tiny_config(mesh=dict(data=3, fsdp=1, tensor=1)))


def test_abstract_batch_has_the_training_keys():
    from dit_jax import models

    dit = plan_lib.abstract_batch(models.preset("DiT-S/2"), 8)
    assert dit["x"].shape == (8, 32, 32, 4) and dit["y"].shape == (8,)
    pixart = plan_lib.abstract_batch(models.preset("PixArt-XL-2-1024-MS"), 2)
    assert pixart["caption"].shape == (2, 120, 4096) and pixart["resolution"].shape == (2, 2)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu installed: topologies work")
def test_topology_without_libtpu_is_one_clear_error():
    with pytest.raises(RuntimeError, match="libtpu"):
        plan_lib.topology_devices("v4-8")
    with pytest.raises(ValueError, match="unknown topology"):
        plan_lib.topology_devices("v9-8")


def test_slice_names_and_device_kind_tables():
    """v5p slices are megacore like v4 (v5p-8 = 4 chips); v5p reports "TPU v5" and must not take v5e's numbers."""
    assert plan_lib.V5P_TOPOLOGIES["v5p-8"] == "2x2x1" and plan_lib.V5P_TOPOLOGIES["v5p-128"] == "4x4x4"
    for table in (plan_lib.V4_TOPOLOGIES, plan_lib.V5P_TOPOLOGIES):
        for slice_name, dims in table.items():
            chips = 1
            for d in dims.split("x"):
                chips *= int(d)
            assert 2 * chips == int(slice_name.split("-")[1])  # slice names count TensorCores, two per chip
    for slice_name, dims in plan_lib.V5E_TOPOLOGIES.items():  # v5e: one TensorCore per chip, the name counts chips
        assert int(dims.split("x")[0]) * int(dims.split("x")[1]) == int(slice_name.split("-")[1])
    assert plan_lib.V5E_TOPOLOGIES["v5litepod-8"] == "2x4"
    assert plan_lib.per_kind(plan_lib.PEAK_BF16, "TPU v5") == 459e12
    assert plan_lib.per_kind(plan_lib.PEAK_BF16, "TPU v5 lite") == 197e12
    assert (
        plan_lib.per_kind(plan_lib.HBM_BYTES, "TPU v5") > 90 * 2**30 > plan_lib.per_kind(plan_lib.HBM_BYTES, "TPU v4")
    )
    assert plan_lib.per_kind(plan_lib.HBM_BYTES, "TPU v5 lite") < 16 * 2**30
    assert plan_lib.per_kind(plan_lib.HBM_BYTES, "cpu") is None


def test_plan_cli_prints_json(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
    out = subprocess.run(
        [sys.executable, "-m", "dit_jax.plan", "--config", os.path.join(REPO, "configs", "quickstart.py"),
         "--config.model.depth=1", "--config.model.hidden_size=32", "--config.model.num_heads=2"],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["fits"] and report["model"] == "DiT-S/4"


def test_sampling_plan_compiles_the_guided_forward_with_sequence_parallelism():
    """``--sample``: the forward over the guidance batch, params sharded as in training and no optimizer state; a
    ``sequence`` mesh axis splits the image tokens (the 2K/4K sampling plans)."""
    c = load_config_file(os.path.join(REPO, "configs", "pixart_sigma_256.py"))
    c.model.update(input_size=16, in_channels=4, hidden_size=32, depth=1, num_heads=4, caption_channels=16,
                   caption_length=4, pe_interpolation=1.0, remat="none", dtype="float32")  # fmt: skip
    c.batch_size = 2
    c.mesh = dict(data=2, fsdp=1, sequence=4, tensor=1)
    sampling = plan_lib.plan(c, sample=True)
    assert sampling["fits"] and sampling["step"] == "sampling (guided forward)"
    assert sampling["mesh"].startswith("data=2 fsdp=1 sequence=4")
    c.batch_size = 4
    training = plan_lib.plan(c)
    assert training["step"] == "training"
    assert sampling["bytes_per_device"]["arguments"] < training["bytes_per_device"]["arguments"] / 3
    c.model.dtype = "bfloat16"  # XLA:CPU cannot compile that backward pass: one clear error instead of an abort
    with pytest.raises(ConfigError, match="sequence > 1 with a bfloat16 model cannot be compiled for CPU"):
        plan_lib.plan(c)
