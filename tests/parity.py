"""Shared helpers of the parity tests: error figures, bit-exact comparisons, torch ↔ numpy layouts and state dicts,
and re-randomised torch models (zero-initialised layers included, which would otherwise hide mapping bugs).

Imported like ``torch_reference`` (``tests/`` is on ``sys.path``): ``from parity import ...``. torch is imported
inside the torch helpers, so JAX-only tests can use the comparisons without loading it.
"""

import jax
import numpy as np

# ---- error figures ---------------------------------------------------------------------------------------------


def max_abs_err(got, want) -> float:
    """max |got − want|."""
    return float(np.abs(np.asarray(got) - np.asarray(want)).max())


def rel_err(got, want) -> float:
    """max |got − want| / max |want|, computed in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def check_parity(name: str, got: np.ndarray, want: np.ndarray) -> float:
    """Print the max abs error of ``got`` against the reference ``want`` and assert it is at most 1e-5 × the
    reference scale (max |want|, at least 1). Returns the error."""
    err = max_abs_err(got, want)
    scale = max(1.0, float(np.max(np.abs(want))))
    print(f"{name}: max abs err {err:.2e} (reference scale {scale:.2f})")
    assert got.shape == want.shape
    assert err <= 1e-5 * scale, f"{name}: {err} > {1e-5 * scale}"
    return err


def check_images(name: str, got, want, got_z=None, want_z=None, min_inside: float = 0.6) -> float:
    """A pipeline's images (NHWC in [0, 1]) against diffusers': max abs error ≤ 3e-4, with more than ``min_inside``
    of the reference pixels inside (0, 1) so clipping does not hide differences; the final latents, when given, to
    1e-3 × their scale (max |want_z|, at least 1). Prints the figures; returns the image error."""
    err = max_abs_err(got, want)
    inside = float(np.mean((want > 0) & (want < 1)))
    line = f"{name}: max |image error| {err:.2e}, {inside:.0%} of reference pixels inside (0, 1)"
    if got_z is not None:
        err_z = max_abs_err(got_z, want_z)
        line += f", max |latent error| {err_z:.2e} (|latent| ≤ {np.abs(want_z).max():.2f})"
        assert err_z <= 1e-3 * max(1.0, float(np.abs(want_z).max()))
    print(line)
    assert got.shape == want.shape
    assert inside > min_inside  # the comparison is not hidden by clipping
    assert err <= 3e-4
    return err


# ---- bit-exact comparisons -------------------------------------------------------------------------------------


def assert_bit_exact(got: dict, want: dict) -> None:
    """Two state dicts: the same keys, and every ``got`` array float32 with ``want``'s shape and values."""
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))[:10]
    for k in want:
        assert got[k].dtype == np.float32 and got[k].shape == want[k].shape, k
        assert np.array_equal(got[k], want[k]), k


def assert_trees_equal(got, want) -> None:
    """Two pytrees: the same structure and bit-equal leaves."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


# ---- layouts and torch ↔ numpy ---------------------------------------------------------------------------------


def nhwc(x) -> np.ndarray:
    """NCHW → NHWC (numpy, a view where possible)."""
    return np.asarray(x).transpose(0, 2, 3, 1)


def nchw(x) -> np.ndarray:
    """NHWC → NCHW (numpy, a view where possible)."""
    return np.asarray(x).transpose(0, 3, 1, 2)


def torch_nchw(x):
    """NHWC array → contiguous float32 NCHW torch tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(nchw(np.asarray(x, np.float32))))


def to_numpy(t) -> np.ndarray:
    """A torch tensor as a float32 numpy array (a copy)."""
    return t.detach().cpu().numpy().astype(np.float32)


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    """``model.state_dict()`` as float32 numpy arrays (what a checkpoint holds and a converter reads)."""
    return {k: to_numpy(v) for k, v in model.state_dict().items()}


def state_dict_torch(sd: dict[str, np.ndarray]) -> dict:
    """A numpy state dict as torch tensors (sharing memory), e.g. to ``torch.save``."""
    import torch

    return {k: torch.from_numpy(v) for k, v in sd.items()}


# ---- re-randomising torch models (zero-initialised layers included) ------------------------------------------


def randomize_(model, seed: int = 0, skip: tuple[str, ...] = ()):
    """Re-randomise every parameter and the learned null caption of an original (``torch_reference``) or diffusers
    transformer, zero-initialised layers included, in sorted-name order.

    Weights (ndim ≥ 2): N(0, 1/fan_in); norm scales 1 + N(0, 0.2²); biases, modulation tables and norm shifts
    N(0, 0.2²). ``pos_embed`` stays the fixed table; names containing any of ``skip`` are left untouched (e.g. to
    keep the Conv Avg Init of ``attn.sr``/``attn.norm``). Returns ``model``.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    tensors = dict(model.named_parameters())
    tensors.update((k, v) for k, v in model.named_buffers() if k.endswith("y_embedding"))
    with torch.no_grad():
        for name, p in sorted(tensors.items()):
            if name.endswith("pos_embed") or any(s in name for s in skip):
                continue
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("y_embedding"):
                p.copy_(noise / p.shape[-1] ** 0.5)
            elif p.ndim >= 2 and not name.endswith("scale_shift_table"):
                p.copy_(noise / (p[0].numel() ** 0.5))
            elif p.ndim == 1 and name.endswith("weight"):  # LayerNorm scale
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return model


def randomize_encoder_(model, seed: int = 0, norms: str = "norm", unit: tuple[str, ...] = ()):
    """Draw every parameter of a VAE or T5 encoder afresh, in ``named_parameters`` order: norm scales (names
    containing ``norms`` and ending in ``weight``) 1 ± 0.1, names containing any of ``unit`` N(0, 1), other
    vectors (biases) ±0.1, weights N(0, 1/fan_in). Returns ``model``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if norms in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif any(u in name for u in unit):
                p.copy_(noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)
    return model


def randomize_normal_(model, std: float):
    """Every parameter N(0, std²), drawn from torch's global generator (seed it first). Returns ``model``."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model
