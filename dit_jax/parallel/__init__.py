"""Device meshes, logical-axis sharding rules and multi-host helpers."""

from dit_jax.parallel.rules import DEFAULT_RULES, logical_rules

__all__ = ["DEFAULT_RULES", "logical_rules"]
