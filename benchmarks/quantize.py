"""Weight-only int8/int4 inference (``dit_jax.quantize``): parameter memory, compiled forward memory, image error.

  python -m benchmarks.quantize --parts params                  # from abstract shapes: seconds
  python -m benchmarks.quantize --parts forward --models flux   # FLUX.1-dev at 1024 px: compile only, minutes
  XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false \
      python -m benchmarks.quantize --parts forward --models t5  # T5 is never scanned (see dit_jax/quantize.py)
  python -m benchmarks.quantize --parts images                  # tiny random pipelines: minutes on CPU
  XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false \
      python -m benchmarks.quantize --parts offload               # FLUX.1-dev int4 + offload: compile only, minutes
  python -m benchmarks.quantize --parts load                    # host memory of importing a bf16 checkpoint, minutes

``params``: SD3.5-medium, FLUX.1-dev and T5-v1.1-XXL from their presets' abstract shapes: parameter count and bytes
in fp32, bf16, int8 and int4 (the default ``QuantizeConfig`` of each mode; what stays float stays fp32), the share of
parameters quantised, int4's split into packed codes, scales and float rest, and the int4 kernels whose last
contracted axis 64 does not divide (one scale per output channel instead).

``forward``: the family's apply (SD3/Flux scanned, bf16 compute, 1024 px, batch 1, the pipelines' text lengths: SD3
77 + 256 tokens, Flux 512; T5 at 512 tokens) and the Flux VAE's decode at 1024 px (bf16 and fp32 compute, fp32
params, as the pipelines run it), lowered from abstract shapes and compiled for one CPU device: XLA's
``memory_analysis`` (arguments, temporaries). The temporaries depend on XLA:CPU's scheduler: set the ``XLA_FLAGS``
above for its sequential one (what the T5 figure needs; it also lowers the others').

``images``: the tiny random SD3, Flux-dev and PixArt-Σ pipelines of the tests (tests/test_pipelines_mmdit.py,
tests/test_pipelines_pixart.py), 4 images, 12 steps, images in [0, 1]: max and mean abs error of int8 and int4
(``min_size=0``; int4 ``group_size=8``, which the tiny widths of 24–128 divide, and int8 text encoders,
``pipelines.load``'s default) against the float pipeline of the same compute dtype, plus int4 with int4 text
encoders and bf16 against fp32 for scale.

``offload``: the device peak of FLUX.1-dev sampled with ``pipelines.load(..., quantize="int4", offload=True)`` at
1024 px, bf16 compute, batch 1, 28 steps, one device: the maximum over the stages, each the params placed for it
plus its compiled function's other arguments, temporaries and outputs (XLA's ``memory_analysis``, compiled for one
CPU device from abstract shapes): (1) the text encoders (int8 CLIP-L then int8 T5-XXL, both held to the end of
encoding; ``TextEncoder`` pads the prompts to its batch of 16; CLIP 77 tokens, T5 512), (2) the pipeline's own
jitted sampler loop (``_sampler_fn``, Euler on Flux-dev's shifted sigmas, embedded guidance 3.5, no CFG) with the
int4 transformer, (3) the VAE decode as the pipeline runs it (fp32 params, bf16 compute). Also the host memory:
every component's params (resident, what offload keeps; ``pipelines.load`` quantises each kernel as it reads it, so
loading holds little more, see ``load``).

``load``: the host memory of importing a bf16 diffusers transformer folder (as FLUX.1 ships) with int4 kernels: a
FLUX.1-dev-width model (3072 wide, 24 heads) of ``--load-depth`` double and single blocks with random weights is
written to a temporary folder, then each way of importing it runs in a fresh process that samples its anonymous
memory (``RssAnon``, every 2 ms; above what it holds before the import) and reads its peak resident set (``VmHWM``,
the whole process: Python, JAX and the memory-mapped file's pages too):
``as_read`` (``from_torch(folder, quantize="int4")``: each kernel quantised as it is converted) and ``float_first``
(``quantize_params(from_torch(folder))``: the float32 import, then int4). ``--load-tree DIR`` runs ``float_first``
against another checkout's ``dit_jax`` as well (e.g. an earlier commit, whose ``from_torch`` takes no ``quantize``),
through ``PYTHONPATH``.

One JSON line per case.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import models
from dit_jax import quantize as Q
from dit_jax.encoders.t5 import T5Encoder, t5_preset
from dit_jax.models.family import family_of

GB = 1e9
MODELS = {"sd3": "SD3.5-medium", "flux": "FLUX.1-dev", "t5": "T5-v1.1-XXL"}
LATENT = 128  # 1024 px / 8
T5_TOKENS = 512


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def config_of(key: str):
    if key == "t5":
        return t5_preset("t5-v1_1-xxl", dtype="bfloat16")
    return models.preset(MODELS[key]).replace(scan_blocks=True, dtype="bfloat16")


def shapes_of(config):
    return nn.meta.unbox(models.abstract_params(config))


# ---- parameter memory ------------------------------------------------------------------------------------------


def params_case(key: str) -> None:
    shapes = shapes_of(config_of(key))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    fp32 = Q.nbytes(shapes)
    record = dict(case="params", model=MODELS[key], parameters=count, fp32_gb=fp32 / GB, bf16_gb=fp32 / 2 / GB)
    for mode in Q.MODES:
        qp = Q.quantize_params(shapes, mode)
        kernels = [k for k in jax.tree.leaves(qp, is_leaf=Q._is_kernel) if Q._is_kernel(k)]
        quantised = sum(k.size for k in kernels)
        record[f"{mode}_gb"] = Q.nbytes(qp) / GB
        record[f"{mode}_share"] = quantised / count
        if mode == "int4":
            codes = sum(Q._bytes(k.packed) for k in kernels)
            scales = sum(Q._bytes(k.scale) for k in kernels)
            record.update(int4_codes_gb=codes / GB, int4_scales_gb=scales / GB,
                          int4_float_rest_gb=(Q.nbytes(qp) - codes - scales) / GB)  # fmt: skip
            paths = Q.quantized_paths(qp)
            record["int4_per_channel_kernels"] = [
                p for p, k in zip(paths, kernels, strict=True) if k.shape[k.axis] % Q.GROUP_SIZE
            ]
    emit({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()})


# ---- compiled forward memory -----------------------------------------------------------------------------------


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


def _compile(fn, *args) -> dict:
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    return dict(compile_s=round(time.perf_counter() - t0, 1), argument_gb=round(mem.argument_size_in_bytes / GB, 3),
                temp_gb=round(mem.temp_size_in_bytes / GB, 3))  # fmt: skip


def forward_case(key: str, mode: str) -> None:
    config = config_of(key)
    shapes = shapes_of(config)
    params = shapes if mode == "fp32" else Q.quantize_params(shapes, mode)
    if key == "t5":
        ids = jax.ShapeDtypeStruct((1, T5_TOKENS), jnp.int32)
        module = T5Encoder(config)
        fields = _compile(lambda p, i, m: module.apply({"params": p}, i, m), params, ids, ids)
        size = dict(tokens=T5_TOKENS)
    else:
        from benchmarks.forward import text_inputs

        model, family = models.build(config), family_of(config)
        inputs = _abstract(text_inputs(config, 1, LATENT))
        fields = _compile(lambda p, x, t, c: family.apply(model, p, x, t, c), params, inputs["x"], inputs["t"],
                          inputs["condition"])  # fmt: skip
        size = dict(px=LATENT * 8, scanned=True)
    emit(dict(case="forward", model=MODELS[key], params=mode, compute="bf16", batch=1, **size,
              params_gb=round(Q.nbytes(params) / GB, 3), **fields, device=_device()))  # fmt: skip


def vae_decode_case(dtype: str) -> None:
    from dit_jax.encoders import AutoencoderKL
    from dit_jax.encoders.vae import vae_preset

    config = vae_preset("flux", dtype=dtype)
    vae = AutoencoderKL(config)
    z = jax.ShapeDtypeStruct((1, LATENT, LATENT, config.latent_channels), jnp.float32)
    params = nn.meta.unbox(jax.eval_shape(lambda k: vae.init(k, *config.dummy_inputs(1))["params"], jax.random.key(0)))
    fields = _compile(lambda p, z: vae.apply({"params": p}, z, method="decode"), params, z)
    emit(dict(case="vae_decode", model="FLUX.1 VAE", params="fp32", compute=dtype, batch=1, px=LATENT * 8,
              params_gb=round(Q.nbytes(params) / GB, 3), **fields, device=_device()))  # fmt: skip


def _device() -> str:
    from benchmarks.common import device_description

    return device_description()


# ---- image error of tiny pipelines -----------------------------------------------------------------------------


def tiny_folders(root: Path) -> dict[str, Path]:
    """The tests' tiny random SD3, Flux-dev and PixArt-Σ pipeline folders (diffusers ``save_pretrained``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import test_pipelines_mmdit as mm
    import test_pipelines_pixart as px
    import torch
    from diffusers import (
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        PixArtSigmaPipeline,
        StableDiffusion3Pipeline,
    )
    from test_t5 import tiny_t5, tiny_tokenizer

    torch.set_num_threads(1)
    t5, t5_tok = tiny_t5(seed=4), tiny_tokenizer()
    pipes = {
        "SD3": StableDiffusion3Pipeline(
            transformer=mm.tiny_transformer("SD3Transformer2DModel", 1, **mm.SD3_TRANSFORMER),
            vae=mm.tiny_vae("sd3"),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            text_encoder=mm.tiny_clip(True, 16, "quick_gelu", seed=5),
            tokenizer=mm.clip_tokenizer(),
            text_encoder_2=mm.tiny_clip(True, 12, "gelu", seed=6),
            tokenizer_2=mm.clip_tokenizer(pad_token="!"),
            text_encoder_3=t5,
            tokenizer_3=t5_tok,
        ),
        "Flux-dev": FluxPipeline(
            transformer=mm.tiny_transformer("FluxTransformer2DModel", 8, guidance_embeds=True, **mm.FLUX_TRANSFORMER),
            scheduler=FlowMatchEulerDiscreteScheduler(
                shift=3.0,
                use_dynamic_shifting=True,
                base_image_seq_len=256,
                max_image_seq_len=4096,
                base_shift=0.5,
                max_shift=1.15,
            ),
            vae=mm.tiny_vae("flux"),
            text_encoder=mm.tiny_clip(False, 16, "quick_gelu", seed=7),
            tokenizer=mm.clip_tokenizer(),
            text_encoder_2=t5,
            tokenizer_2=t5_tok,
        ),  # fmt: skip
        "PixArt-Sigma": PixArtSigmaPipeline(
            tokenizer=tiny_tokenizer(),
            text_encoder=tiny_t5(),
            vae=px.tiny_vae(),
            transformer=px.tiny_transformer(1),
            scheduler=DPMSolverMultistepScheduler(),
        ),  # fmt: skip
    }
    out = {}
    for name, pipe in pipes.items():
        pipe.save_pretrained(root / name)
        out[name] = root / name
    return out


SIZES = {"SD3": (32, 48), "Flux-dev": (32, 48), "PixArt-Sigma": (64, 64)}
PROMPTS = ["a cat sitting on the red sofa", "a photo of an astronaut riding a horse", "a red horse", "the dog"]
TEXT_TOKENS = 24  # T5 tokens of the tiny pipelines (their CLIPs read 77)


def images_case(steps: int = 12) -> None:
    from dit_jax import pipelines

    int8 = Q.QuantizeConfig(min_size=0)
    int4 = Q.QuantizeConfig(mode="int4", min_size=0, group_size=8)
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in tiny_folders(Path(tmp)).items():
            h, w = SIZES[name]
            kw = dict(num_inference_steps=steps, height=h, width=w, seed=0)
            load = dict(max_sequence_length=TEXT_TOKENS)
            got = {}
            for dtype in ("float32", "bfloat16"):
                float_pipe = pipelines.load(folder, dtype=dtype, **load)
                got[dtype, "float"] = float_pipe(PROMPTS, **kw)
                for mode, q in (("int8", int8), ("int4", int4)):
                    got[dtype, mode] = pipelines.load(folder, dtype=dtype, quantize=q, **load)(PROMPTS, **kw)
                encoders = int4_text_encoders(folder, float_pipe.model_config, dtype, int4)
                pipe = pipelines.load(folder, dtype=dtype, quantize=int4, text_encoders=encoders, **load)
                got[dtype, "int4_all"] = pipe(PROMPTS, **kw)

            def err(a, b, got=got):
                e = np.abs(got[a] - got[b])
                return [float(f"{e.max():.3g}"), float(f"{e.mean():.3g}")]

            emit(dict(case="images", pipeline=f"{name} ({h}x{w})", steps=steps, images=len(PROMPTS),
                      int8_vs_bf16=err(("bfloat16", "int8"), ("bfloat16", "float")),
                      int4_vs_bf16=err(("bfloat16", "int4"), ("bfloat16", "float")),
                      int4_all_vs_bf16=err(("bfloat16", "int4_all"), ("bfloat16", "float")),
                      int8_vs_fp32=err(("float32", "int8"), ("float32", "float")),
                      int4_vs_fp32=err(("float32", "int4"), ("float32", "float")),
                      int4_all_vs_fp32=err(("float32", "int4_all"), ("float32", "float")),
                      bf16_vs_fp32=err(("bfloat16", "float"), ("float32", "float")),
                      int4=dict(group_size=int4.group_size, min_size=int4.min_size), device=_device()))  # fmt: skip


def int4_text_encoders(folder: Path, config, dtype: str, int4) -> dict:
    """Every text encoder of a pipeline folder (``config``: its transformer's) with int4 kernels (``pipelines.load``
    gives them int8)."""
    from dit_jax import pipelines

    return {
        slot.name: pipelines.load_text_encoder(folder / slot.encoder, tokenizer=folder / slot.tokenizer,
                                               max_length=slot.max_length or TEXT_TOKENS, dtype=dtype, quantize=int4)
        for slot in family_of(config).text_slots(config)
    }  # fmt: skip


# ---- offload: the device peak of each stage ------------------------------------------------------------------

STEPS = 28
TEXT_BATCH = 16  # TextEncoder's default batch: the prompts are padded to it


def _memory(compiled) -> dict:
    mem = compiled.memory_analysis()
    return dict(arguments=mem.argument_size_in_bytes, temp=mem.temp_size_in_bytes, output=mem.output_size_in_bytes,
                alias=mem.alias_size_in_bytes)  # fmt: skip


def _gb(n: float) -> float:
    return round(n / GB, 3)


def _text_encoder_stage(int4) -> tuple[dict, dict]:
    """(record fields, host bytes of the quantised params) of the text encoders as ``pipelines.load(quantize=
    "int4")`` builds them for Flux: int8 CLIP-L (no projection) and T5-XXL, bf16 compute; each one's jitted encoder
    at its length and batch 16."""
    from dit_jax.encoders.clip import clip_preset

    text_config = Q.text_encoder_config(int4)
    encoders = {"clip": (clip_preset("clip-vit-large-patch14", projection_dim=None, dtype="bfloat16"), 77),
                "t5": (config_of("t5"), T5_TOKENS)}  # fmt: skip
    fields, held, host = {}, 0, {}
    for name, (config, tokens) in encoders.items():  # FluxPipeline's slot order: CLIP, then T5
        shapes = shapes_of(config)
        params = Q.quantize_params(shapes, text_config)
        module = models.build(config)
        ids = jax.ShapeDtypeStruct((TEXT_BATCH, tokens), jnp.int32)
        mem = _memory(jax.jit(lambda p, i, m, module=module: module.apply({"params": p}, i, m)).lower(
            params, ids, ids).compile())  # fmt: skip
        size = Q.nbytes(params)
        held += size  # the encoders placed so far stay placed to the end of encoding
        peak = held - size + mem["arguments"] + mem["temp"] + mem["output"] - mem["alias"]
        fields[name] = dict(params_gb=_gb(size), temp_gb=_gb(mem["temp"]), peak_gb=_gb(peak))
        host[name] = size
    return fields, host


def offload_case() -> None:
    from benchmarks.forward import text_inputs
    from dit_jax import diffusion
    from dit_jax.encoders.vae import vae_preset
    from dit_jax.pipelines import TextToImagePipeline

    int4 = Q.quantize_config("int4")
    config = config_of("flux")
    shapes = shapes_of(config)
    params = Q.quantize_params(shapes, int4)
    vae_config = vae_preset("flux", dtype="bfloat16")
    vae = models.build(vae_config)
    vae_params = nn.meta.unbox(jax.eval_shape(lambda k: vae.init(k, *vae_config.dummy_inputs(1))["params"],
                                              jax.random.key(0)))  # fmt: skip
    family = family_of(config)
    scheduler_config = dict(family.scheduler_config_for(config))
    schedule, method, options = diffusion.from_diffusers_scheduler_config(scheduler_config)
    pipe = TextToImagePipeline(model_config=config, params=params, schedule=schedule, method=method, options=options,
                               vae_config=vae_config, vae_params=vae_params, scheduler_config=scheduler_config,
                               devices=jax.devices()[:1], max_sequence_length=T5_TOKENS,
                               **family.sampling_for(config))  # fmt: skip
    px = LATENT * 8

    text, text_host = _text_encoder_stage(int4)

    # the sampler loop: the pipeline's own jitted function, at the shapes its __call__ gives it (Flux-dev: no CFG)
    request = pipe.request_options(STEPS, None, (px, px), {})
    steps, scale, schedule, method, options = pipe._call_settings("np", STEPS, None, None, None, request)
    fn = pipe._sampler_fn(("offload",), schedule, method, steps, options, False, None, False)
    cond = _abstract(text_inputs(config, 1, LATENT)["condition"])
    x = jax.ShapeDtypeStruct((1, LATENT, LATENT, config.in_channels), jnp.float32)
    rng = jax.eval_shape(lambda: jax.random.fold_in(jax.random.key(0), 1))
    t0 = time.perf_counter()
    with pipe._context():
        loop = _memory(fn.lower(params, x, cond, {}, jax.ShapeDtypeStruct((), jnp.float32), rng).compile())
    loop_s = time.perf_counter() - t0

    # the VAE decode, as SamplingPipeline._decode runs it
    def decode(p, z):
        return jnp.clip(pipe._vae_decode(p, z) / 2 + 0.5, 0.0, 1.0)

    with pipe._context():
        dec = _memory(jax.jit(decode).lower(vae_params, x).compile())

    def peak(mem: dict) -> int:
        return mem["arguments"] + mem["temp"] + mem["output"] - mem["alias"]

    stages = {
        "text_encoders": max(v["peak_gb"] for v in text.values()),
        "transformer_loop": _gb(peak(loop)),
        "vae_decode": _gb(peak(dec)),
    }
    top = max(stages.values())
    resident = Q.nbytes(params) + sum(text_host.values()) + Q.nbytes(vae_params)
    emit(dict(case="offload", model="FLUX.1-dev", transformer="int4", text_encoders="int8", compute="bf16", batch=1,
              px=px, steps=steps, text_encoders_stage=text,
              transformer_loop=dict(params_gb=_gb(Q.nbytes(params)), temp_gb=_gb(loop["temp"]),
                                    peak_gb=stages["transformer_loop"], compile_s=round(loop_s, 1)),
              vae_decode=dict(params_gb=_gb(Q.nbytes(vae_params)), temp_gb=_gb(dec["temp"]),
                              peak_gb=stages["vae_decode"]),
              device_peak_gb=top, device_peak_gib=round(top * GB / 2**30, 3),
              peak_stage=max(stages, key=stages.get), fits_8gb=top * GB <= 8e9,
              host_resident_gb=_gb(resident),
              cpu_scheduler=_cpu_scheduler(), device=_device()))  # fmt: skip


# ---- host memory of importing a checkpoint ---------------------------------------------------------------------

_LOAD_CHILD = r"""
import json, sys, threading, time
peak = [0]
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
def rss_anon():
    return status("RssAnon")
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss_anon())
        time.sleep(0.002)
import jax, numpy as np
from dit_jax import quantize as Q
from dit_jax.convert import from_torch
base = rss_anon()
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
if sys.argv[1] == "as_read":
    _, params = from_torch(sys.argv[2], quantize="int4")
else:
    _, params = from_torch(sys.argv[2])
    params = Q.quantize_params(params, "int4")
seconds = time.perf_counter() - t0
stop.set()
time.sleep(0.01)
print(json.dumps(dict(base_anon=base, peak_anon=max(peak[0], rss_anon()), final_anon=rss_anon(),
                      params=Q.nbytes(params), hwm=status("VmHWM"), seconds=round(seconds, 1))))
"""


def _write_bf16_folder(folder: Path, config) -> int:
    """A diffusers transformer folder of ``config`` with random bf16 weights; returns the float32 params' bytes."""
    import torch
    from safetensors.torch import save_file

    from dit_jax import convert

    rng = np.random.default_rng(0)
    shapes = shapes_of(config)
    params = jax.tree.map(lambda x: rng.standard_normal(x.shape, np.float32) * 0.02, shapes)
    fp32 = Q.nbytes(params)
    state_dict = convert.to_torch(config, params, format="diffusers")
    del params
    tensors = {}
    for k in list(state_dict):
        tensors[k] = torch.from_numpy(np.ascontiguousarray(state_dict.pop(k))).to(torch.bfloat16)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(convert.diffusers_config(config)))
    return fp32


def load_case(depth: tuple[int, int], trees: list[str]) -> None:
    import os
    import subprocess

    config = models.preset("FLUX.1-dev").replace(depth=depth[0], depth_single=depth[1])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "transformer"
        fp32 = _write_bf16_folder(folder, config)
        file_bytes = (folder / "diffusion_pytorch_model.safetensors").stat().st_size
        for tree in ["", *trees]:
            for variant in ("float_first",) if tree else ("as_read", "float_first"):  # another tree: its float path
                env = dict(os.environ, JAX_PLATFORMS="cpu")
                if tree:
                    env["PYTHONPATH"] = tree + os.pathsep + env.get("PYTHONPATH", "")
                out = subprocess.run([sys.executable, "-c", _LOAD_CHILD, variant, str(folder)], env=env,
                                     capture_output=True, text=True, check=True)  # fmt: skip
                r = json.loads(out.stdout.strip().splitlines()[-1])
                emit(dict(case="load", model=f"FLUX.1-dev width, {depth[0]} double + {depth[1]} single blocks",
                          variant=variant, tree=tree or "this checkout", quantize="int4",
                          fp32_params_gb=_gb(fp32), bf16_file_gb=_gb(file_bytes), int4_params_gb=_gb(r["params"]),
                          peak_anon_gb=_gb(r["peak_anon"] - r["base_anon"]),
                          peak_over_fp32=round((r["peak_anon"] - r["base_anon"]) / fp32, 3),
                          final_anon_gb=_gb(r["final_anon"] - r["base_anon"]), peak_rss_gb=_gb(r["hwm"]),
                          seconds=r["seconds"], device=_device()))  # fmt: skip


def _cpu_scheduler() -> str:
    import os

    flags = os.environ.get("XLA_FLAGS", "")
    sequential = "--xla_cpu_enable_concurrency_optimized_scheduler=false" in flags
    return "sequential" if sequential else "concurrency-optimised (default)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="params,forward,images",
                   help="params, forward, images, offload, load (comma-separated)")  # fmt: skip
    p.add_argument("--models", default="sd3,flux,t5", help="forward: sd3, flux, t5, vae (comma-separated)")
    p.add_argument("--modes", default="int8,int4", help="forward: fp32, int8, int4 params (comma-separated)")
    p.add_argument("--load-depth", default="2,4", help="load: double,single blocks of the FLUX.1-dev-width model")
    p.add_argument("--load-tree", action="append", default=[], help="load: also import with this checkout's dit_jax")
    args = p.parse_args()
    parts, keys, modes = (set(v.split(",")) for v in (args.parts, args.models, args.modes))
    if "params" in parts:
        for key in MODELS:
            params_case(key)
    if "forward" in parts:
        for key in [k for k in (*MODELS, "vae") if k in keys]:
            if key == "vae":
                for dtype in ("bfloat16", "float32"):
                    vae_decode_case(dtype)
                continue
            for mode in [m for m in ("fp32", "int8", "int4") if m in modes]:
                forward_case(key, mode)
    if "images" in parts:
        images_case()
    if "offload" in parts:
        offload_case()
    if "load" in parts:
        load_case(tuple(int(v) for v in args.load_depth.split(",")), args.load_tree)


if __name__ == "__main__":
    main()
