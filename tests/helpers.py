import torch

from conftest import DEVICE, REL_TOL


def randn(*shape, dtype=torch.float32, gen=None, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * scale).to(device=DEVICE, dtype=dtype)


def rel_err(out, ref) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "output has non-finite values"
    denom = ref.norm()
    if denom == 0:
        return float(out.norm())
    return float((out - ref).norm() / denom)


def assert_close_rel(out, ref, dtype):
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err <= REL_TOL[dtype], f"relative error {err:.3g} > {REL_TOL[dtype]:.3g} for {dtype}"


def assert_within_dot_bound(out, ref, magnitude, dtype):
    """Elementwise |out - ref| <= tol * magnitude, where ``magnitude`` is sum_i |w_i x_i| (+ |b|) of each
    output: the scale a rounding error of a dot product is proportional to. A norm-relative bound fails
    on an output whose terms cancel (a small result from large terms), which is not a kernel error."""
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out, ref, magnitude = out.double().cpu(), ref.double().cpu(), magnitude.double().cpu()
    assert torch.isfinite(out).all(), "output has non-finite values"
    excess = (out - ref).abs() - REL_TOL[dtype] * magnitude
    worst = int(excess.flatten().argmax()) if excess.numel() else 0
    assert excess.numel() == 0 or excess.flatten()[worst] <= 0, (
        f"output {worst}: |{out.flatten()[worst]:.6g} - {ref.flatten()[worst]:.6g}| exceeds "
        f"{REL_TOL[dtype]:.3g} x {magnitude.flatten()[worst]:.6g} for {dtype}")
