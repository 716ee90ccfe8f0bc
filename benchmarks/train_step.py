"""Training throughput (images/s, MFU) of class-conditional DiT at 256 px on precomputed latents (32×32×4):
the dit_jax train step vs a PyTorch step of the same model (facebookresearch/DiT recipe), same device, same run.

  python -m benchmarks.train_step                               # GPU: DiT-XL/2, batch 64, bf16
  python -m benchmarks.train_step --models DiT-S/2 --batch 8    # CPU: the DiT-S/2 ratio (issue 4 §9)

dit_jax: the trainer's own step (``dit_jax.train``): ``create_optimizer`` (AdamW, lr 1e-4, weight decay 0),
``make_schedule``/``make_loss_fn`` for the DDPM objective with learned sigma (MSE on ε + the VLB term with the
mean frozen), class dropout 0.1, EMA 0.9999, NaN guard, built with ``state_shardings``/``create_train_state`` on
a one-axis mesh and jitted with ``donate_argnums=0``, as ``train_and_evaluate`` does; blocks scanned and no remat by
default, as in configs/dit_xl2_imagenet256.py.
PyTorch: the diffusers ``DiTTransformer2DModel`` with the same weights (SDPA attention, class dropout 0.1 in train
mode), ``torch.optim.AdamW(lr=1e-4, weight_decay=0)`` (fused on CUDA), the ADM hybrid loss written in torch
(uniform t, MSE on ε + VLB with the mean detached, bits/dim), EMA by ``_foreach_mul_/_foreach_add_``; bf16 by
autocast over float32 weights (dit_jax: float32 params, bf16 compute). ``torch.compile`` of the model + loss
(``--torch-compile auto``: on, falling back to eager with a note if compilation fails).

Both sides train on one fixed batch already on the device (data loading excluded). MFU = 3 × analytic forward
FLOPs (``dit_jax.models.flops``) × batch / step time / the device's dense bf16 peak, reported for bf16 runs on a
known accelerator. One JSON line per case (see benchmarks/common.py).
"""

import argparse
import math
import time

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.builders import torch_transformer
from benchmarks.common import (
    comparison_fields,
    default_dtype,
    emit,
    jax_dtype,
    jax_sync,
    on_accelerator,
    peak_flops,
    time_interleaved,
    torch_device,
    torch_sync,
    wait_quiet,
)
from dit_jax import models
from dit_jax.models.flops import forward_flops
from dit_jax.parallel.mesh import batch_sharding, create_mesh
from dit_jax.parallel.rules import logical_rules
from dit_jax.train.objectives import cond_dropout_prob, make_loss_fn, make_schedule
from dit_jax.train.optimizers import create_optimizer
from dit_jax.train.state import create_train_state, state_shardings
from dit_jax.train.steps import StepConfig, make_train_step

LATENT = 32  # 256 px / 8


def jax_trainer(model_config, batch_np: dict, seed: int = 0):
    """``(step() -> (state, metrics), params)``: the trainer's step, compiled with donation; ``params`` (float32) seed
    the torch model so both sides start from the same weights."""
    mesh = create_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])  # one device, as torch
    rules = logical_rules()
    tx, lr_schedule = create_optimizer({"name": "adamw", "lr": 1e-4, "weight_decay": 0.0}, total_steps=10**6)
    schedule = make_schedule("ddpm", {}, model_config)
    step_cfg = StepConfig(
        model_config=model_config,
        loss_fn=make_loss_fn("ddpm", {}, schedule, model_config.patch_size),
        tx=tx,
        lr_schedule=lr_schedule,
        objective="ddpm",
        ema_decay=0.9999,
        cond_dropout_prob=cond_dropout_prob(None, model_config),
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        _, shardings = state_shardings(model_config, tx, mesh)
        state = create_train_state(model_config, tx, shardings, seed)
        batch = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in batch_np.items()}
        batch_sh = {k: batch_sharding(mesh, v.ndim) for k, v in batch.items()}
        step_fn = jax.jit(
            make_train_step(step_cfg),
            in_shardings=(shardings, batch_sh),
            out_shardings=(shardings, NamedSharding(mesh, P())),
            donate_argnums=0,
        )
        t0 = time.perf_counter()
        compiled = step_fn.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
    params = jax.tree.map(np.asarray, state.params)
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], batch)
        return holder["state"].step, metrics

    return step, params, compile_s


class TorchDDPM:
    """The ADM Gaussian diffusion's training loss (learned range variance, MSE + VLB) as torch tensors."""

    def __init__(self, device: str, num_timesteps: int = 1000):
        import torch

        betas = np.linspace(1e-4, 0.02, num_timesteps, dtype=np.float64)  # DiT's linear schedule
        ac = np.cumprod(1.0 - betas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        tables = {
            "sa": np.sqrt(ac),
            "s1m": np.sqrt(1.0 - ac),
            "recip": np.sqrt(1.0 / ac),
            "recipm1": np.sqrt(1.0 / ac - 1.0),
            "c1": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "c2": (1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
            "min_log": np.log(np.append(post_var[1], post_var[1:])),
            "max_log": np.log(betas),
        }
        self.t = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in tables.items()}
        self.n = num_timesteps

    def at(self, name, t):
        return self.t[name][t][:, None, None, None]

    @staticmethod
    def _normal_kl(m1, lv1, m2, lv2):
        import torch

        return 0.5 * (-1.0 + lv2 - lv1 + torch.exp(lv1 - lv2) + (m1 - m2) ** 2 * torch.exp(-lv2))

    @staticmethod
    def _decoder_nll(x, means, log_scales):
        import torch

        def cdf(v):
            return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))

        centered, inv = x - means, torch.exp(-log_scales)
        cdf_plus, cdf_min = cdf(inv * (centered + 1.0 / 255)), cdf(inv * (centered - 1.0 / 255))
        log_plus = torch.log(cdf_plus.clamp(min=1e-12))
        log_one_minus = torch.log((1.0 - cdf_min).clamp(min=1e-12))
        log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
        ll = torch.where(x < -0.999, log_plus, torch.where(x > 0.999, log_one_minus, log_delta))
        return -ll

    def loss(self, model, x0, y, autocast_dtype):
        import torch

        b, c = x0.shape[:2]
        t = torch.randint(0, self.n, (b,), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = self.at("sa", t) * x0 + self.at("s1m", t) * noise
        with torch.autocast(x0.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(x_t, timestep=t, class_labels=y, return_dict=False)[0]
        eps, v = out.float().split(c, dim=1)
        mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
        # VLB with the mean frozen: trains only the variance
        true_mean = self.at("c1", t) * x0 + self.at("c2", t) * x_t
        pred_x0 = self.at("recip", t) * x_t - self.at("recipm1", t) * eps.detach()
        model_mean = self.at("c1", t) * pred_x0 + self.at("c2", t) * x_t
        frac = (v + 1.0) / 2.0
        model_log_var = frac * self.at("max_log", t) + (1.0 - frac) * self.at("min_log", t)
        kl = self._normal_kl(true_mean, self.at("min_log", t), model_mean, model_log_var).mean(dim=(1, 2, 3))
        nll = self._decoder_nll(x0, model_mean, 0.5 * model_log_var).mean(dim=(1, 2, 3))
        vb = torch.where(t == 0, nll, kl) / math.log(2.0)
        return (mse + vb).mean()


def torch_trainer(model_config, params, batch_np: dict, dtype: str, compile_mode: str):
    """``(step(), compiled: bool, note)``: one facebookresearch/DiT training iteration on a fixed batch."""
    import copy

    import torch

    device = torch_device()
    model = torch_transformer(model_config, params, device, torch.float32).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=device == "cuda")
    diffusion = TorchDDPM(device)
    x = torch.from_numpy(batch_np["x"].transpose(0, 3, 1, 2).copy()).to(device)
    y = torch.from_numpy(batch_np["y"].astype(np.int64)).to(device)
    autocast = torch.bfloat16 if dtype == "bf16" else None
    params_list = list(model.parameters())
    ema_list = list(ema.parameters())

    def loss_fn(x, y):
        return diffusion.loss(model, x, y, autocast)

    def make_step(fn):
        def step():
            opt.zero_grad(set_to_none=True)
            loss = fn(x, y)
            loss.backward()
            opt.step()
            with torch.no_grad():
                torch._foreach_mul_(ema_list, 0.9999)
                torch._foreach_add_(ema_list, params_list, alpha=1.0 - 0.9999)
            return loss

        return step

    note = None
    if compile_mode != "off":
        try:
            t0 = time.perf_counter()
            step = make_step(torch.compile(loss_fn))
            step()  # compiles
            torch_sync(None)
            return step, True, f"torch.compile took {time.perf_counter() - t0:.0f} s"
        except Exception as e:  # inductor needs a working C++/Triton toolchain
            if compile_mode == "on":
                raise
            note = f"torch.compile failed ({type(e).__name__}: {str(e)[:120]}); eager"
    return make_step(loss_fn), False, note


def release_torch() -> None:
    """Give torch's cached device memory back (JAX's allocator cannot use what torch's cache holds)."""
    import gc

    import torch

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main():
    on_acc = on_accelerator()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="DiT-XL/2" if on_acc else "DiT-S/2", help="comma list of DiT presets")
    ap.add_argument("--batch", type=int, default=64 if on_acc else 8)
    ap.add_argument("--depth", type=int, default=None, help="override depth (CPU: keeps XL/2 within memory)")
    ap.add_argument("--dtype", default=default_dtype(), choices=["bf16", "fp32"])
    ap.add_argument(
        "--scan",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="dit_jax: scanned blocks (nn.scan), as configs/dit_xl2_imagenet256.py; --no-scan: one HLO per block",
    )
    ap.add_argument("--remat", default="none", help="dit_jax remat policy")
    ap.add_argument("--torch-compile", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--iters", type=int, default=20 if on_acc else 5)
    ap.add_argument("--warmup", type=int, default=3 if on_acc else 2)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument(
        "--order",
        default="sequential" if on_acc else "interleaved",
        choices=["interleaved", "sequential"],
        help="interleaved: both states resident, steps timed round-robin (CPU: shares load changes); sequential: "
        "torch first, its memory released, then dit_jax (GPU: each side gets the whole memory)",
    )
    ap.add_argument("--wait-quiet", type=float, default=None, help="before each case, wait for load average < X")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    batch_np = {
        "x": rng.standard_normal((args.batch, LATENT, LATENT, 4)).astype(np.float32),
        "y": rng.integers(0, 1000, args.batch).astype(np.int32),
    }
    peak = peak_flops()
    for name in args.models.split(","):
        over = dict(dtype=jax_dtype(args.dtype), scan_blocks=args.scan, remat=args.remat, input_size=LATENT)
        if args.depth:
            over["depth"] = args.depth
        cfg = models.preset(name, **over)
        load = wait_quiet(args.wait_quiet)
        timing = dict(warmup=args.warmup, iters=args.iters)
        t_note = None
        if args.order == "sequential":
            t = {}
            if not args.no_torch:  # the trainer's initial weights (zero adaLN/final layers), then freed
                t_step, compiled, t_note = torch_trainer(
                    cfg, models.init_params(cfg), batch_np, args.dtype, args.torch_compile
                )
                t.update(time_interleaved({"torch": (t_step, torch_sync)}, **timing))
                del t_step
                release_torch()
            j_step, params, compile_s = jax_trainer(cfg, batch_np)
            del params
            t.update(time_interleaved({"jax": (j_step, jax_sync)}, **timing))
        else:
            j_step, params, compile_s = jax_trainer(cfg, batch_np)
            fns = {"jax": (j_step, jax_sync)}
            if not args.no_torch:
                t_step, compiled, t_note = torch_trainer(cfg, params, batch_np, args.dtype, args.torch_compile)
                fns["torch"] = (t_step, torch_sync)
            del params
            t = time_interleaved(fns, **timing)
        flops = 3 * forward_flops(cfg, LATENT, LATENT) * args.batch
        j_ms = t["jax"]["median_ms"]
        rec = {
            "case": f"{name} 256px train step (DDPM learned sigma, AdamW, EMA)",
            "dtype": args.dtype,
            "batch": args.batch,
            "depth": cfg.depth,
            "scan": args.scan,
            "remat": args.remat,
            "jax_ms": round(j_ms, 2),
            "jax_images_per_s": round(args.batch / j_ms * 1e3, 2),
            "jax_tflops_per_s": round(flops / j_ms / 1e9, 3),
            "jax_compile_s": round(compile_s, 1),
        }
        if peak and args.dtype == "bf16":
            rec["jax_mfu"] = round(flops / (j_ms / 1e3) / peak, 3)
        if "torch" in t:
            k_ms = t["torch"]["median_ms"]
            rec.update(
                torch_ms=round(k_ms, 2),
                torch_images_per_s=round(args.batch / k_ms * 1e3, 2),
                torch_compile=compiled,
            )
            if peak and args.dtype == "bf16":
                rec["torch_mfu"] = round(flops / (k_ms / 1e3) / peak, 3)
        rec.update(comparison_fields(t["jax"], t.get("torch"), load), order=args.order)
        if t_note:
            rec["note"] = t_note
        emit(rec)
        del t, j_step


if __name__ == "__main__":
    main()
