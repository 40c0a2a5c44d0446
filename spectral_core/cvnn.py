"""Complex-valued network mapping contract parameters to the shifted characteristic function.

What is learned (DESIGN.md §3). For theta = (T, r, d, sigma) the target is
F_k = E[exp(i u_k (x - a))] with [a, b] = [m - L s, m + L s], m = (r - d) T, s = sigma sqrt(T),
u_k = k pi / (b - a). Since u_k (x - a) = w_k (z + L) with z = (x - m) / s and w_k = k pi / (2L)
independent of theta,

    F_k = exp(i k pi / 2) * phi_z(w_k; theta),

where phi_z is the CF of the standardised log-return z. The network therefore predicts
psi_k(theta) = log phi_z(w_k; theta) at fixed frequencies, and the head builds
F_k = i^k * exp(psi_k) with
  * psi_0 = 0, so F_0 = 1 by construction (a CF is 1 at u = 0), and
  * Re psi_k = -softplus(raw_k) <= 0, so |F_k| <= 1 by construction (a CF is bounded by 1).
For GBM psi_k = -i w_k s / 2 - w_k^2 / 2 is affine in the feature s (a linear skip path from the
features, with its bias, fits it); Heston or jump processes are not, hence the nonlinear trunk.

Parameters are stored as real pairs (`*_re`, `*_im`) rather than native complex tensors:
`.double()`, `.float()`, weight decay, gradient clipping, optimiser state and safetensors
checkpoints then all behave as for any real model, while the forward pass still runs native
complex kernels (one cgemm per linear layer, faster on CPU than four real GEMMs). The complex dtype
of a module is the complex counterpart of its parameters' real dtype; `astype(torch.complex128)`
(or `.double()`, or `.to(torch.complex128)`) switches precision.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spectral_core.config import ArchConfig, DomainConfig

# Head init gain: small, so a fresh model sits near the prior (0.1 beat 1.0 and 0.01 in bench runs).
HEAD_GAIN = 0.1
N_FEATURES = 7
FEATURE_NAMES: tuple[str, ...] = ("T", "r", "d", "sigma", "s", "m", "logT")

_REAL_OF: dict[torch.dtype, torch.dtype] = {
    torch.complex64: torch.float32,
    torch.complex128: torch.float64,
}
_COMPLEX_OF: dict[torch.dtype, torch.dtype] = {v: k for k, v in _REAL_OF.items()}


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    """Real dtype backing a complex dtype; only complex64 and complex128 are supported."""
    if dtype not in _REAL_OF:
        raise ValueError(f"dtype must be torch.complex64 or torch.complex128, got {dtype}")
    return _REAL_OF[dtype]


def _check_complex(z: Tensor, *, name: str, features: int | None = None) -> None:
    if not z.is_complex():
        raise ValueError(f"{name} must be a complex tensor, got dtype {z.dtype}")
    if features is not None and (z.ndim < 1 or z.shape[-1] != features):
        raise ValueError(f"{name} must have last dimension {features}, got shape {tuple(z.shape)}")


def _check_positive_int(value: int, *, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class ComplexModule(nn.Module):
    """Base for modules whose parameters are real pairs; adds complex-aware precision switching."""

    @property
    def complex_dtype(self) -> torch.dtype | None:
        """Complex dtype of the parameters/buffers (None for a module without any)."""
        for t in itertools.chain(self.parameters(), self.buffers()):
            if t.is_floating_point():
                return _COMPLEX_OF.get(t.dtype)
        return None

    def astype(self, dtype: torch.dtype) -> ComplexModule:
        """Switch precision in place: complex64 <-> complex128 (the real pairs follow)."""
        return self.to(dtype=_real_dtype(dtype))

    def to(self, *args: Any, **kwargs: Any) -> Any:
        # nn.Module.to(complex) would turn real pairs into complex tensors: map to the real dtype.
        def fix(a: Any) -> Any:
            if isinstance(a, torch.dtype) and a.is_complex:
                return _real_dtype(a)
            if isinstance(a, Tensor) and a.is_complex():
                return torch.empty((), dtype=_real_dtype(a.dtype), device=a.device)
            return a

        return super().to(*(fix(a) for a in args), **{k: fix(v) for k, v in kwargs.items()})


# ---------------------------------------------------------------------------------------------
# Linear layer
# ---------------------------------------------------------------------------------------------


class ComplexLinear(ComplexModule):
    """y = W z + b with complex W (out, in) and b (out,).

    Complex Glorot init (Trabelsi et al. 2018): W = X + iY with X, Y ~ N(0, gain^2 / (fan_in +
    fan_out)), i.e. Rayleigh modulus and uniform phase with Var(W) = 2 gain^2 / (fan_in + fan_out).
    Draws are made in float64 from `generator` and then cast, so complex64 and complex128 layers
    built from the same seed agree to rounding. The bias starts at zero.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        generator: torch.Generator,
        dtype: torch.dtype = torch.complex64,
        bias: bool = True,
        gain: float = 1.0,
    ) -> None:
        super().__init__()
        _check_positive_int(in_features, name="in_features")
        _check_positive_int(out_features, name="out_features")
        if not (math.isfinite(gain) and gain >= 0.0):
            raise ValueError(f"gain must be finite and >= 0, got {gain}")
        real = _real_dtype(dtype)
        self.in_features = in_features
        self.out_features = out_features
        std = gain / math.sqrt(in_features + out_features)
        # (2, out, in) float64: real and imaginary parts drawn together, one stream per layer
        w = torch.randn((2, out_features, in_features), generator=generator, dtype=torch.float64)
        w = w * std
        self.weight_re = nn.Parameter(w[0].to(real))
        self.weight_im = nn.Parameter(w[1].to(real))
        if bias:
            self.bias_re: nn.Parameter | None = nn.Parameter(torch.zeros(out_features, dtype=real))
            self.bias_im: nn.Parameter | None = nn.Parameter(torch.zeros(out_features, dtype=real))
        else:
            self.bias_re = None
            self.bias_im = None

    def weight(self) -> Tensor:
        return torch.complex(self.weight_re, self.weight_im)  # (out, in) complex

    def bias(self) -> Tensor | None:
        if self.bias_re is None or self.bias_im is None:
            return None
        return torch.complex(self.bias_re, self.bias_im)  # (out,) complex

    def forward(self, z: Tensor) -> Tensor:
        _check_complex(z, name="input", features=self.in_features)
        w = self.weight()
        if z.dtype != w.dtype:
            raise ValueError(f"input dtype {z.dtype} does not match layer dtype {w.dtype}")
        return F.linear(z, w, self.bias())  # (..., out) complex

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------


def _safe_abs(z: Tensor) -> tuple[Tensor, Tensor]:
    """(|z|, |z| with zeros replaced by 1): the second is a NaN-free divisor for z / |z|."""
    r2 = z.real.square() + z.imag.square()
    nonzero = r2 > 0
    # sqrt only sees positive values, so no inf * 0 = NaN reaches the gradient at z = 0
    r_safe = torch.sqrt(torch.where(nonzero, r2, torch.ones_like(r2)))
    return torch.where(nonzero, r_safe, torch.zeros_like(r_safe)), r_safe


class ModReLU(ComplexModule):
    """modReLU (Arjovsky et al. 2016): relu(|z| + b) z / |z|, learnable real bias b per feature.

    Keeps the phase and shrinks the modulus by -b; 0 maps to 0.
    """

    def __init__(
        self,
        num_features: int,
        *,
        dtype: torch.dtype = torch.complex64,
        bias_init: float = 0.0,
    ) -> None:
        super().__init__()
        _check_positive_int(num_features, name="num_features")
        if not math.isfinite(bias_init):
            raise ValueError(f"bias_init must be finite, got {bias_init}")
        self.num_features = num_features
        self.bias = nn.Parameter(torch.full((num_features,), bias_init, dtype=_real_dtype(dtype)))

    def forward(self, z: Tensor) -> Tensor:
        _check_complex(z, name="input", features=self.num_features)
        r, r_safe = _safe_abs(z)
        scale = torch.relu(r + self.bias) / r_safe  # (..., F) real; z = 0 gives 0 * finite
        return z * scale

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}"


class ZReLU(ComplexModule):
    """zReLU (Guberman 2016): z where arg z lies in [0, pi/2] (Re z >= 0 and Im z >= 0), else 0."""

    def forward(self, z: Tensor) -> Tensor:
        _check_complex(z, name="input")
        keep = (z.real >= 0) & (z.imag >= 0)
        return z * keep.to(z.real.dtype)


class CReLU(ComplexModule):
    """CReLU (Trabelsi et al. 2018): relu(Re z) + i relu(Im z)."""

    def forward(self, z: Tensor) -> Tensor:
        _check_complex(z, name="input")
        return torch.complex(torch.relu(z.real), torch.relu(z.imag))


class Cardioid(ComplexModule):
    """Cardioid (Virtue et al. 2017): 0.5 (1 + cos arg z) z; arg 0 is taken as 0 so 0 maps to 0."""

    def forward(self, z: Tensor) -> Tensor:
        _check_complex(z, name="input")
        r, r_safe = _safe_abs(z)
        # cos(arg z) = Re z / |z|; 1 at z = 0 (any value works there since it multiplies z = 0)
        cos_arg = torch.where(r > 0, z.real / r_safe, torch.ones_like(r))
        return z * (0.5 * (1.0 + cos_arg))


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------


class ComplexLayerNorm(ComplexModule):
    """Normalise each sample over its features: (z - mu) / sqrt(var + eps), then gamma * . + beta.

    mu is the complex mean over the last dimension and var = mean |z - mu|^2 (real). gamma and beta
    are learnable complex vectors, initialised to 1 and 0.
    """

    def __init__(
        self,
        num_features: int,
        *,
        dtype: torch.dtype = torch.complex64,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        _check_positive_int(num_features, name="num_features")
        if not (math.isfinite(eps) and eps > 0.0):
            raise ValueError(f"eps must be finite and > 0, got {eps}")
        real = _real_dtype(dtype)
        self.num_features = num_features
        self.eps = eps
        self.gamma_re = nn.Parameter(torch.ones(num_features, dtype=real))
        self.gamma_im = nn.Parameter(torch.zeros(num_features, dtype=real))
        self.beta_re = nn.Parameter(torch.zeros(num_features, dtype=real))
        self.beta_im = nn.Parameter(torch.zeros(num_features, dtype=real))

    def forward(self, z: Tensor) -> Tensor:
        _check_complex(z, name="input", features=self.num_features)
        centred = z - z.mean(dim=-1, keepdim=True)  # (..., F) complex
        var = (centred.real.square() + centred.imag.square()).mean(dim=-1, keepdim=True)  # (..., 1)
        zhat = centred * torch.rsqrt(var + self.eps)
        gamma = torch.complex(self.gamma_re, self.gamma_im)
        beta = torch.complex(self.beta_re, self.beta_im)
        return zhat * gamma + beta

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, eps={self.eps}"


def _inv_sqrt_2x2(vrr: Tensor, vri: Tensor, vii: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Entries (a, b, c) of [[a, b], [b, c]] = V^(-1/2) for SPD V = [[vrr, vri], [vri, vii]].

    Closed form: with s = sqrt(det V) and t = sqrt(tr V + 2 s), sqrt(V) = (V + s I) / t, hence
    V^(-1/2) = (adj(V) + s I) / (s t).
    """
    s = torch.sqrt(vrr * vii - vri.square())
    t = torch.sqrt(vrr + vii + 2.0 * s)
    inv = 1.0 / (s * t)
    return (vii + s) * inv, -vri * inv, (vrr + s) * inv


class ComplexBatchNorm(ComplexModule):
    """Complex batch normalisation (Trabelsi et al. 2018).

    Per feature, centre and whiten the 2-vector (Re z, Im z) with the inverse square root of its
    2x2 covariance (+ eps I), then apply a learnable 2x2 matrix and complex bias. Training mode
    uses batch statistics (biased covariance) and updates running mean / covariance (unbiased) with
    `momentum`; eval mode uses the running statistics. The affine map starts as the identity, so a
    freshly built layer outputs (Re, Im) with identity covariance in training mode. Statistics are
    taken over every leading dimension of an input (..., F).
    """

    def __init__(
        self,
        num_features: int,
        *,
        dtype: torch.dtype = torch.complex64,
        eps: float = 1e-5,
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        _check_positive_int(num_features, name="num_features")
        if not (math.isfinite(eps) and eps > 0.0):
            raise ValueError(f"eps must be finite and > 0, got {eps}")
        if not (0.0 < momentum <= 1.0):
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        real = _real_dtype(dtype)
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        # (2, 2, F): output (Re, Im) = weight[:, :, f] @ whitened (Re, Im) + bias
        eye = torch.eye(2, dtype=real).unsqueeze(-1).repeat(1, 1, num_features)
        self.weight = nn.Parameter(eye)
        self.bias_re = nn.Parameter(torch.zeros(num_features, dtype=real))
        self.bias_im = nn.Parameter(torch.zeros(num_features, dtype=real))
        self.running_mean: Tensor
        self.running_cov: Tensor
        self.register_buffer("running_mean", torch.zeros(2, num_features, dtype=real))
        # rows: Vrr, Vri, Vii
        self.register_buffer(
            "running_cov",
            torch.tensor([1.0, 0.0, 1.0], dtype=real).unsqueeze(-1).repeat(1, num_features),
        )

    def forward(self, z: Tensor) -> Tensor:
        _check_complex(z, name="input", features=self.num_features)
        shape = z.shape
        flat = z.reshape(-1, self.num_features)  # (n, F) complex
        re, im = flat.real, flat.imag
        if self.training:
            n = flat.shape[0]
            if n < 2:
                raise ValueError(
                    f"ComplexBatchNorm needs more than 1 sample per feature in training, got {n}"
                )
            mean_re, mean_im = re.mean(dim=0), im.mean(dim=0)  # (F,)
            cr, ci = re - mean_re, im - mean_im
            vrr = cr.square().mean(dim=0)
            vri = (cr * ci).mean(dim=0)
            vii = ci.square().mean(dim=0)
            with torch.no_grad():
                unbiased = n / (n - 1)
                mom = self.momentum
                self.running_mean.lerp_(torch.stack([mean_re, mean_im]), mom)
                self.running_cov.lerp_(torch.stack([vrr, vri, vii]) * unbiased, mom)
        else:
            mean_re, mean_im = self.running_mean[0], self.running_mean[1]
            cr, ci = re - mean_re, im - mean_im
            vrr, vri, vii = self.running_cov[0], self.running_cov[1], self.running_cov[2]
        a, b, c = _inv_sqrt_2x2(vrr + self.eps, vri, vii + self.eps)  # (F,) each
        wr = a * cr + b * ci  # whitened (n, F) real pair
        wi = b * cr + c * ci
        g = self.weight
        out_re = g[0, 0] * wr + g[0, 1] * wi + self.bias_re
        out_im = g[1, 0] * wr + g[1, 1] * wi + self.bias_im
        return torch.complex(out_re, out_im).reshape(shape)

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, eps={self.eps}, momentum={self.momentum}"


# ---------------------------------------------------------------------------------------------
# Blocks and factories
# ---------------------------------------------------------------------------------------------


def make_activation(name: str, num_features: int, *, dtype: torch.dtype) -> nn.Module:
    """Activation by its ArchConfig name."""
    if name == "modrelu":
        return ModReLU(num_features, dtype=dtype)
    if name == "zrelu":
        return ZReLU()
    if name == "crelu":
        return CReLU()
    if name == "cardioid":
        return Cardioid()
    raise ValueError(f"activation must be one of modrelu, zrelu, crelu, cardioid, got {name!r}")


def make_norm(name: str, num_features: int, *, dtype: torch.dtype) -> nn.Module:
    """Normalisation by its ArchConfig name ('none' is the identity)."""
    if name == "none":
        return nn.Identity()
    if name == "layer":
        return ComplexLayerNorm(num_features, dtype=dtype)
    if name == "batch":
        return ComplexBatchNorm(num_features, dtype=dtype)
    raise ValueError(f"norm must be one of none, layer, batch, got {name!r}")


class ComplexResidualBlock(ComplexModule):
    """z + linear2(act(linear1(norm(z)))): pre-norm residual block of constant width."""

    def __init__(
        self,
        width: int,
        *,
        activation: str,
        norm: str,
        generator: torch.Generator,
        dtype: torch.dtype = torch.complex64,
    ) -> None:
        super().__init__()
        _check_positive_int(width, name="width")
        self.norm = make_norm(norm, width, dtype=dtype)
        self.linear1 = ComplexLinear(width, width, generator=generator, dtype=dtype)
        self.act = make_activation(activation, width, dtype=dtype)
        self.linear2 = ComplexLinear(width, width, generator=generator, dtype=dtype)

    def forward(self, z: Tensor) -> Tensor:
        return z + self.linear2(self.act(self.linear1(self.norm(z))))


class ComplexPlainBlock(ComplexModule):
    """act(linear(norm(z))): the non-residual layer used when ArchConfig.residual is false."""

    def __init__(
        self,
        width: int,
        *,
        activation: str,
        norm: str,
        generator: torch.Generator,
        dtype: torch.dtype = torch.complex64,
    ) -> None:
        super().__init__()
        _check_positive_int(width, name="width")
        self.norm = make_norm(norm, width, dtype=dtype)
        self.linear = ComplexLinear(width, width, generator=generator, dtype=dtype)
        self.act = make_activation(activation, width, dtype=dtype)

    def forward(self, z: Tensor) -> Tensor:
        return self.act(self.linear(self.norm(z)))


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------


def feature_bounds(domain: DomainConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(lower, upper) of the 7 features over the domain box, in FEATURE_NAMES order."""
    t_lo, t_hi = domain.T.lower, domain.T.upper
    # s = sigma sqrt(T) is increasing in both (sigma, T > 0)
    s_lo = domain.sigma.lower * math.sqrt(t_lo)
    s_hi = domain.sigma.upper * math.sqrt(t_hi)
    # m = (r - d) T is bilinear: its extremes sit at corners of the (r - d, T) box
    q_lo = domain.r.lower - domain.d.upper
    q_hi = domain.r.upper - domain.d.lower
    corners = [q * t for q in (q_lo, q_hi) for t in (t_lo, t_hi)]
    lower = (*domain.lower(), s_lo, min(corners), math.log(t_lo))
    upper = (*domain.upper(), s_hi, max(corners), math.log(t_hi))
    return lower, upper


def theta_features(theta: Tensor, domain: DomainConfig, *, check: bool = True) -> Tensor:
    """Features (B, 7) of theta (B, 4) = [T, r, d, sigma], each mapped affinely to about [-1, 1].

    Columns: T, r, d, sigma, s = sigma sqrt(T), m = (r - d) T, log T (FEATURE_NAMES). Each is
    scaled with the bounds it takes over `domain` (feature_bounds), so in-domain theta gives
    features in [-1, 1]; out-of-domain theta extrapolates. Differentiable in theta; same dtype and
    device as theta. `check=False` skips the value checks (they synchronise a GPU).
    """
    if not isinstance(theta, Tensor) or not theta.is_floating_point():
        raise ValueError(f"theta must be a real floating tensor, got {type(theta).__name__}")
    if theta.ndim != 2 or theta.shape[1] != 4:
        raise ValueError(f"theta must have shape (B, 4) [T, r, d, sigma], got {tuple(theta.shape)}")
    t, r, d, sigma = theta.unbind(dim=1)  # (B,) each
    if check:
        with torch.no_grad():
            if not bool(torch.isfinite(theta).all()):
                raise ValueError("theta must be finite")
            if not bool((t > 0).all()):
                raise ValueError(f"theta T must be > 0, got min {float(t.min())}")
            if not bool((sigma >= 0).all()):
                raise ValueError(f"theta sigma must be >= 0, got min {float(sigma.min())}")
    feats = torch.stack([t, r, d, sigma, sigma * torch.sqrt(t), (r - d) * t, torch.log(t)], dim=1)
    lower, upper = feature_bounds(domain)
    lo = torch.tensor(lower, dtype=theta.dtype, device=theta.device)
    hi = torch.tensor(upper, dtype=theta.dtype, device=theta.device)
    return 2.0 * (feats - lo) / (hi - lo) - 1.0  # (B, 7) real


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------


def _quarter_turns(n_freq: int, dtype: torch.dtype) -> Tensor:
    """Exact i^k for k = 1..n_freq-1 (cos/sin of k pi/2 would leave ~1e-16 residues)."""
    table = torch.tensor([1 + 0j, 1j, -1 + 0j, -1j], dtype=torch.complex128)
    return table[torch.arange(1, n_freq) % 4].to(dtype)  # (N-1,) complex


class SpectralCVNN(ComplexModule):
    """Features (B, n_features) real (7 for GBM) -> shifted CF F (B, n_freq) complex; see the
    module docstring.

    trunk: embed (7 -> width), depth blocks, final norm, head (width -> n_freq - 1); a linear skip
    path (7 -> n_freq - 1, initialised near zero) is added to the head's raw psi. Then
    psi = -softplus(Re raw) + i Im raw, F_0 = 1, F_k = i^k exp(psi_k).
    """

    def __init__(
        self,
        arch: ArchConfig,
        *,
        n_freq: int,
        dtype: torch.dtype = torch.complex64,
        generator: torch.Generator | None = None,
        truncation_L: float | None = None,
        n_features: int = N_FEATURES,
    ) -> None:
        super().__init__()
        if isinstance(n_features, bool) or not isinstance(n_features, int) or n_features < 1:
            raise ValueError(f"n_features must be an int >= 1, got {n_features!r}")
        self.n_features = n_features
        if not isinstance(arch, ArchConfig):
            raise ValueError(f"arch must be an ArchConfig, got {type(arch).__name__}")
        if isinstance(n_freq, bool) or not isinstance(n_freq, int) or n_freq < 2:
            raise ValueError(f"n_freq must be an int >= 2, got {n_freq!r}")
        if arch.width < 1 or arch.depth < 0:
            raise ValueError(
                f"arch needs width >= 1 and depth >= 0, got {arch.width}, {arch.depth}"
            )
        _real_dtype(dtype)
        gen = generator if generator is not None else torch.Generator().manual_seed(arch.seed)
        self.arch = arch
        self.n_freq = n_freq
        width = arch.width
        block = ComplexResidualBlock if arch.residual else ComplexPlainBlock
        self.embed = ComplexLinear(n_features, width, generator=gen, dtype=dtype)
        self.blocks = nn.ModuleList(
            block(width, activation=arch.activation, norm=arch.norm, generator=gen, dtype=dtype)
            for _ in range(arch.depth)
        )
        self.final_norm = make_norm(arch.norm, width, dtype=dtype)
        # small head: the model starts at the prior and the trunk learns corrections to it
        self.head = ComplexLinear(width, n_freq - 1, generator=gen, dtype=dtype, gain=HEAD_GAIN)
        # near-zero start: the trunk sets the initial spectrum, the skip learns the affine part
        self.skip = ComplexLinear(n_features, n_freq - 1, generator=gen, dtype=dtype, gain=1e-2)
        # exact i^k as real pairs so .double() / .to(device) carry them; not part of checkpoints
        turns = _quarter_turns(n_freq, dtype)
        self.phase_re: Tensor
        self.phase_im: Tensor
        self.register_buffer("phase_re", turns.real.clone(), persistent=False)
        self.register_buffer("phase_im", turns.imag.clone(), persistent=False)
        # Standard-normal prior for the standardised log-return z: Re psi_k = -w_k^2/2 with
        # w_k = k pi / (2L). The network learns the deviation from it. Without the prior the
        # high-k terms (|F_k| ~ e^-50 for a normal) start near |F| ~ 1e-2 and barely move, since
        # the loss gradient through exp(psi) vanishes with |F_k|. Zero offset when L is unknown.
        self.truncation_L = truncation_L
        self.prior_re: Tensor
        prior = _gaussian_prior_raw(n_freq, truncation_L).to(_real_dtype(dtype))
        self.register_buffer("prior_re", prior, persistent=False)

    def raw(self, features: Tensor) -> Tensor:
        """Unconstrained head output (B, n_freq - 1) complex."""
        if not isinstance(features, Tensor) or not features.is_floating_point():
            raise ValueError("features must be a real floating tensor")
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise ValueError(
                f"features must have shape (B, {self.n_features}), got {tuple(features.shape)}"
            )
        dtype = self.complex_dtype
        if dtype is None:
            raise ValueError("model parameters must be float32 or float64 (complex64/complex128)")
        f = features.to(_real_dtype(dtype))
        z = torch.complex(f, torch.zeros_like(f))  # (B, n_features) complex
        h = self.embed(z)  # (B, width) complex
        for blk in self.blocks:
            h = blk(h)
        h = self.final_norm(h)
        raw = self.head(h) + self.skip(z)  # (B, N-1) complex
        return torch.complex(raw.real + self.prior_re, raw.imag)

    def psi(self, features: Tensor) -> Tensor:
        """psi_k = log phi_z(w_k) for k = 1..n_freq-1: (B, n_freq - 1) complex, Re psi <= 0."""
        raw = self.raw(features)
        return torch.complex(-F.softplus(raw.real), raw.imag)

    def forward(self, features: Tensor) -> Tensor:
        raw = self.raw(features)  # (B, N-1) complex
        # exp(psi) with |exp(psi)| = exp(-softplus(Re raw)) = sigmoid(-Re raw): real sigmoid, cos
        # and sin instead of a complex exp (about 3x faster on CPU, same values).
        rotated = torch.polar(torch.sigmoid(-raw.real), raw.imag)  # (B, N-1) complex
        phase = torch.complex(self.phase_re, self.phase_im)  # (N-1,) exact i^k
        ones = torch.ones_like(rotated[:, :1])  # F_0 = 1 exactly
        out = torch.cat([ones, phase * rotated], dim=1)  # (B, N) complex
        assert out.shape == (features.shape[0], self.n_freq)
        assert bool((out[:, 0] == 1).all())
        return out


def _gaussian_prior_raw(n_freq: int, truncation_L: float | None) -> Tensor:
    """Raw offsets r_k with -softplus(r_k) = -w_k^2/2, k = 1..n_freq-1 (zeros when L is None)."""
    if truncation_L is None:
        return torch.zeros(n_freq - 1, dtype=torch.float64)
    if not (math.isfinite(truncation_L) and truncation_L > 0):
        raise ValueError(f"truncation_L must be finite and > 0, got {truncation_L!r}")
    k = torch.arange(1, n_freq, dtype=torch.float64)
    y = 0.5 * (k * math.pi / (2.0 * truncation_L)) ** 2  # (N-1,) > 0
    return y + torch.log(-torch.expm1(-y))  # softplus^-1(y), stable for large y


def build_model(
    arch: ArchConfig,
    *,
    n_freq: int,
    dtype: torch.dtype = torch.complex64,
    truncation_L: float | None = None,
    n_features: int = N_FEATURES,
) -> SpectralCVNN:
    """SpectralCVNN initialised from arch.seed via a local generator (global RNG untouched).

    Pass the spectrum's truncation_L to start from the standard-normal prior (see SpectralCVNN).
    """
    gen = torch.Generator(device="cpu").manual_seed(arch.seed)
    return SpectralCVNN(
        arch, n_freq=n_freq, dtype=dtype, generator=gen, truncation_L=truncation_L,
        n_features=n_features,
    )
