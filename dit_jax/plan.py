"""Plan a training run before paying for it: compile the real train step ahead of time and report what it needs.

  python -m dit_jax.plan --config configs/dit_xl2_imagenet256.py                      # this host's devices
  python -m dit_jax.plan --config configs/dit_xl2_imagenet256.py --topology v4-128 \\
      --config.mesh.fsdp=64 --config.batch_size=1024                                   # a TPU slice, from a CPU host
  python -m dit_jax.plan --config configs/wan_1_3b_finetune.py --topology v5p-32 --example_shape 21,60,104,16
                                                                                       # a video clip's latent shape

The step is lowered and compiled for the config's mesh exactly as ``python -m dit_jax.train`` would (same state
shardings, logical rules, donation), with abstract inputs: nothing is allocated and no data is read. With
``--topology`` the devices are compile-only TPU devices from ``libtpu`` (``pip install -e ".[tpu]"``; no TPU needed),
so running out of HBM shows up here, at compile time, as it would on the pod. The report gives per-device memory
(arguments, outputs, temporaries, and their conservative sum), the analytic FLOPs per step and the step time the
device's peak would give at a chosen MFU.
"""

import dataclasses
import json
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dit_jax.models import count_params, family_of
from dit_jax.parallel.mesh import batch_sharding, describe_mesh, example_order
from dit_jax.parallel.sequence import sequence_mode

# Cloud TPU v4 slice names (TensorCores) → topology (chips, megacore: one JAX device per chip).
V4_TOPOLOGIES = {
    "v4-8": "2x2x1",
    "v4-16": "2x2x2",
    "v4-32": "2x2x4",
    "v4-64": "2x4x4",
    "v4-128": "4x4x4",
    "v4-256": "4x4x8",
    "v4-512": "4x8x8",
    "v4-1024": "8x8x8",
    "v4-2048": "8x8x16",
    "v4-4096": "8x16x16",
}
# Cloud TPU v5p slice names (TensorCores) → topology (megacore, like v4: v5p-8 = 4 chips; MaxText's table).
V5P_TOPOLOGIES = {
    "v5p-8": "2x2x1",
    "v5p-16": "2x2x2",
    "v5p-32": "2x2x4",
    "v5p-64": "2x4x4",
    "v5p-128": "4x4x4",
    "v5p-256": "4x4x8",
    "v5p-512": "4x8x8",
    "v5p-1024": "8x8x8",
    "v5p-2048": "8x8x16",
    "v5p-4096": "8x16x16",
}
# Cloud TPU v5e slice names (chips: one TensorCore each, no megacore) → topology; "v5e-8" is accepted as well.
V5E_TOPOLOGIES = {
    f"v5litepod-{n}": dims
    for n, dims in ((1, "1x1"), (4, "2x2"), (8, "2x4"), (16, "4x4"), (32, "4x8"), (64, "8x8"), (128, "8x16"),
                    (256, "16x16"))
}  # fmt: skip
PEAK_BF16 = {"tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5": 459e12, "tpu v6 lite": 918e12, "h100": 989e12,
             "h200": 989e12}  # fmt: skip
# What XLA treats as usable per chip (its out-of-memory message); v5p reports device_kind "TPU v5", v5e "TPU v5 lite".
HBM_BYTES = {"tpu v4": 30.75 * 2**30, "tpu v5": 95.74 * 2**30, "tpu v5 lite": 15.75 * 2**30}


def per_kind(table: dict[str, float], kind: str) -> float | None:
    """The entry of ``table`` for a ``device_kind``: the longest key it starts with ("tpu v5 lite" before "tpu v5")."""
    keys = [k for k in table if kind.lower().startswith(k)]
    return table[max(keys, key=len)] if keys else None


def topology_devices(name: str) -> list:
    """Compile-only devices of a TPU topology: ``v4-128``/``v5p-16``/``v5litepod-8`` (slice name; ``v5e-8`` too) or
    ``v4:4x4x4``/``v5p:2x2x2``/``v5e:2x4``."""
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - jax always has it
        raise RuntimeError("this jax has no jax.experimental.topologies") from e
    if name in V4_TOPOLOGIES:
        name = "v4:" + V4_TOPOLOGIES[name]
    elif name in V5P_TOPOLOGIES:
        name = "v5p:" + V5P_TOPOLOGIES[name]
    elif name.replace("v5e-", "v5litepod-", 1) in V5E_TOPOLOGIES:
        name = "v5e:" + V5E_TOPOLOGIES[name.replace("v5e-", "v5litepod-", 1)]
    if ":" not in name:
        slices = sorted(V4_TOPOLOGIES) + sorted(V5P_TOPOLOGIES) + sorted(V5E_TOPOLOGIES)
        raise ValueError(
            f"unknown topology {name!r}: use a slice name {slices} or e.g. 'v4:4x4x4', 'v5p:2x2x2', 'v5e:2x4'"
        )
    generation, dims = name.split(":", 1)
    shape = tuple(int(d) for d in dims.split("x"))
    kwargs: dict[str, Any] = {}
    if generation in ("v4", "v5p"):
        kwargs.update(
            chip_config_name="megacore", chips_per_host_bounds=(2, 2, 1), wrap=tuple(d % 4 == 0 for d in shape)
        )
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name, num_slices=1, **kwargs)
    except Exception as e:  # noqa: BLE001 - libtpu missing or unknown name: one clear message
        raise RuntimeError(
            f"could not build TPU topology {name!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Compiling for TPUs on this host needs libtpu: pip install -e '.[tpu]'"
        ) from e
    return list(desc.devices)


def abstract_batch(
    model_config, global_batch: int, example_shape: tuple[int, ...] | None = None
) -> dict[str, jax.ShapeDtypeStruct]:
    """The training batch the step expects, as shapes: latents of ``example_shape`` (default the model's training
    size as its family gives it: images (H, W, C), videos (F, H, W, C)) plus the family's condition."""
    family = family_of(model_config)
    example = tuple(example_shape or family.example_shape(model_config))
    batch = {"x": jax.ShapeDtypeStruct((global_batch, *example), jnp.float32)}
    batch.update(family.condition_specs(model_config, global_batch))
    return batch


def _compile(fn, *args) -> tuple[Any, str | None, float]:
    """``(compiled or None, out-of-memory error or None, seconds)`` of lowering and compiling ``fn(*args)``."""
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    try:
        return lowered.compile(), None, time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - out of memory is a result here, not a crash
        return None, str(e).splitlines()[0][:500], time.perf_counter() - t0


def plan(
    config,
    devices: list | None = None,
    *,
    mfu: float = 0.4,
    sample: bool = False,
    example_shape: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Compile the train step of ``config`` for ``devices`` (default: this host's) and describe its cost.

    ``sample=True`` compiles one guided sampling step instead: the model's forward pass over the classifier-free
    guidance batch (2 × ``config.batch_size`` latents at the model's ``input_size``) with the params sharded as in
    training (no optimizer state), e.g. to check that 4K sampling fits with a ``sequence`` mesh axis.
    ``example_shape`` is one example's latent shape when it is not the model's default square one, e.g. a Wan clip
    of 81 frames at 480×832: (21, 60, 104, 16)."""
    from dit_jax.models import build
    from dit_jax.train.setup import prepare
    from dit_jax.train.state import param_shardings, state_shardings
    from dit_jax.train.steps import make_train_step

    setup = prepare(config, devices=devices)
    if devices and devices[0].platform == "tpu" and setup.model_config.attention_backend == "auto":
        # this process runs on the CPU, where `auto` would pick XLA: compile what a TPU host's `auto` runs
        tpu_model = setup.model_config.replace(attention_backend="pallas")
        step_cfg = dataclasses.replace(setup.step_cfg, model_config=tpu_model)
        setup = dataclasses.replace(setup, model_config=tpu_model, step_cfg=step_cfg)
    cfg, model_config, mesh = setup.config, setup.model_config, setup.mesh
    rows = 2 * cfg.batch_size if sample else cfg.batch_size
    batch = abstract_batch(model_config, rows, example_shape)
    with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules), sequence_mode(cfg.sequence_mode):
        batch_sh = {k: batch_sharding(mesh, len(v.shape)) for k, v in batch.items()}
        if sample:
            params, p_sh = param_shardings(model_config, mesh)
            family, module = family_of(model_config), build(model_config)
            t = jax.ShapeDtypeStruct((rows,), jnp.float32)

            def forward(params, batch, t):
                cond = family.condition(model_config, batch)
                return family.apply(module, params, batch["x"], t, cond)

            step = jax.jit(forward, in_shardings=(p_sh, batch_sh, batch_sharding(mesh, 1)))
            compiled, error, seconds = _compile(step, params, batch, t)
        else:
            step_cfg = dataclasses.replace(setup.step_cfg, example_order=example_order(mesh, cfg.batch_size))
            abstract, shardings = state_shardings(model_config, setup.tx, mesh, lora=setup.step_cfg.lora)
            params = abstract.params if abstract.base_params is None else abstract.base_params  # the model's
            step = jax.jit(
                make_train_step(step_cfg),
                in_shardings=(shardings, batch_sh),
                out_shardings=(shardings, NamedSharding(mesh, P())),
                donate_argnums=0,
            )
            compiled, error, seconds = _compile(step, abstract, batch)

    kind = mesh.devices.flat[0].device_kind
    example = (1, *batch["x"].shape[1:])
    fwd = family_of(model_config).batch_flops(model_config, {"x": example})  # one example, the default text length
    passes = 4 if model_config.remat == "full" else 3  # backward ≈ 2 forwards; full remat recomputes one
    step_flops = fwd * rows if sample else fwd * passes * cfg.batch_size
    peak = per_kind(PEAK_BF16, kind)
    report: dict[str, Any] = {
        "model": cfg.model.name,
        "step": "sampling (guided forward)" if sample else "training",
        "parameters": count_params(params),
        "devices": f"{mesh.devices.size} × {kind}",
        "mesh": describe_mesh(mesh),
        "global_batch": cfg.batch_size,
        "example_shape": list(example[1:]),
        "tokens_per_example": family_of(model_config).num_tokens(model_config, example[1:]),
        "compile_seconds": round(seconds, 1),
        "step_tflops": round(step_flops / 1e12, 2),
        "fits": error is None,
    }
    if peak and model_config.dtype in ("bfloat16", "bf16"):
        report[f"step_seconds_at_{int(mfu * 100)}pct_mfu"] = round(step_flops / (peak * mesh.devices.size * mfu), 3)
    if error is not None:
        report["error"] = error
        return report
    mem = compiled.memory_analysis()
    if mem is not None:
        gib = 2**30
        args, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
        alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
        report["bytes_per_device"] = dict(arguments=args, outputs=out, aliased=alias, temporaries=temp)
        report.update(
            argument_gib=round(args / gib, 3),
            output_gib=round(out / gib, 3),
            temp_gib=round(temp / gib, 3),
            total_gib_per_device=round((args + out - alias + temp) / gib, 3),
        )
        hbm = per_kind(HBM_BYTES, kind)
        if hbm:
            report["hbm_gib_per_device"] = round(hbm / gib, 2)
    return report


def main(argv: list[str]) -> None:
    from absl import flags
    from ml_collections import config_flags

    from dit_jax.train.setup import ConfigError

    config_flags.DEFINE_config_file("config", None, "Training config file (configs/NAME.py).", lock_config=False)
    flags.DEFINE_string(
        "topology",
        None,
        "TPU topology to compile for: v4-8 … v4-4096, v5p-8 … v5p-4096 or e.g. v4:4x4x4 (needs libtpu).",
    )
    flags.DEFINE_float("mfu", 0.4, "MFU assumed for the step-time estimate.")
    flags.DEFINE_bool("sample", False, "Compile one guided sampling step (forward over 2 × batch) instead of training.")
    flags.DEFINE_list(
        "example_shape",
        None,
        "One example's latent shape if not the model's square default, e.g. 21,60,104,16 (Wan: 81 frames, 480×832).",
    )
    flags.mark_flags_as_required(["config"])
    flags.FLAGS(argv)
    try:
        devices = topology_devices(flags.FLAGS.topology) if flags.FLAGS.topology else None
        shape = flags.FLAGS.example_shape
        shape = tuple(int(v) for v in shape) if shape else None
        report = plan(flags.FLAGS.config, devices, mfu=flags.FLAGS.mfu, sample=flags.FLAGS.sample, example_shape=shape)
    except (ConfigError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    if not report["fits"]:
        print(
            "the step does not compile for these devices (see 'error'): lower the batch, add fsdp, or remat",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv)
