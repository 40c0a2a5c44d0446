"""Fast inference: a trained SpectralCVNN evaluated as real block matrices, then COS in numba.

Why: pricing only needs Re(F_k) (every COS sum in `cos.py` reads the real part), and the torch
module spends two thirds of its time in complex elementwise kernels (layer norm, modReLU, polar)
on large temporaries. Here a complex layer y = W z + b is one real GEMM on the planar row
[Re z | Im z] (width 2n) with the block matrix [[Re W^T, Im W^T], [-Im W^T, Re W^T]] (MKL sgemm
through torch), every norm and activation is one fused numba pass over a row, rows go in chunks
that stay in cache, and the head's output becomes Re F_k = sigmoid(-Re raw_k) cos(Im raw_k +
k pi/2) in float64 (i^k e^{i t} has real part cos(t + k pi/2)). Puts and digital calls then come
from one numba pass per contract (`cos_put_digital`) with cos/sin(k theta) by rotation, no
transcendental per term.

The float32 GEMM path is not batch-invariant in the last bits; the reproducible path evaluates
each row alone in float64 with a fixed order of operations (see FastSpectralNet). No autograd:
greeks use the torch module.
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np
import torch
from torch import Tensor

from spectral_core.cvnn import (
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
    _inv_sqrt_2x2,
)
from spectral_core.normals import threading_layer_is_threadsafe

# Rows per chunk: the widest temporary (chunk, 2 width) float32 stays in L2 and the GEMMs keep
# MKL's large-M kernels (chunks of 1-4k rows measured 3-5x faster than one 10k-row call).
DEFAULT_CHUNK = 2048

_ACT_NONE, _ACT_MODRELU, _ACT_ZRELU, _ACT_CRELU, _ACT_CARDIOID = range(5)
_NORM_NONE, _NORM_LAYER, _NORM_AFFINE = range(3)


def _block_matrix(layer: ComplexLinear, *, real_input: bool = False) -> tuple[Tensor, Tensor]:
    """(weight (2 in, 2 out), bias (2 out,)) float64 acting on planar rows (rows = inputs)."""
    wr = layer.weight_re.detach().to(torch.float64).T  # (in, out)
    wi = layer.weight_im.detach().to(torch.float64).T
    if real_input:  # z = x + 0i: only the top block row is ever multiplied by non-zeros
        w = torch.cat([wr, wi], dim=1)
    else:
        w = torch.cat([torch.cat([wr, wi], dim=1), torch.cat([-wi, wr], dim=1)], dim=0)
    bias = layer.bias()
    b = (
        torch.zeros(w.shape[1], dtype=torch.float64)
        if bias is None
        else torch.cat([bias.real, bias.imag]).detach().to(torch.float64)
    )
    return w.contiguous(), b.contiguous()


def _norm(module: torch.nn.Module, width: int) -> tuple[int, np.ndarray, np.ndarray, float]:
    """(kind, a (4, F), b (2, F), eps): layer norm gamma = a[:2], beta = b; batch norm in eval
    as the per-feature affine map (a = P00, P01, P10, P11; b = q); none as zeros."""
    a = np.zeros((4, width), dtype=np.float64)
    b = np.zeros((2, width), dtype=np.float64)
    if isinstance(module, ComplexLayerNorm):
        a[0], a[1] = module.gamma_re.detach().numpy(), module.gamma_im.detach().numpy()
        b[0], b[1] = module.beta_re.detach().numpy(), module.beta_im.detach().numpy()
        return _NORM_LAYER, a, b, module.eps
    if isinstance(module, ComplexBatchNorm):
        # eval mode: whiten with the running statistics, then the learned 2x2 map and bias
        cov = module.running_cov.detach().to(torch.float64)
        wa, wb, wc = _inv_sqrt_2x2(cov[0] + module.eps, cov[1], cov[2] + module.eps)
        g = module.weight.detach().to(torch.float64)
        p = torch.stack(
            [
                g[0, 0] * wa + g[0, 1] * wb,
                g[0, 0] * wb + g[0, 1] * wc,
                g[1, 0] * wa + g[1, 1] * wb,
                g[1, 0] * wb + g[1, 1] * wc,
            ]
        )
        mu = module.running_mean.detach().to(torch.float64)
        a[:] = p.numpy()
        b[0] = (module.bias_re.detach().to(torch.float64) - p[0] * mu[0] - p[1] * mu[1]).numpy()
        b[1] = (module.bias_im.detach().to(torch.float64) - p[2] * mu[0] - p[3] * mu[1]).numpy()
        return _NORM_AFFINE, a, b, module.eps
    if isinstance(module, torch.nn.Identity):
        return _NORM_NONE, a, b, 1e-5
    raise ValueError(f"no fast path for norm {type(module).__name__}")


def _activation(module: torch.nn.Module, width: int) -> tuple[int, np.ndarray]:
    """(kind, modReLU bias (F,) or zeros) float64."""
    if isinstance(module, ModReLU):
        return _ACT_MODRELU, module.bias.detach().to(torch.float64).numpy().copy()
    kinds = {ZReLU: _ACT_ZRELU, CReLU: _ACT_CRELU, Cardioid: _ACT_CARDIOID}
    for cls, code in kinds.items():
        if isinstance(module, cls):
            return code, np.zeros(width, dtype=np.float64)
    raise ValueError(f"no fast path for activation {type(module).__name__}")


# ------------------------------------------------------------------------------------ kernels
# Rows are planar: h[i, :F] = Re, h[i, F:] = Im. Rows are independent, so the row loops are
# prange loops.


class _Kernel:
    """A kernel compiled parallel where numba's threading layer is thread-safe, else serial.

    The workqueue layer aborts on concurrent launches, and the trainer's kernels run in another
    thread of the server. `py_func` is the plain-Python original (tests compare against it).
    """

    def __init__(self, fn: Any) -> None:
        self.py_func = fn
        self._parallel = numba.njit(cache=True, nogil=True, parallel=True)(fn)
        # not cached: numba's cache key omits `parallel`, so the two builds would share entries
        self._serial = numba.njit(nogil=True)(fn)

    def __call__(self, *args: Any) -> None:
        (self._parallel if threading_layer_is_threadsafe() else self._serial)(*args)


@numba.njit(nogil=True, fastmath=True, inline="always")
def _layer_norm_row(src, dst, gamma, beta, eps):  # pragma: no cover - compiled
    # fastmath lets the row sums vectorise; the order within a row is fixed by the compiled code
    f = src.shape[0] // 2
    inv_f = 1.0 / f
    mr = 0.0
    mi = 0.0
    for j in range(f):
        mr += src[j]
        mi += src[f + j]
    mr *= inv_f
    mi *= inv_f
    var = 0.0
    for j in range(f):
        cr = src[j] - mr
        ci = src[f + j] - mi
        var += cr * cr + ci * ci
    inv = 1.0 / math.sqrt(var * inv_f + eps)
    for j in range(f):
        zr = (src[j] - mr) * inv
        zi = (src[f + j] - mi) * inv
        dst[j] = zr * gamma[0, j] - zi * gamma[1, j] + beta[0, j]
        dst[f + j] = zr * gamma[1, j] + zi * gamma[0, j] + beta[1, j]


@numba.njit(nogil=True, inline="always")
def _affine_norm_row(src, dst, p, q):  # pragma: no cover - compiled
    f = src.shape[0] // 2
    for j in range(f):
        zr = src[j]
        zi = src[f + j]
        dst[j] = p[0, j] * zr + p[1, j] * zi + q[0, j]
        dst[f + j] = p[2, j] * zr + p[3, j] * zi + q[1, j]


@numba.njit(nogil=True, inline="always")
def _norm_row(src, dst, kind, a, b, eps):  # pragma: no cover - compiled
    """Normalised row: src itself for kind 0 (none), else written to dst (1 layer, 2 affine)."""
    if kind == _NORM_LAYER:
        _layer_norm_row(src, dst, a, b, eps)
        return dst
    if kind == _NORM_AFFINE:
        _affine_norm_row(src, dst, a, b)
        return dst
    return src


@numba.njit(nogil=True, inline="always")
def _activation_row(h, kind, bias):  # pragma: no cover - compiled
    """In place: modReLU relu(|z| + b) z/|z|, zReLU, CReLU or cardioid 0.5 (1 + cos arg z) z."""
    f = h.shape[0] // 2
    for j in range(f):
        zr = h[j]
        zi = h[f + j]
        if kind == _ACT_MODRELU:  # z = 0 maps to 0
            r = math.sqrt(zr * zr + zi * zi)
            s = max(r + bias[j], 0.0) / r if r > 0.0 else 0.0
            zr *= s
            zi *= s
        elif kind == _ACT_ZRELU:
            if not (zr >= 0.0 and zi >= 0.0):
                zr = 0.0
                zi = 0.0
        elif kind == _ACT_CRELU:
            zr = max(zr, 0.0)
            zi = max(zi, 0.0)
        elif kind == _ACT_CARDIOID:
            r = math.sqrt(zr * zr + zi * zi)
            s = 0.5 * (1.0 + zr / r) if r > 0.0 else 1.0
            zr *= s
            zi *= s
        h[j] = zr
        h[f + j] = zi


@numba.njit(nogil=True, inline="always")
def _matvec_row(x, w, out):  # pragma: no cover - compiled
    """out += x @ w in a fixed order (inputs outer, outputs inner and vectorised)."""
    for k in range(x.shape[0]):
        xk = x[k]
        for j in range(out.shape[0]):
            out[j] += xk * w[k, j]


@numba.njit(nogil=True, inline="always")
def _re_f_row(raw, out):  # pragma: no cover - compiled
    """Re F_k = sigmoid(-Re raw_k) cos(Im raw_k + k pi/2), k = 1..N-1, and Re F_0 = 1 (float64)."""
    n1 = raw.shape[0] // 2
    out[0] = 1.0
    for k in range(1, n1 + 1):
        re = np.float64(raw[k - 1])
        im = np.float64(raw[n1 + k - 1])
        out[k] = math.cos(im + k * (math.pi / 2)) / (1.0 + math.exp(re))


def _norm_rows_py(src, dst, kind, a, b, eps):  # pragma: no cover - compiled
    for i in numba.prange(src.shape[0]):
        _norm_row(src[i], dst[i], kind, a, b, eps)


def _activation_rows_py(h, kind, bias):  # pragma: no cover - compiled
    for i in numba.prange(h.shape[0]):
        _activation_row(h[i], kind, bias)


_FORWARD_TILE = 32  # rows sharing one set of scratch rows


def _forward_rows_py(features, net, out):  # pragma: no cover - compiled
    """The whole network per row, in one fixed order of operations: batch-invariant bits."""
    (embed_w, embed_b, w1, b1, w2, b2, act_kind, act_bias, norm_kind, norm_a, norm_b, eps,
     residual, head_w, head_b, skip_w) = net  # fmt: skip
    rows = features.shape[0]
    width2 = embed_w.shape[1]
    depth = w1.shape[0]
    for tile in numba.prange((rows + _FORWARD_TILE - 1) // _FORWARD_TILE):
        h = np.empty(width2, dtype=embed_w.dtype)
        scratch = np.empty(width2, dtype=embed_w.dtype)
        t = np.empty(width2, dtype=embed_w.dtype)
        raw = np.empty(head_w.shape[1], dtype=embed_w.dtype)
        x = np.empty(features.shape[1], dtype=embed_w.dtype)
        for i in range(tile * _FORWARD_TILE, min(rows, (tile + 1) * _FORWARD_TILE)):
            for k in range(x.shape[0]):
                x[k] = features[i, k]
            h[:] = embed_b
            _matvec_row(x, embed_w, h)
            for layer in range(depth):
                src = _norm_row(h, scratch, norm_kind, norm_a[layer], norm_b[layer], eps)
                t[:] = b1[layer]
                _matvec_row(src, w1[layer], t)
                _activation_row(t, act_kind, act_bias[layer])
                if residual:
                    for j in range(width2):
                        h[j] += b2[layer, j]
                    _matvec_row(t, w2[layer], h)
                else:
                    h[:] = t
            src = _norm_row(h, scratch, norm_kind, norm_a[depth], norm_b[depth], eps)
            raw[:] = head_b
            _matvec_row(src, head_w, raw)
            _matvec_row(x, skip_w, raw)
            _re_f_row(raw, out[i])


_ROW_TILE = 64  # contracts advanced together, so the per-term loop vectorises across contracts


def _cos_put_digital_py(re_f, a, b, s0, k, r, t, put, digital):  # pragma: no cover - compiled
    """COS put and cash-or-nothing call (DESIGN.md §3, cos.py) per contract, float64.

    x* = clip(ln K/S0, a, b), w = x* - a, theta = pi w / (b - a), u_k = k pi / (b - a):
    psi_k = sin(k theta)/u_k (psi_0 = w), chi_k = ((cos k theta + u_k sin k theta) e^{x*} - e^a)
    / (1 + u_k^2); put = e^{-rT} 2/(b-a) Sum' Re F_k (K psi_k - S0 chi_k);
    digital call = e^{-rT} 2/(b-a) Sum' Re F_k psi_k(x*, b), psi_k(x*, b) = -psi_k (k >= 1).
    cos/sin(k theta) come from the rotation recurrence (error ~ k eps), so no transcendental
    is evaluated per term.
    """
    rows, n = re_f.shape
    for tile in numba.prange((rows + _ROW_TILE - 1) // _ROW_TILE):
        i0 = tile * _ROW_TILE
        m_rows = min(_ROW_TILE, rows - i0)
        c1 = np.empty(m_rows)
        s1 = np.empty(m_rows)
        ck = np.ones(m_rows)
        sk = np.zeros(m_rows)
        step = np.empty(m_rows)  # pi / (b - a)
        e_x = np.empty(m_rows)
        e_a = np.empty(m_rows)
        p_sum = np.empty(m_rows)
        d_sum = np.empty(m_rows)
        for j in range(m_rows):
            i = i0 + j
            width = b[i] - a[i]
            x_star = min(max(math.log(k[i] / s0[i]), a[i]), b[i])
            w = x_star - a[i]
            step[j] = math.pi / width
            c1[j] = math.cos(step[j] * w)
            s1[j] = math.sin(step[j] * w)
            e_x[j] = math.exp(x_star)
            e_a[j] = math.exp(a[i])
            # k = 0 (halved): psi_0 = w, chi_0 = e^{x*} - e^a, psi_0(x*, b) = b - x*
            p_sum[j] = 0.5 * re_f[i, 0] * (k[i] * w - s0[i] * (e_x[j] - e_a[j]))
            d_sum[j] = 0.5 * re_f[i, 0] * (width - w)
        for m in range(1, n):
            for j in range(m_rows):
                i = i0 + j
                c_new = ck[j] * c1[j] - sk[j] * s1[j]
                sk[j] = sk[j] * c1[j] + ck[j] * s1[j]
                ck[j] = c_new
                u = m * step[j]
                psi = sk[j] / u
                chi = ((ck[j] + u * sk[j]) * e_x[j] - e_a[j]) / (1.0 + u * u)
                p_sum[j] += re_f[i, m] * (k[i] * psi - s0[i] * chi)
                d_sum[j] -= re_f[i, m] * psi
        for j in range(m_rows):
            i = i0 + j
            scale = math.exp(-r[i] * t[i]) * 2.0 * step[j] / math.pi
            put[i] = scale * p_sum[j]
            digital[i] = scale * d_sum[j]


_norm_rows_kernel = _Kernel(_norm_rows_py)
_activation_rows_kernel = _Kernel(_activation_rows_py)
_forward_rows_kernel = _Kernel(_forward_rows_py)
_cos_put_digital_kernel = _Kernel(_cos_put_digital_py)


def cos_put_digital(
    re_f: np.ndarray,
    *,
    a: np.ndarray,
    b: np.ndarray,
    S0: np.ndarray,
    K: np.ndarray,
    r: np.ndarray,
    T: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(put, digital call) from Re F (B, N) float64 (Re F_0 = 1) and (B,) float64 contract columns.

    Same sums as `cos.put` / `cos.digital_call` (tests: within 1e-12 of them), no autograd.
    """
    re_f = np.ascontiguousarray(re_f, dtype=np.float64)
    if re_f.ndim != 2 or re_f.shape[1] < 1:
        raise ValueError(f"re_f must be (B, N) with N >= 1, got shape {re_f.shape}")
    cols = {"a": a, "b": b, "S0": S0, "K": K, "r": r, "T": T}
    arrays = {}
    for name, v in cols.items():
        arr = np.ascontiguousarray(v, dtype=np.float64)
        if arr.shape != (re_f.shape[0],):
            raise ValueError(f"{name} must have shape ({re_f.shape[0]},), got {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} must be finite")
        arrays[name] = arr
    if not (arrays["b"] > arrays["a"]).all():
        raise ValueError("b must be > a for every contract")
    for name in ("S0", "K", "T"):
        if not (arrays[name] > 0).all():
            raise ValueError(f"{name} must be > 0")
    put = np.empty(re_f.shape[0])
    digital = np.empty(re_f.shape[0])
    _cos_put_digital_kernel(
        re_f,
        arrays["a"],
        arrays["b"],
        arrays["S0"],
        arrays["K"],
        arrays["r"],
        arrays["T"],
        put,
        digital,
    )
    return put, digital


# ------------------------------------------------------------------------------------ network


class FastSpectralNet:
    """Inference-only copy of a SpectralCVNN: features (B, n_features) -> Re F (B, N) float64.

    Two evaluations of the same weights:
    * `re_spectrum(x)`: float32, chunked real GEMMs (MKL through torch) plus fused numba passes;
      the fastest, but GEMM blocking makes the last bits depend on the batch, and float32 prices
      are only smooth to ~1e-7 (finite differences with small bumps are noisy).
    * `re_spectrum(x, reproducible=True)`: float64, the whole network per row in numba in one
      fixed order of operations, so a row's bits never depend on what else is in the batch (the
      service's same-request-same-bytes rule under micro-batching); equal to the module in
      complex128 to ~1e-13.
    The weights are copied at construction (later changes to the module are not seen).
    """

    def __init__(self, model: SpectralCVNN, *, chunk: int = DEFAULT_CHUNK) -> None:
        if not isinstance(model, SpectralCVNN):
            raise ValueError(f"model must be a SpectralCVNN, got {type(model).__name__}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be a positive int, got {chunk!r}")
        self.chunk = chunk
        self.n_freq = model.n_freq
        self.n_features = model.n_features
        width, two_w = model.arch.width, 2 * model.arch.width
        with torch.no_grad():
            embed_w, embed_b = _block_matrix(model.embed, real_input=True)
            first, second, acts, norms = [], [], [], []
            for blk in model.blocks:
                if isinstance(blk, ComplexResidualBlock):
                    first.append(_block_matrix(blk.linear1))
                    second.append(_block_matrix(blk.linear2))
                elif isinstance(blk, ComplexPlainBlock):
                    first.append(_block_matrix(blk.linear))
                    # a plain block has one linear layer; its second slot is never read
                    unused = torch.zeros(two_w, two_w, dtype=torch.float64)
                    second.append((unused, torch.zeros(two_w, dtype=torch.float64)))
                else:
                    raise ValueError(f"no fast path for block {type(blk).__name__}")
                acts.append(_activation(blk.act, width))
                norms.append(_norm(blk.norm, width))
            norms.append(_norm(model.final_norm, width))
            head_w, head_b = _block_matrix(model.head)
            skip_w, skip_b = _block_matrix(model.skip, real_input=True)
            head_b = head_b + skip_b
            head_b[: model.n_freq - 1] += model.prior_re.to(torch.float64)  # prior on Re raw

        def stack(pairs: list[tuple[Tensor, Tensor]], i: int, shape: tuple[int, ...]) -> Tensor:
            return torch.stack([p[i] for p in pairs]) if pairs else torch.zeros(0, *shape)

        # float64 master copy, stacked per layer (depth, ...) and per norm (depth + 1, ...)
        weights = {
            "embed_w": embed_w, "embed_b": embed_b,
            "w1": stack(first, 0, (two_w, two_w)), "b1": stack(first, 1, (two_w,)),
            "w2": stack(second, 0, (two_w, two_w)), "b2": stack(second, 1, (two_w,)),
            "head_w": head_w, "head_b": head_b, "skip_w": skip_w,
        }  # fmt: skip
        self._f64 = {k: v.to(torch.float64).contiguous().numpy() for k, v in weights.items()}
        self._f32 = {k: v.to(torch.float32).contiguous() for k, v in weights.items()}
        self.residual = bool(model.arch.residual)
        self.act_kind = acts[0][0] if acts else _ACT_NONE
        self.act_bias = np.stack([b for _, b in acts]) if acts else np.zeros((0, width))
        self.norm_kind = norms[0][0]
        self.norm_a = np.stack([a for _, a, _, _ in norms])  # (depth + 1, 4, F)
        self.norm_b = np.stack([b for _, _, b, _ in norms])  # (depth + 1, 2, F)
        self.eps = float(norms[0][3])
        # Re(i^k e^{i t}) = cos(t + k pi/2), k = 1..N-1
        self._quarter = torch.arange(1, self.n_freq, dtype=torch.float64) * (math.pi / 2)

    def re_spectrum(
        self, features: np.ndarray | Tensor, *, reproducible: bool = False
    ) -> np.ndarray:
        """Re F (B, N) float64 for features (B, n_features) (`Process.features`); Re F_0 = 1."""
        x = torch.as_tensor(features, dtype=torch.float64 if reproducible else torch.float32)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(
                f"features must have shape (B, {self.n_features}), got {tuple(x.shape)}"
            )
        rows = x.shape[0]
        out = np.empty((rows, self.n_freq), dtype=np.float64)
        if reproducible:
            w = self._f64
            net = (
                w["embed_w"], w["embed_b"], w["w1"], w["b1"], w["w2"], w["b2"], self.act_kind,
                self.act_bias, self.norm_kind, self.norm_a, self.norm_b, self.eps, self.residual,
                w["head_w"], w["head_b"], w["skip_w"],
            )  # fmt: skip
            _forward_rows_kernel(x.contiguous().numpy(), net, out)
            return out
        out[:, 0] = 1.0
        dst = torch.from_numpy(out)[:, 1:]  # (B, N-1) view of out
        n1 = self.n_freq - 1
        for start in range(0, rows, self.chunk):
            stop = min(start + self.chunk, rows)
            raw = self._raw(x[start:stop].contiguous())  # (C, 2 (N-1)) float32
            re_raw = raw[:, :n1].to(torch.float64)
            im_raw = raw[:, n1:].to(torch.float64)
            # |exp(psi)| = exp(-softplus(Re raw)) = sigmoid(-Re raw)
            torch.mul(
                torch.sigmoid(-re_raw), torch.cos(im_raw + self._quarter), out=dst[start:stop]
            )
        return out

    def _raw(self, x: Tensor) -> Tensor:
        """Head output plus skip and prior, planar (C, 2 (N-1)) float32."""
        w = self._f32
        h = torch.addmm(w["embed_b"], x, w["embed_w"])  # (C, 2W)
        buf = torch.empty_like(h)
        depth = w["w1"].shape[0]
        for layer in range(depth):
            src = self._norm(layer, h, buf)
            t = torch.addmm(w["b1"][layer], src, w["w1"][layer])  # (C, 2W)
            _activation_rows_kernel(t.numpy(), self.act_kind, self.act_bias[layer])
            if self.residual:
                h.add_(w["b2"][layer]).addmm_(t, w["w2"][layer])
            else:
                h = t
        src = self._norm(depth, h, buf)
        return torch.addmm(w["head_b"], src, w["head_w"]).addmm_(x, w["skip_w"])

    def _norm(self, index: int, h: Tensor, buf: Tensor) -> Tensor:
        if self.norm_kind == _NORM_NONE:
            return h
        _norm_rows_kernel(
            h.numpy(), buf.numpy(), self.norm_kind, self.norm_a[index], self.norm_b[index], self.eps
        )
        return buf


__all__ = ["DEFAULT_CHUNK", "FastSpectralNet", "cos_put_digital"]
