"""Model offload: a component's params kept in host memory and placed on the devices only while it runs.

``pipelines.load(..., offload=True)`` keeps the transformer, the VAE and the text encoders as NumPy trees (``to_host``;
int8/int4 kernels stay ``Int8Kernel``/``Int4Kernel`` nodes with NumPy children) and places each one with ``place``
(``jax.device_put`` with the component's shardings) for the stage that needs it, then ``release`` deletes the placed
buffers, so the device memory is free before the next stage is placed. The jitted functions take the params as
arguments (none closes over them), so no compiled function keeps a released buffer alive.

Host memory is plain NumPy (pageable): it works the same on CPU, GPU and TPU. Pinned host memory
(``memory_kind="pinned_host"``) transfers faster on GPU and TPU, but a replicated sharding keeps one host copy per
device; NumPy keeps one in all.
"""

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np


def to_host(tree: Any) -> Any:
    """``tree`` with every leaf a NumPy array in host memory (device arrays are copied back; pytree nodes such as
    ``Int8Kernel``/``Int4Kernel`` keep their structure and static fields). None stays None."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def place(tree: Any, shardings: Any) -> Any:
    """``tree`` (host) placed on the devices with ``shardings`` (one sharding for every leaf, or a matching tree)."""
    return jax.device_put(tree, shardings)


def release(placed: Any, host: Any) -> None:
    """Delete the device buffers of ``placed`` (what ``place(host, ...)`` gave), now rather than when the last Python
    reference goes; leaves that are ``host``'s own objects (already device arrays) are left alone."""
    own = {id(x) for x in jax.tree.leaves(host)}
    for x in jax.tree.leaves(placed):
        if isinstance(x, jax.Array) and id(x) not in own and not x.is_deleted():
            x.delete()


@contextlib.contextmanager
def on_device(host: Any, shardings: Any) -> Iterator[Any]:
    """``host`` placed with ``shardings`` for the block and released after it. The caller waits for the results of
    the computations that read the params inside the block."""
    placed = place(host, shardings)
    try:
        yield placed
    finally:
        release(placed, host)


class HostParams:
    """A component's params in host memory (``params``, NumPy) and their device ``shardings``.

    ``placed()`` gives them on the devices for a block and releases them after it; inside a ``hold()`` block the first
    ``placed()`` places them and they stay placed until the outermost ``hold`` ends (one transfer for several uses,
    e.g. a text encoder that encodes the prompts and then the negative prompts)."""

    def __init__(self, params: Any, shardings: Any):
        self.params = to_host(params)
        self.shardings = shardings
        self._device: Any = None
        self._holds = 0

    @contextlib.contextmanager
    def placed(self) -> Iterator[Any]:
        if self._device is not None:
            yield self._device
        elif self._holds:
            self._device = place(self.params, self.shardings)
            yield self._device
        else:
            with on_device(self.params, self.shardings) as params:
                yield params

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
            if not self._holds and self._device is not None:
                device, self._device = self._device, None
                release(device, self.params)

    @property
    def is_placed(self) -> bool:
        """Whether the params are on the devices now (inside a ``hold`` after their first use)."""
        return self._device is not None
