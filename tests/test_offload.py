"""Model offload (``pipelines.load(..., offload=True)``, ``python -m dit_jax.sample --offload``): every component's
params in host memory (NumPy), each placed on the devices only while it runs and released after.

Every placement goes through ``dit_jax.pipelines.offload.place``; a spy records what it placed, and
``jax.live_arrays()`` (the device arrays not deleted) tells, during the sampler loop (its progress callback) and after
the call, which of those placements still hold device memory. Offloaded and resident pipelines of the same weights
give bit-identical outputs: the same compiled functions read the same values.
"""

import jax
import numpy as np
import pytest
from test_quantize import TINY4, random_params, save_tiny_flux
from test_video_training import TINY_VAE, TINY_WAN

from dit_jax import models, pipelines
from dit_jax import quantize as Q
from dit_jax.encoders.t5 import T5Config
from dit_jax.pipelines import offload

PROMPTS = ["a cat on the red sofa", "a photo of a dog"]


@pytest.fixture(autouse=True)
def _fast_compile():
    """Tiny models: XLA's expensive CPU passes would dominate the test time."""
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


@pytest.fixture
def placements(monkeypatch):
    """``[(host tree, placed tree)]`` of every ``offload.place`` call, in order."""
    seen = []
    place = offload.place

    def spy(tree, shardings):
        out = place(tree, shardings)
        seen.append((tree, out))
        return out

    monkeypatch.setattr(offload, "place", spy)
    return seen


def is_live(tree) -> list[bool]:
    """Per leaf of a placed tree: whether it is a live (not deleted) device array."""
    live = {id(a) for a in jax.live_arrays()}
    return [id(x) in live and not x.is_deleted() for x in jax.tree.leaves(tree)]


def on_host(tree) -> bool:
    leaves = jax.tree.leaves(tree)
    return bool(leaves) and all(isinstance(x, np.ndarray) and not isinstance(x, jax.Array) for x in leaves)


def kernels(tree) -> list:
    return [k for k in jax.tree.leaves(tree, is_leaf=Q._is_kernel) if Q._is_kernel(k)]


def labels(pipe, seen) -> list[str]:
    """What each placement of ``seen`` was: "text" (an encoder's weights), "model" or "vae"."""
    names = {id(pipe.params): "model", id(pipe.vae_params): "vae"}
    names.update({id(e.params): "text" for e in pipe.encoders.values()})
    return [names.get(id(host), "?") for host, _ in seen]


def test_offloaded_int4_flux_is_bit_identical_and_frees_each_stage(tmp_path, placements):
    """A tiny Flux-dev with an int4 transformer and int8 text encoders: with ``offload=True`` its params stay NumPy
    trees (int4/int8 kernel nodes included); a call places the text encoders once each (with the resident pipeline's
    shardings), the transformer once for the whole loop and the VAE once; during the loop no text-encoder weight is
    a live device array (the resident pipeline's are), and after the call nothing it placed is. Images equal the
    resident pipeline's bit for bit."""
    model, encoders, vae = save_tiny_flux(tmp_path)
    resident = pipelines.load(model, vae=vae, text_encoders=encoders, quantize=TINY4)
    pipe = pipelines.load(model, vae=vae, text_encoders=encoders, quantize=TINY4, offload=True)
    assert pipe.offload and not resident.offload
    assert on_host(pipe.params) and on_host(pipe.vae_params)
    assert kernels(pipe.params) and all(isinstance(k, Q.Int4Kernel) for k in kernels(pipe.params))
    for enc in pipe.encoders.values():
        assert enc.offload and on_host(enc.params)
        assert kernels(enc.params) and all(isinstance(k, Q.Int8Kernel) for k in kernels(enc.params))
    assert not any(isinstance(x, np.ndarray) for e in resident.encoders.values() for x in jax.tree.leaves(e.params))

    kw = dict(num_inference_steps=3, height=32, width=48, seed=0, max_sequence_length=16)
    during = {}

    def watch(name, p):
        def progress(i, n):
            if i == 1:  # inside the sampler loop, after its first model call
                during[name] = {
                    "text": [all(is_live(e.params)) for e in p.encoders.values()],
                    "placed": [(host, all(is_live(out)), any(is_live(out))) for host, out in placements],
                }

        return progress

    want = resident(PROMPTS, progress=watch("resident", resident), **kw)
    assert during["resident"]["text"] == [True, True] and not placements  # resident: all on the device, always
    got = pipe(PROMPTS, progress=watch("offload", pipe), **kw)
    np.testing.assert_array_equal(got, want)
    assert ((want > 0) & (want < 1)).mean() > 0.5  # clipping hides no difference

    assert labels(pipe, placements) == ["text", "text", "model", "vae"]  # the model once, not once per step
    loop = {labels(pipe, [(h, None)])[0]: (all_live, any_live) for h, all_live, any_live in during["offload"]["placed"]}
    assert len(during["offload"]["placed"]) == 3  # the VAE is placed after the loop
    assert loop["text"] == (False, False) and loop["model"] == (True, True)
    for host, out in placements:
        assert not any(is_live(out)) and all(x.is_deleted() for x in jax.tree.leaves(out))
        if labels(pipe, [(host, None)])[0] == "model":
            assert kernels(out) and all(isinstance(k, Q.Int4Kernel) for k in kernels(out))  # nodes survive
    placed_text = [out for host, out in placements[:2]]
    resident_text = [resident.encoders[name].params for name in pipe.encoders]
    for placed, params in zip(placed_text, resident_text, strict=True):
        same = jax.tree.map(lambda a, b: a.sharding == b.sharding, placed, params)
        assert all(jax.tree.leaves(same)) and len(jax.tree.leaves(same)) == len(jax.tree.leaves(params))


def test_offloaded_wan_video_pipeline_with_a_built_text_encoder(tmp_path, placements):
    """A tiny Wan 2.1 (float) given a ``TextEncoder`` built on the devices: the offloaded pipeline encodes through a
    host copy (the given encoder keeps its device weights), places it once for the prompts and the negative prompts
    of guidance, and its frames equal the resident pipeline's bit for bit."""
    from test_t5 import tiny_tokenizer

    from dit_jax.checkpoint import save_model

    wan = models.preset("Wan2.1-T2V-1.3B", **TINY_WAN)
    params = random_params(wan, 0)
    params["head"]["linear"]["kernel"] *= 0.3  # bounded velocities: frames mostly inside [0, 1]
    save_model(tmp_path / "wan", wan, params)
    vae_params = random_params(TINY_VAE, 1)
    vae_params["decoder"]["conv_out"]["kernel"] *= 0.3
    t5 = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)
    encoder = pipelines.TextEncoder(t5, random_params(t5, 2), tiny_tokenizer(), max_length=16)
    load = dict(vae=(TINY_VAE, vae_params), text_encoder=encoder, max_sequence_length=16)
    resident = pipelines.load(tmp_path / "wan", **load)
    pipe = pipelines.load(tmp_path / "wan", offload=True, **load)
    (copy,) = pipe.encoders.values()
    assert copy is not encoder and copy.offload and not encoder.offload and on_host(copy.params)
    assert resident.encoders["t5"] is encoder

    kw = dict(num_frames=9, height=16, width=16, num_inference_steps=2, guidance_scale=5.0, seed=0)
    want = resident(PROMPTS, **kw)
    got = pipe(PROMPTS, **kw)
    np.testing.assert_array_equal(got, want)
    assert want.shape == (2, 9, 16, 16, 3) and ((want > 0) & (want < 1)).mean() > 0.5
    assert labels(pipe, placements) == ["text", "model", "vae"]  # prompts and negatives: one placement
    assert not any(any(is_live(out)) for _, out in placements)
    assert all(is_live(encoder.params))  # the given encoder is untouched


def test_sample_cli_offload_flag(monkeypatch, tmp_path):
    """``--offload`` hands ``offload=True`` to ``pipelines.load`` (nothing without it); a non-boolean ``offload`` is
    one error before anything loads."""
    from dit_jax import sample

    seen = {}

    def fake_load(source, **kw):
        seen.update(kw)
        raise ValueError("stop here")

    monkeypatch.setattr(pipelines, "load", fake_load)
    argv = ["--pipeline", str(tmp_path), "--classes", "1", "--out", str(tmp_path / "x.png")]
    assert sample.main([*argv, "--offload"]) == 1 and seen["offload"] is True
    seen.clear()
    assert sample.main(argv) == 1 and "offload" not in seen
    monkeypatch.undo()
    with pytest.raises(ValueError, match="offload='yes' must be True or False"):
        pipelines.load(tmp_path / "nowhere", offload="yes")
