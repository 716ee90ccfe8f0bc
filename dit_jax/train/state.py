"""The train state and its shardings: built from ``jax.eval_shape`` → logical specs → ``jit(init, out_shardings)``.

Nothing is ever materialised whole on one device: parameters, optimizer moments and the EMA are created directly
in their shards. Optimizer-state leaves inherit the sharding of the parameter they belong to (matched by tree path);
factored statistics (CAME rows/columns) take the parameter's spec without the reduced axis.

LoRA (``lora=`` a ``dit_jax.lora.LoraConfig``): ``params``, ``opt_state`` and ``ema_params`` hold the adapters
(replicated: they are small), and ``base_params`` the frozen model weights in their usual shards.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dit_jax.lora import init_lora
from dit_jax.models import ModelConfig, build
from dit_jax.parallel.mesh import fit_sharding
from dit_jax.runs import unbox_abstract


class TrainState(struct.PyTreeNode):
    """Everything a run needs to continue: ``step`` counts train steps taken (skipped non-finite ones included)."""

    step: jax.Array  # () int32
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array  # (2,) uint32 raw key data; step keys are fold_in(rng, step)
    nan_skips: jax.Array  # () int32, consecutive skipped updates
    nan_total: jax.Array  # () int32, all skipped updates
    base_params: Any = None  # LoRA: the frozen weights the adapters in params/ema_params apply to


def _boxed_abstract_params(model_config: ModelConfig, batch: int) -> Any:
    model = build(model_config)
    inputs = model_config.dummy_inputs(batch)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs)["params"])


def param_shardings(model_config: ModelConfig, mesh: Mesh) -> tuple[Any, Any]:
    """``(abstract unboxed params, NamedSharding tree)`` under the logical rules in context."""
    batch = mesh.shape["data"] * mesh.shape["fsdp"]
    boxed = _boxed_abstract_params(model_config, batch)
    specs = nn.get_partition_spec(boxed)
    shardings = nn.logical_to_mesh_sharding(specs, mesh)
    abstract = unbox_abstract(boxed)
    shardings = jax.tree.map(lambda s, a: fit_sharding(s, a.shape), shardings, abstract)
    return abstract, shardings


def _derived_sharding(param_sh: NamedSharding, param_shape, leaf_shape, mesh: Mesh) -> NamedSharding:
    spec = tuple(param_sh.spec) + (None,) * (len(param_shape) - len(param_sh.spec))
    if tuple(leaf_shape) == tuple(param_shape):
        return param_sh
    if len(param_shape) >= 2 and tuple(leaf_shape) == tuple(param_shape[:-1]):
        return NamedSharding(mesh, P(*spec[:-1]))
    if len(param_shape) >= 2 and tuple(leaf_shape) == tuple(param_shape[:-2]) + tuple(param_shape[-1:]):
        return NamedSharding(mesh, P(*(spec[:-2] + spec[-1:])))
    return NamedSharding(mesh, P())


def opt_state_shardings(abstract_opt_state: Any, abstract_params: Any, shardings: Any, mesh: Mesh) -> Any:
    """Shard each optimizer-state leaf like the parameter at the longest matching tree-path suffix."""
    by_path = {}
    for (path, a), s in zip(
        jax.tree_util.tree_leaves_with_path(abstract_params), jax.tree.leaves(shardings), strict=True
    ):
        by_path[tuple(path)] = (a.shape, s)

    def leaf_sharding(path, leaf):
        path = tuple(path)
        for start in range(len(path)):
            hit = by_path.get(path[start:])
            if hit is not None:
                return fit_sharding(_derived_sharding(hit[1], hit[0], leaf.shape, mesh), leaf.shape)
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_opt_state)


def state_shardings(
    model_config: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, *, lora: Any = None
) -> tuple[TrainState, TrainState]:
    """``(abstract TrainState, TrainState of NamedShardings)``; call inside ``nn.logical_axis_rules``."""
    abstract_params, p_sh = param_shardings(model_config, mesh)
    replicated = NamedSharding(mesh, P())
    base, base_sh = None, None
    if lora is not None:
        base, base_sh = abstract_params, p_sh
        abstract_params = jax.eval_shape(lambda p: init_lora(p, lora, jax.random.key(0)), base)
        p_sh = jax.tree.map(lambda _: replicated, abstract_params)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=abstract_params,
        opt_state=abstract_opt,
        ema_params=abstract_params,
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
        nan_skips=jax.ShapeDtypeStruct((), jnp.int32),
        nan_total=jax.ShapeDtypeStruct((), jnp.int32),
        base_params=base,
    )
    shardings = TrainState(
        step=replicated,
        params=p_sh,
        opt_state=opt_state_shardings(abstract_opt, abstract_params, p_sh, mesh),
        ema_params=p_sh,
        rng=replicated,
        nan_skips=replicated,
        nan_total=replicated,
        base_params=base_sh,
    )
    return abstract, shardings


def create_train_state(
    model_config: ModelConfig,
    tx: optax.GradientTransformation,
    shardings: TrainState,
    seed: int,
    params: Any | None = None,
    *,
    lora: Any = None,
) -> TrainState:
    """A fresh state built in its shards; ``params`` (already sharded like ``shardings.params``, or like
    ``shardings.base_params`` with ``lora``) skip the init. With ``lora`` the params are the frozen base and the
    trained ones are fresh adapters (``B = 0``: the model starts as the base)."""
    model = build(model_config)
    mesh = jax.tree.leaves(shardings.params)[0].mesh
    batch = mesh.shape["data"] * mesh.shape["fsdp"]

    def init(params) -> TrainState:
        init_key, rng_key = jax.random.split(jax.random.key(seed))
        if params is None:
            params = nn.meta.unbox(model.init(init_key, *model_config.dummy_inputs(batch))["params"])
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
        base = None
        if lora is not None:
            base = jax.lax.with_sharding_constraint(params, shardings.base_params)
            params = init_lora(base, lora, jax.random.fold_in(jax.random.key(seed), 1))
        params = jax.lax.with_sharding_constraint(params, shardings.params)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            ema_params=jax.tree.map(jnp.copy, params),
            rng=jax.random.key_data(rng_key).astype(jnp.uint32),
            nan_skips=jnp.zeros((), jnp.int32),
            nan_total=jnp.zeros((), jnp.int32),
            base_params=base,
        )

    if params is None:
        return jax.jit(lambda: init(None), out_shardings=shardings)()
    given = shardings.params if lora is None else shardings.base_params
    return jax.jit(init, in_shardings=(given,), out_shardings=shardings)(params)
