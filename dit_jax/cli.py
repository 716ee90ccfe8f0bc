"""Command-line flags shared by the entry points (``dit_jax.sample``, ``dit_jax.demo``).

Standard library only: a ``--help`` that builds these flags imports no JAX.
"""

import argparse
from typing import Any


def add_memory_arguments(p: argparse.ArgumentParser) -> None:
    """``--quantize`` and ``--offload``: how a large model fits a small device (``dit_jax.pipelines.load``)."""
    p.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        help="weight-only quantisation: int8 for the transformer and the text encoders; int4 (packed, one scale per "
        "64 weights) for the transformer with int8 text encoders",
    )
    p.add_argument(
        "--offload",
        action="store_true",
        help="keep the weights in host memory and place each component on the device only while it runs (text "
        "encoders, then the transformer, then the VAE): less device memory, one transfer per component per call",
    )


def memory_options(args: argparse.Namespace) -> dict[str, Any]:
    """``pipelines.load`` keywords of the flags of ``add_memory_arguments`` that were given."""
    return {**({"quantize": args.quantize} if args.quantize else {}), **({"offload": True} if args.offload else {})}
