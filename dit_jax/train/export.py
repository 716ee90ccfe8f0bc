"""Export a training run's EMA weights: ``python -m dit_jax.train.export --workdir DIR --out MODEL_DIR``.

Writes a model directory (``dit_jax.checkpoint.save_model``: config JSON + params) that ``load_model`` and the
pipelines read, and optionally a torch file or diffusers folder (``--to_torch FILE --format original|diffusers``).
The exported config uses the looped block layout and no remat (execution switches of training, not of the model).
"""

import argparse
import sys
from pathlib import Path
from typing import Any

from dit_jax.models import ModelConfig


def export_params(
    workdir: str,
    out: str | None = None,
    *,
    step: int | None = None,
    raw: bool = False,
    to_torch: str | None = None,
    torch_format: str = "original",
    overwrite: bool = False,
) -> tuple[ModelConfig, Any]:
    """Load checkpoint ``step`` (default: latest) of ``workdir`` and write it; returns ``(config, host params)``."""
    from dit_jax.checkpoint import save_model
    from dit_jax.models import set_scan
    from dit_jax.train.checkpoints import host_params, load_ema_params

    config, params = load_ema_params(workdir, step, item="params" if raw else "ema_params")
    config, params = set_scan(config, host_params(params), False)
    config = config.replace(remat="none")
    if out:
        save_model(out, config, params, overwrite=overwrite)
    if to_torch:
        from dit_jax.convert import save_torch

        save_torch(to_torch, config, params, format=torch_format, overwrite=overwrite)
    return config, params


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dit_jax.train.export", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="training run directory")
    p.add_argument("--out", help="model directory to write (config.json + params)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--raw", action="store_true", help="export the raw params instead of the EMA")
    p.add_argument("--to_torch", "--to-torch", dest="to_torch", help="torch file (.pt/.safetensors) or folder")
    p.add_argument("--format", default="original", choices=("original", "diffusers"), help="torch key format")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = p.parse_args(argv)
    if not args.out and not args.to_torch:
        p.error("nothing to do: give --out and/or --to_torch")
    try:
        config, _ = export_params(
            args.workdir,
            args.out,
            step=args.step,
            raw=args.raw,
            to_torch=args.to_torch,
            torch_format=args.format,
            overwrite=args.overwrite,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in (args.out, args.to_torch):
        if path:
            print(f"wrote {Path(path)} ({type(config).__name__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
