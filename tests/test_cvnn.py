"""Tests for spectral_core.cvnn: layers, activations, features, head invariants, learning."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from spectral_core.config import ArchConfig, DomainConfig
from spectral_core.cvnn import (
    FEATURE_NAMES,
    N_FEATURES,
    Cardioid,
    ComplexBatchNorm,
    ComplexLayerNorm,
    ComplexLinear,
    ComplexPlainBlock,
    ComplexResidualBlock,
    CReLU,
    ModReLU,
    SpectralCVNN,
    ZReLU,
    build_model,
    feature_bounds,
    theta_features,
)

C64, C128 = torch.complex64, torch.complex128
DOMAIN = DomainConfig()
L_TRUNC = 10.0


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _crandn(*shape: int, seed: int = 0, dtype: torch.dtype = C128) -> Tensor:
    g = _gen(seed)
    real = torch.float64 if dtype == C128 else torch.float32
    return torch.complex(
        torch.randn(shape, generator=g, dtype=real), torch.randn(shape, generator=g, dtype=real)
    )


def _i_pow(k: Tensor) -> Tensor:
    """i^k exactly, complex128 (a complex power would round through complex64)."""
    return torch.tensor([1, 1j, -1, -1j], dtype=C128)[k % 4]


def _sample_theta(n: int, *, seed: int) -> Tensor:
    lo = torch.tensor(DOMAIN.lower(), dtype=torch.float64)
    hi = torch.tensor(DOMAIN.upper(), dtype=torch.float64)
    return lo + (hi - lo) * torch.rand((n, 4), generator=_gen(seed), dtype=torch.float64)


def _gradcheck_module(module: nn.Module, z: Tensor) -> None:
    """gradcheck w.r.t. the complex input and every real parameter (complex128 / float64)."""
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in module.named_parameters())

    def fn(x: Tensor, *ps: Tensor) -> Tensor:
        return functional_call(module, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, (z.requires_grad_(), *params), eps=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# ComplexLinear
# --------------------------------------------------------------------------------------------


def test_linear_matches_complex_matmul() -> None:
    layer = ComplexLinear(5, 3, generator=_gen(), dtype=C128)
    with torch.no_grad():
        layer.bias_re.copy_(torch.tensor([0.1, -0.2, 0.3]))  # type: ignore[union-attr]
        layer.bias_im.copy_(torch.tensor([0.5, 0.0, -1.0]))  # type: ignore[union-attr]
    z = _crandn(4, 5)
    w = torch.complex(layer.weight_re, layer.weight_im)
    b = torch.complex(layer.bias_re, layer.bias_im)  # type: ignore[arg-type]
    expected = torch.stack([w @ z[i] + b for i in range(4)])
    torch.testing.assert_close(layer(z), expected, rtol=0, atol=1e-12)


def test_linear_glorot_init_statistics() -> None:
    fan_in, fan_out = 300, 200
    layer = ComplexLinear(fan_in, fan_out, generator=_gen(3), dtype=C128)
    w = torch.complex(layer.weight_re, layer.weight_im).detach()
    n = w.numel()
    target = 2.0 / (fan_in + fan_out)  # complex Glorot: E|W|^2 = 2 / (fan_in + fan_out)
    # |W|^2 is exponential with mean `target`: its standard deviation is also `target`
    assert abs(float(w.abs().square().mean()) - target) < 4 * target / math.sqrt(n)
    # Re and Im are each N(0, target / 2): the complex mean has SE sqrt(target / n)
    assert float(w.mean().abs()) < 4 * math.sqrt(target / n)
    # uniform phase: E[W^2] = 0 (no preferred direction), SE target / sqrt(n)
    assert float((w * w).mean().abs()) < 4 * target / math.sqrt(n)
    assert torch.all(layer.bias_re == 0) and torch.all(layer.bias_im == 0)  # type: ignore[arg-type]


def test_linear_refuses_bad_input() -> None:
    layer = ComplexLinear(4, 2, generator=_gen(), dtype=C64)
    with pytest.raises(ValueError, match="complex"):
        layer(torch.randn(3, 4))
    with pytest.raises(ValueError, match="last dimension 4"):
        layer(_crandn(3, 5, dtype=C64))
    with pytest.raises(ValueError, match="dtype"):
        layer(_crandn(3, 4, dtype=C128))
    with pytest.raises(ValueError, match="in_features"):
        ComplexLinear(0, 2, generator=_gen())
    with pytest.raises(ValueError, match="dtype"):
        ComplexLinear(2, 2, generator=_gen(), dtype=torch.float32)


def test_linear_without_bias() -> None:
    layer = ComplexLinear(3, 2, generator=_gen(), dtype=C128, bias=False)
    assert layer.bias() is None
    z = _crandn(2, 3)
    torch.testing.assert_close(layer(z), z @ layer.weight().T, rtol=0, atol=1e-14)


# --------------------------------------------------------------------------------------------
# Activations: definitions on known inputs
# --------------------------------------------------------------------------------------------

KNOWN = torch.tensor(
    [3 + 4j, -3 + 4j, 1 - 1j, -2 - 0.5j, 0j, 2 + 0j, 0 + 2j, 0.3 + 0.4j], dtype=C128
)


def test_modrelu_definition() -> None:
    act = ModReLU(KNOWN.numel(), dtype=C128)
    with torch.no_grad():
        act.bias.fill_(-1.0)
    out = act(KNOWN)
    # |3+4i| = 5 -> (5 - 1) / 5 scale; |0.3+0.4i| = 0.5 < 1 -> 0; 0 -> 0
    r = math.hypot(2, 0.5)
    expected = torch.tensor(
        [
            0.8 * (3 + 4j),
            0.8 * (-3 + 4j),
            (1 - 1j) * (math.sqrt(2) - 1) / math.sqrt(2),
            (-2 - 0.5j) * (r - 1) / r,
            0,
            1 + 0j,
            0 + 1j,
            0,
        ],
        dtype=C128,
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-14)
    # generic check against the formula relu(|z| + b) z / |z| for non-zero z
    z = _crandn(6, KNOWN.numel(), seed=5)
    torch.testing.assert_close(act(z), torch.relu(z.abs() + act.bias) * z / z.abs())


def test_zrelu_definition() -> None:
    out = ZReLU()(KNOWN)
    # kept: arg in [0, pi/2] i.e. Re >= 0 and Im >= 0 (boundaries 2, 2i and 0 included)
    expected = torch.tensor([3 + 4j, 0, 0, 0, 0, 2 + 0j, 0 + 2j, 0.3 + 0.4j], dtype=C128)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_crelu_definition() -> None:
    out = CReLU()(KNOWN)
    expected = torch.tensor([3 + 4j, 4j, 1, 0, 0, 2, 2j, 0.3 + 0.4j], dtype=C128)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_cardioid_definition() -> None:
    out = Cardioid()(KNOWN)
    # cos arg(3+4i) = 0.6, cos arg(-3+4i) = -0.6, cos arg(1-i) = 1/sqrt 2, 2 -> 1, 2i -> 0
    r = math.hypot(2, 0.5)
    expected = torch.tensor(
        [
            0.8 * (3 + 4j),
            0.2 * (-3 + 4j),
            0.5 * (1 + 1 / math.sqrt(2)) * (1 - 1j),
            0.5 * (1 - 2 / r) * (-2 - 0.5j),
            0,
            2,
            0.5 * 2j,
            0.8 * (0.3 + 0.4j),
        ],
        dtype=C128,
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-14)
    z = _crandn(5, 7, seed=9)
    torch.testing.assert_close(Cardioid()(z), 0.5 * (1 + torch.cos(torch.angle(z))) * z)


@pytest.mark.parametrize("act", [ModReLU(3, dtype=C128), Cardioid()], ids=["modrelu", "cardioid"])
def test_activation_is_finite_at_zero(act: nn.Module) -> None:
    z = torch.zeros(3, dtype=C128, requires_grad=True)
    out = act(z)
    assert torch.all(out == 0)
    out.abs().sum().backward()  # abs'(0) is 0 in torch; the activation itself must stay finite
    assert z.grad is not None and torch.isfinite(torch.view_as_real(z.grad)).all()


# --------------------------------------------------------------------------------------------
# Gradients: gradcheck on tiny layers (complex128)
# --------------------------------------------------------------------------------------------


def _tiny_layers() -> dict[str, nn.Module]:
    g = _gen(11)
    ln = ComplexLayerNorm(4, dtype=C128)
    bn = ComplexBatchNorm(4, dtype=C128)
    mr = ModReLU(4, dtype=C128, bias_init=-0.3)
    with torch.no_grad():  # non-trivial affine so their gradients are tested at a generic point
        for p in (ln.gamma_re, ln.gamma_im, ln.beta_re, ln.beta_im, bn.bias_re, bn.bias_im):
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        bn.weight.add_(0.3 * torch.randn(bn.weight.shape, generator=g, dtype=bn.weight.dtype))
    return {
        "linear": ComplexLinear(4, 4, generator=g, dtype=C128),
        "modrelu": mr,
        "zrelu": ZReLU(),
        "crelu": CReLU(),
        "cardioid": Cardioid(),
        "layernorm": ln,
        "batchnorm": bn,
        "residual": ComplexResidualBlock(
            4, activation="cardioid", norm="layer", generator=g, dtype=C128
        ),
        "plain": ComplexPlainBlock(4, activation="modrelu", norm="batch", generator=g, dtype=C128),
    }


@pytest.mark.parametrize("name", list(_tiny_layers()))
def test_gradcheck_tiny_layers(name: str) -> None:
    layer = _tiny_layers()[name]
    z = _crandn(6, 4, seed=21) + (0.05 + 0.05j)  # generic point, away from activation kinks
    _gradcheck_module(layer, z)


def _all_arches() -> list[ArchConfig]:
    combos = itertools.product(
        ["modrelu", "zrelu", "crelu", "cardioid"], ["none", "layer", "batch"], [True, False]
    )
    return [
        ArchConfig(width=16, depth=2, activation=a, norm=n, residual=r, seed=1)  # type: ignore[arg-type]
        for a, n, r in combos
    ]


@pytest.mark.parametrize(
    "arch", _all_arches(), ids=lambda a: f"{a.activation}-{a.norm}-{a.residual}"
)
def test_gradients_reach_every_parameter(arch: ArchConfig) -> None:
    model = build_model(arch, n_freq=8, dtype=C128)
    feats = 2 * torch.rand((64, N_FEATURES), generator=_gen(2), dtype=torch.float64) - 1
    target = _crandn(64, 8, seed=3)
    loss = (model(feats) - target).abs().square().mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert float(p.grad.abs().max()) > 0, name


def test_gradcheck_whole_model_tiny() -> None:
    arch = ArchConfig(width=3, depth=1, activation="cardioid", norm="layer", seed=4)
    model = build_model(arch, n_freq=4, dtype=C128)
    feats = 2 * torch.rand((3, N_FEATURES), generator=_gen(5), dtype=torch.float64) - 1
    assert torch.autograd.gradcheck(model, (feats.requires_grad_(),), eps=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------


def test_layer_norm_zero_mean_unit_variance() -> None:
    ln = ComplexLayerNorm(32, dtype=C128)
    z = 3.0 * _crandn(10, 32, seed=7) + (5 - 2j)
    out = ln(z)
    torch.testing.assert_close(out.mean(dim=-1), torch.zeros(10, dtype=C128), rtol=0, atol=1e-12)
    centred = z - z.mean(dim=-1, keepdim=True)
    var = centred.abs().square().mean(dim=-1)
    expected = var / (var + ln.eps)  # unit variance up to the eps regulariser
    torch.testing.assert_close(out.abs().square().mean(dim=-1), expected, rtol=0, atol=1e-12)
    assert float((expected - 1).abs().max()) < 1e-5


def test_layer_norm_affine() -> None:
    ln = ComplexLayerNorm(4, dtype=C128)
    z = _crandn(5, 4, seed=8)
    base = ln(z).detach()
    with torch.no_grad():
        ln.gamma_re.fill_(2.0)
        ln.gamma_im.fill_(-1.0)
        ln.beta_re.fill_(0.5)
        ln.beta_im.fill_(0.25)
    torch.testing.assert_close(ln(z), base * (2 - 1j) + (0.5 + 0.25j), rtol=0, atol=1e-14)


def _correlated(n: int, features: int, *, seed: int) -> Tensor:
    """(n, F) complex with per-feature non-zero mean and correlated, unequal (Re, Im) scales."""
    g = _gen(seed)
    a = torch.randn((n, features), generator=g, dtype=torch.float64)
    b = torch.randn((n, features), generator=g, dtype=torch.float64)
    scale = torch.linspace(0.5, 4.0, features, dtype=torch.float64)
    re = scale * a + 1.5
    im = 0.8 * scale * a + 0.3 * b - 2.0  # strongly correlated with Re
    return torch.complex(re, im)


def _cov2(z: Tensor) -> Tensor:
    """(F, 2, 2) biased covariance of (Re, Im) per feature."""
    x = torch.stack([z.real, z.imag], dim=-1)  # (n, F, 2)
    c = x - x.mean(dim=0)
    return torch.einsum("nfi,nfj->fij", c, c) / x.shape[0]


def test_batch_norm_whitens_in_train_mode() -> None:
    bn = ComplexBatchNorm(6, dtype=C128, eps=1e-12)
    out = bn.train()(_correlated(4096, 6, seed=1))
    torch.testing.assert_close(out.mean(dim=0), torch.zeros(6, dtype=C128), rtol=0, atol=1e-12)
    eye = torch.eye(2, dtype=torch.float64).expand(6, 2, 2)
    torch.testing.assert_close(_cov2(out), eye, rtol=0, atol=1e-9)


def test_batch_norm_running_stats_and_eval() -> None:
    bn = ComplexBatchNorm(5, dtype=C128, momentum=1.0)
    z = _correlated(512, 5, seed=2)
    bn.train()(z)
    # momentum 1: the running statistics are exactly this batch's (unbiased covariance)
    n = z.shape[0]
    torch.testing.assert_close(bn.running_mean[0], z.real.mean(dim=0))
    torch.testing.assert_close(bn.running_mean[1], z.imag.mean(dim=0))
    cov = _cov2(z) * n / (n - 1)
    torch.testing.assert_close(bn.running_cov[0], cov[:, 0, 0])
    torch.testing.assert_close(bn.running_cov[1], cov[:, 0, 1])
    torch.testing.assert_close(bn.running_cov[2], cov[:, 1, 1])

    bn.eval()
    fresh = _correlated(8192, 5, seed=3)
    out = bn(fresh)
    # eval is per-sample: a sample's output does not depend on the rest of the batch
    torch.testing.assert_close(bn(fresh[:1]), out[:1], rtol=0, atol=1e-14)
    # eval output equals whitening with the running statistics, checked by eigendecomposition
    v = torch.stack(
        [
            torch.stack([bn.running_cov[0], bn.running_cov[1]], -1),
            torch.stack([bn.running_cov[1], bn.running_cov[2]], -1),
        ],
        -2,
    ) + bn.eps * torch.eye(2, dtype=torch.float64)  # (F, 2, 2)
    evals, evecs = torch.linalg.eigh(v)
    inv_sqrt = evecs @ torch.diag_embed(evals.rsqrt()) @ evecs.transpose(-1, -2)
    x = torch.stack([fresh.real, fresh.imag], -1) - bn.running_mean.T  # (n, F, 2)
    white = torch.einsum("fij,nfj->nfi", inv_sqrt, x)
    torch.testing.assert_close(torch.view_as_real(out), white, rtol=0, atol=1e-10)


def test_batch_norm_running_stats_converge() -> None:
    features, n, steps, mom = 4, 256, 200, 0.1
    bn = ComplexBatchNorm(features, dtype=C128, momentum=mom).train()
    for step in range(steps):
        bn(_correlated(n, features, seed=1000 + step))
    scale = torch.linspace(0.5, 4.0, features, dtype=torch.float64)
    vrr, vri, vii = scale**2, 0.8 * scale**2, 0.64 * scale**2 + 0.09  # _correlated's covariance
    # an EMA with weight mom averages like mom / (2 - mom) * (one batch's estimator variance)
    c = mom / (2 - mom) / n
    assert torch.all((bn.running_mean[0] - 1.5).abs() < 4 * torch.sqrt(c * vrr))
    assert torch.all((bn.running_mean[1] + 2.0).abs() < 4 * torch.sqrt(c * vii))
    # Var of a Gaussian sample covariance entry: (V_ij^2 + V_ii V_jj) / n
    assert torch.all((bn.running_cov[0] - vrr).abs() < 4 * torch.sqrt(c * 2 * vrr**2))
    assert torch.all((bn.running_cov[1] - vri).abs() < 4 * torch.sqrt(c * (vri**2 + vrr * vii)))
    assert torch.all((bn.running_cov[2] - vii).abs() < 4 * torch.sqrt(c * 2 * vii**2))


def test_batch_norm_eval_uses_initial_running_stats() -> None:
    bn = ComplexBatchNorm(3, dtype=C128)  # fresh running stats: mean 0, covariance I
    z = _correlated(64, 3, seed=4)
    torch.testing.assert_close(bn.eval()(z), z * (1 / math.sqrt(1 + bn.eps)), rtol=0, atol=1e-12)


def test_batch_norm_refuses_single_sample_in_training() -> None:
    with pytest.raises(ValueError, match="more than 1 sample"):
        ComplexBatchNorm(3)(_crandn(1, 3, dtype=C64))


def test_norm_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="eps"):
        ComplexLayerNorm(3, eps=0.0)
    with pytest.raises(ValueError, match="momentum"):
        ComplexBatchNorm(3, momentum=0.0)
    with pytest.raises(ValueError, match="num_features"):
        ModReLU(0)


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


def test_theta_features_known_values() -> None:
    theta = torch.tensor([[1.0, 0.05, 0.02, 0.2]], dtype=torch.float64)
    feats = theta_features(theta, DOMAIN)
    lower, upper = feature_bounds(DOMAIN)
    raw = [1.0, 0.05, 0.02, 0.2, 0.2, 0.03, 0.0]  # T, r, d, sigma, s, m, log T
    expected = [2 * (v - lo) / (hi - lo) - 1 for v, lo, hi in zip(raw, lower, upper, strict=True)]
    torch.testing.assert_close(feats[0], torch.tensor(expected, dtype=torch.float64))
    # derived bounds by hand for the default domain
    assert lower[4:] == pytest.approx((0.05 * math.sqrt(0.02), -0.10 * 5.0, math.log(0.02)))
    assert upper[4:] == pytest.approx((1.0 * math.sqrt(5.0), 0.10 * 5.0, math.log(5.0)))
    assert len(FEATURE_NAMES) == N_FEATURES == feats.shape[1]


def test_theta_features_span_unit_box_on_domain_corners() -> None:
    corners = torch.tensor(
        list(itertools.product(*zip(DOMAIN.lower(), DOMAIN.upper(), strict=True))),
        dtype=torch.float64,
    )  # (16, 4)
    feats = theta_features(corners, DOMAIN)
    ones = torch.ones(N_FEATURES, dtype=torch.float64)
    torch.testing.assert_close(feats.min(dim=0).values, -ones, rtol=0, atol=1e-12)
    torch.testing.assert_close(feats.max(dim=0).values, ones, rtol=0, atol=1e-12)
    inner = theta_features(_sample_theta(1000, seed=1), DOMAIN)
    assert float(inner.abs().max()) <= 1.0


def test_theta_features_differentiable() -> None:
    theta = _sample_theta(5, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: theta_features(t, DOMAIN), (theta,))
    f32 = theta_features(theta.detach().float(), DOMAIN)
    assert f32.dtype == torch.float32


@pytest.mark.parametrize(
    ("theta", "match"),
    [
        (torch.ones(3, 3, dtype=torch.float64), "shape"),
        (torch.tensor([[0.0, 0.0, 0.0, 0.2]], dtype=torch.float64), "T must be > 0"),
        (torch.tensor([[1.0, 0.0, 0.0, -0.2]], dtype=torch.float64), "sigma must be >= 0"),
        (torch.tensor([[1.0, math.nan, 0.0, 0.2]], dtype=torch.float64), "finite"),
        (torch.ones(2, 4, dtype=torch.int64), "floating"),
    ],
    ids=["shape", "T", "sigma", "nan", "int"],
)
def test_theta_features_refuses_bad_theta(theta: Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        theta_features(theta, DOMAIN)


# --------------------------------------------------------------------------------------------
# Network: head invariants, seeding, precision, validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", _all_arches()[::3], ids=lambda a: f"{a.activation}-{a.norm}")
def test_head_invariants_on_random_and_extreme_inputs(arch: ArchConfig) -> None:
    model = build_model(arch, n_freq=16)
    g = _gen(6)
    feats = torch.cat(
        [
            2 * torch.rand((64, N_FEATURES), generator=g) - 1,
            1e4 * torch.randn((32, N_FEATURES), generator=g),
            torch.full((1, N_FEATURES), 1e6),
            torch.full((1, N_FEATURES), -1e6),
            torch.zeros((2, N_FEATURES)),
        ]
    )
    with torch.no_grad():
        out = model(feats)
        psi = model.psi(feats)
    assert out.shape == (feats.shape[0], 16) and out.dtype == C64
    assert torch.all(out[:, 0] == 1)
    assert torch.isfinite(torch.view_as_real(out)).all()
    assert torch.all(psi.real <= 0)
    # |F| = exp(Re psi) <= 1 exactly; |cos + i sin| may exceed 1 by rounding only
    assert float(out.abs().max()) <= 1 + 4 * torch.finfo(torch.float32).eps


def test_head_phase_is_i_to_the_k() -> None:
    model = build_model(ArchConfig(width=4, depth=1, seed=2), n_freq=9, dtype=C128)
    feats = torch.zeros((1, N_FEATURES), dtype=torch.float64)
    with torch.no_grad():
        out, psi = model(feats)[0], model.psi(feats)[0]
    k = torch.arange(1, 9)
    torch.testing.assert_close(out[1:], _i_pow(k) * torch.exp(psi), rtol=0, atol=1e-15)


def test_seeded_init_reproducible_and_global_rng_untouched() -> None:
    arch = ArchConfig(width=8, depth=2, norm="batch", seed=7)
    rng_before = torch.get_rng_state()
    a = build_model(arch, n_freq=8).state_dict()
    b = build_model(arch, n_freq=8).state_dict()
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = build_model(arch.model_copy(update={"seed": 8}), n_freq=8).state_dict()
    assert not torch.equal(a["embed.weight_re"], c["embed.weight_re"])
    assert not torch.equal(a["head.weight_im"], c["head.weight_im"])
    # the draws are made in float64: complex64 and complex128 builds agree to float32 rounding
    d = build_model(arch, n_freq=8, dtype=C128).state_dict()
    assert all(torch.equal(d[k].float(), a[k]) for k in a)


def test_every_parameter_is_real_and_saved() -> None:
    model = build_model(ArchConfig(width=4, depth=1, norm="batch"), n_freq=6)
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
    keys = set(model.state_dict())
    assert "phase_re" not in keys and "blocks.0.norm.running_cov" in keys


@pytest.mark.parametrize("switch", ["astype", "double", "to"])
def test_precision_switch_to_complex128(switch: str) -> None:
    arch = ArchConfig(width=16, depth=2, norm="batch", seed=3)
    model = build_model(arch, n_freq=12).eval()
    feats = 2 * torch.rand((10, N_FEATURES), generator=_gen(1), dtype=torch.float64) - 1
    with torch.no_grad():
        out32 = model(feats)
    if switch == "astype":
        model.astype(C128)
    elif switch == "double":
        model.double()
    else:
        model.to(C128)
    assert model.complex_dtype == C128
    assert all(t.dtype == torch.float64 for t in (*model.parameters(), *model.buffers()))
    with torch.no_grad():
        out64 = model(feats)
    assert out64.dtype == C128
    torch.testing.assert_close(out64, out32.to(C128), rtol=0, atol=1e-5)
    # and back again
    model.astype(C64)
    with torch.no_grad():
        torch.testing.assert_close(model(feats), out32, rtol=0, atol=1e-6)


def test_width_one_and_depth_zero_work() -> None:
    feats = 2 * torch.rand((5, N_FEATURES), generator=_gen(3)) - 1
    for width, depth in [(1, 0), (1, 3), (5, 0)]:
        model = build_model(ArchConfig(width=width, depth=depth), n_freq=4)
        out = model(feats)
        assert out.shape == (5, 4)
        out.abs().square().sum().backward()


def test_refuses_bad_arch_and_n_freq() -> None:
    arch = ArchConfig(width=4, depth=1)
    for n_freq in (0, 1, -5):
        with pytest.raises(ValueError, match="n_freq"):
            build_model(arch, n_freq=n_freq)
    with pytest.raises(ValueError, match="n_freq"):
        build_model(arch, n_freq=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_freq"):
        build_model(arch, n_freq=True)
    with pytest.raises(ValueError, match="width"):
        ArchConfig(width=0)
    with pytest.raises(ValueError, match="depth"):
        ArchConfig(depth=-1)
    with pytest.raises(ValueError, match="width"):  # an unvalidated config is re-checked
        build_model(ArchConfig.model_construct(width=0, depth=1), n_freq=8)
    with pytest.raises(ValueError, match="activation"):
        build_model(ArchConfig.model_construct(activation="tanh"), n_freq=8)
    with pytest.raises(ValueError, match="norm"):
        build_model(ArchConfig.model_construct(norm="group"), n_freq=8)
    with pytest.raises(ValueError, match="arch"):
        SpectralCVNN({"width": 4}, n_freq=8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtype"):
        build_model(arch, n_freq=8, dtype=torch.float64)
    model = build_model(arch, n_freq=8)
    with pytest.raises(ValueError, match="features"):
        model(torch.zeros(3, 6))
    with pytest.raises(ValueError, match="features"):
        model(torch.zeros(3, 7, dtype=C64))


# --------------------------------------------------------------------------------------------
# Learning: the analytic GBM spectrum
# --------------------------------------------------------------------------------------------


def _gbm_psi(theta: Tensor, w: Tensor) -> Tensor:
    """psi_k = log phi_z(w_k) = -i w_k s / 2 - w_k^2 / 2 for GBM, (B, K) complex128."""
    s = (theta[:, 3] * theta[:, 0].sqrt())[:, None]  # (B, 1)
    return torch.complex(-0.5 * w.square() * torch.ones_like(s), -0.5 * w * s)


def _gbm_spectrum(theta: Tensor, n_freq: int) -> Tensor:
    """F_k = E[exp(i u_k (x - a))] for GBM straight from the CF of x (no use of psi), (B, N)."""
    t, r, d, sigma = theta.unbind(dim=1)
    m, s = (r - d) * t, sigma * t.sqrt()
    a = (m - L_TRUNC * s)[:, None]
    u = torch.arange(n_freq, dtype=torch.float64) * math.pi / (2 * L_TRUNC * s[:, None])
    mu, var = ((r - d - 0.5 * sigma**2) * t)[:, None], (sigma**2 * t)[:, None]
    return torch.exp(torch.complex(-0.5 * var * u**2, u * (mu - a)))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Small matmuls run faster on one thread, and far faster when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_learns_gbm_spectrum() -> None:
    n_freq = 32
    arch = ArchConfig(width=32, depth=2, seed=0)
    model = build_model(arch, n_freq=n_freq)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    w = torch.arange(1, n_freq, dtype=torch.float64) * math.pi / (2 * L_TRUNC)
    low = w <= 2.0  # frequencies where |F| >= exp(-2): the ones prices depend on

    theta_val = _sample_theta(1024, seed=100)
    feats_val = theta_features(theta_val, DOMAIN)
    spec_val = _gbm_spectrum(theta_val, n_freq)
    psi_val = _gbm_psi(theta_val, w)[:, low]
    # the two routes to the target agree: F_k = i^k exp(psi_k)
    k = torch.arange(1, n_freq)
    torch.testing.assert_close(spec_val[:, 1:], _i_pow(k) * torch.exp(_gbm_psi(theta_val, w)))

    def errors() -> tuple[float, float]:
        with torch.no_grad():
            f_err = (model(feats_val).to(C128) - spec_val).abs().square().mean()
            p_err = (model.psi(feats_val)[:, low].to(C128) - psi_val).abs().square().mean()
        return float(f_err), float(p_err)

    f0, p0 = errors()
    for step in range(250):
        theta = _sample_theta(256, seed=step)
        target = _gbm_spectrum(theta, n_freq).to(C64)
        loss = (model(theta_features(theta, DOMAIN)) - target).abs().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    f1, p1 = errors()
    assert f1 < f0 / 300, (f0, f1)
    assert p1 < p0 / 100, (p0, p1)


def test_gaussian_prior_starts_high_frequencies_near_zero() -> None:
    from spectral_core.config import ArchConfig, DomainConfig

    arch = ArchConfig(width=16, depth=1)
    theta = torch.tensor([[0.5, 0.01, 0.02, 0.3], [4.0, 0.08, 0.0, 0.9]], dtype=torch.float64)
    feats = theta_features(theta, DomainConfig())
    with_prior = build_model(arch, n_freq=64, truncation_L=10.0)(feats)
    without = build_model(arch, n_freq=64)(feats)
    # a standard normal has |F_k| = exp(-(k pi / 20)^2 / 2) < 1e-12 for k >= 48
    assert with_prior[:, 48:].abs().max() < 1e-10
    assert without[:, 48:].abs().max() > 1e-4
    with pytest.raises(ValueError, match="truncation_L"):
        build_model(arch, n_freq=8, truncation_L=0.0)
