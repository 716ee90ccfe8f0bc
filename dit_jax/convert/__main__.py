"""Command line: ``python -m dit_jax.convert SRC OUT_DIR [--format F] [--weights ema|model] [--set key=value ...]``
imports a PyTorch checkpoint into a model directory; ``python -m dit_jax.convert --to-torch MODEL_DIR OUT_FILE
--format original|diffusers`` exports one (``.safetensors``, ``.pt``, or a diffusers folder for a path without a
suffix). ``--set`` values are parsed as JSON where possible (``--set num_heads=16 --set preset=DiT-XL/2``).
``python -m dit_jax.convert --lora WORKDIR OUT.safetensors [--lora-format peft|kohya]`` writes a LoRA run's EMA
adapters as a diffusers/peft or kohya file.
A failed conversion prints one error line and leaves nothing behind.
"""

import argparse
import json
import sys
from typing import Any


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["k=v", ...]`` → ``{k: json.loads(v) or the string v}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
        if isinstance(out[key], list):
            out[key] = tuple(out[key])
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dit_jax.convert",
        description="Convert DiT/PixArt checkpoints between PyTorch (original or diffusers) and dit_jax model dirs.",
    )
    p.add_argument("src", help="checkpoint file/folder to import (or MODEL_DIR with --to-torch)")
    p.add_argument("out", help="model directory to write (or OUT_FILE with --to-torch)")
    p.add_argument("--to-torch", action="store_true", help="export a model directory to a PyTorch file/folder")
    p.add_argument("--format", choices=("original", "diffusers"), help="checkpoint format (import: detected)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights of a training ckpt")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--lora", action="store_true", help="SRC is a LoRA training run: write its adapters to OUT")
    p.add_argument("--lora-format", choices=("peft", "kohya"), default="peft", help="LoRA file format (with --lora)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the converter; returns the exit status (0 ok, 1 conversion error, 2 usage error)."""
    args = _parser().parse_args(argv)
    try:
        overrides = parse_set(args.set)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from dit_jax.checkpoint import load_model, save_model
    from dit_jax.convert import from_torch, save_torch
    from dit_jax.models import count_params

    try:
        if args.lora:  # --format: the model's torch names (default: diffusers for peft, original for kohya)
            from dit_jax.convert.lora import export_run

            path = export_run(
                args.src,
                args.out,
                format=args.lora_format,
                naming=args.format,
                ema=args.weights == "ema",
                overwrite=args.overwrite,
            )
            print(f"wrote {path} ({args.lora_format} LoRA)")
            return 0
        if args.to_torch:
            if args.format is None:
                print("error: --to-torch needs --format original|diffusers", file=sys.stderr)
                return 2
            if overrides:
                print("error: --set applies to imports only", file=sys.stderr)
                return 2
            config, params = load_model(args.src)
            path = save_torch(args.out, config, params, format=args.format, overwrite=args.overwrite)
            print(f"wrote {path} ({args.format} format, {count_params(params):,} parameters)")
            return 0
        config, params = from_torch(args.src, format=args.format, weights=args.weights, **overrides)
        save_model(args.out, config, params, overwrite=args.overwrite)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(config.to_dict(), indent=2))
    print(f"parameters: {count_params(params):,}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
