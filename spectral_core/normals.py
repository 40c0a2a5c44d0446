"""Shared source of standard normal increments for the path kernels.

Two kinds, both deterministic functions of (seed, stream id, draw index):

* ``"qmc"``: draw ``k`` of a stream is the first ``P = contracts_per_draw * paths_per_contract``
  points of a scrambled Sobol' sequence (scipy's LMS + digital shift, 64 bits) of dimension
  ``timesteps``, scrambled afresh from (seed, stream id, k). Each contract gets its own consecutive
  block of ``paths_per_contract`` points (a power of two: each block is a net). A fresh scramble
  per draw makes successive draws independent randomised-QMC replicates, so a trainer can average
  their errors; one long sequence would not allow that (in one dimension its consecutive blocks are
  the same net perturbed below 2**-m, so every draw would repeat nearly the same error). The points
  come from a numba Gray-code kernel that reads scipy's scrambled tables (tests check them against
  ``scipy.stats.qmc.Sobol`` bit-for-bit). Uniforms are the top 53 bits centred in their cell (never
  0 or 1, so |z| < 8.3), mapped by Wichura's AS241 inverse normal CDF (compiled; faster than
  ``scipy.special.ndtri``), then reordered by a Brownian bridge when ``timesteps > 1`` so the first
  Sobol' coordinates fix the coarse path shape.
* ``"philox"``: numpy ``Generator(Philox)`` keyed by (seed, stream id); draw ``k`` starts at
  counter ``k << 192``, so any draw is reached in O(1). i.i.d. normals need no bridge (the bridge
  map is orthogonal: it would not change their law).

A stream's ``position`` counts draws: the skip it was opened with plus the draws ``next`` returned.
``source.stream(i, skip=s.position)`` continues stream ``s`` bit-exactly.
"""

from __future__ import annotations

import contextlib
import functools
import math
import queue
import threading
import weakref
from types import TracebackType
from typing import Any, Literal

import numba
import numpy as np
from numba import njit, prange
from scipy.stats import qmc

from spectral_core.memory import check_cap, nbytes_of

NormalsKind = Literal["qmc", "philox"]

_SOBOL_BITS = 64
_CHUNK = 512  # Sobol' points per parallel work item: amortises the O(bits) jump to its start
_MAX_DRAWS = 2**63  # a Philox draw index must fit the top counter word
_POLL_S = 0.05  # how often a blocked producer re-checks its stop flag

# Wichura (1988), algorithm AS241 PPND16: rational approximations, relative accuracy ~1e-16.
_A = (3.3871328727963666080e0, 1.3314166789178437745e2, 1.9715909503065514427e3,
      1.3731693765509461125e4, 4.5921953931549871457e4, 6.7265770927008700853e4,
      3.3430575583588128105e4, 2.5090809287301226727e3)
_B = (1.0, 4.2313330701600911252e1, 6.8718700749205790830e2, 5.3941960214247511077e3,
      2.1213794301586595867e4, 3.9307895800092710610e4, 2.8729085735721942674e4,
      5.2264952788528545610e3)
_C = (1.42343711074968357734e0, 4.63033784615654529590e0, 5.76949722146069140550e0,
      3.64784832476320460504e0, 1.27045825245236838258e0, 2.41780725177450611770e-1,
      2.27238449892691845833e-2, 7.74545014278341407640e-4)
_D = (1.0, 2.05319162663775882187e0, 1.67638483018380384940e0, 6.89767334985100004550e-1,
      1.48103976427480074590e-1, 1.51986665636164571966e-2, 5.47593808499534494600e-4,
      1.05075007164441684324e-9)
_E = (6.65790464350110377720e0, 5.46378491116411436990e0, 1.78482653991729133580e0,
      2.96560571828504891230e-1, 2.65321895265761230930e-2, 1.24266094738807843860e-3,
      2.71155556874348757815e-5, 2.01033439929228813265e-7)
_F = (1.0, 5.99832206555887937690e-1, 1.36929880922735805310e-1, 1.48753612908506148525e-2,
      7.86869131145613259100e-4, 1.84631831751005468180e-5, 1.42151175831644588870e-7,
      2.04426310338993978564e-15)
_A_ARR, _B_ARR, _C_ARR, _D_ARR, _E_ARR, _F_ARR = (
    np.array(c, dtype=np.float64) for c in (_A, _B, _C, _D, _E, _F)
)


@njit(inline="always")
def _poly7(c: np.ndarray, x: float) -> float:
    return (((((((c[7] * x + c[6]) * x + c[5]) * x + c[4]) * x + c[3]) * x + c[2]) * x
             + c[1]) * x + c[0])


@njit(inline="always")
def _ppnd16(p: float) -> float:
    """Inverse standard normal CDF for 0 < p < 1 (AS241)."""
    q = p - 0.5
    if abs(q) <= 0.425:
        r = 0.180625 - q * q
        return q * _poly7(_A_ARR, r) / _poly7(_B_ARR, r)
    r = p if q < 0.0 else 1.0 - p
    r = math.sqrt(-math.log(r))
    if r <= 5.0:
        r -= 1.6
        val = _poly7(_C_ARR, r) / _poly7(_D_ARR, r)
    else:
        r -= 5.0
        val = _poly7(_E_ARR, r) / _poly7(_F_ARR, r)
    return -val if q < 0.0 else val


@njit(parallel=True, nogil=True, cache=True)
def _inverse_normal_kernel(p: np.ndarray, out: np.ndarray) -> None:
    for i in prange(p.shape[0]):
        out[i] = _ppnd16(p[i])


def inverse_normal_cdf(*, p: np.ndarray) -> np.ndarray:
    """Inverse standard normal CDF (compiled AS241), elementwise over any shape, float64."""
    arr = np.ascontiguousarray(p, dtype=np.float64)
    if arr.size and not (np.all(arr > 0.0) and np.all(arr < 1.0)):
        raise ValueError("p must lie strictly inside (0, 1)")
    out = np.empty_like(arr)
    _inverse_normal_kernel(arr.reshape(-1), out.reshape(-1))
    return out


def bridge_plan(*, timesteps: int) -> tuple[np.ndarray, ...]:
    """Brownian-bridge construction order on the grid 0..n (unit steps), breadth first.

    Returns (point, left, right, w_left, w_right, sd), each of length n: normal k sets
    W[point[k]] = w_left[k] * W[left[k]] + w_right[k] * W[right[k]] + sd[k] * z[k]; entry 0 is the
    terminal point W[n] = sqrt(n) z[0] (left = right = 0, W[0] = 0).
    """
    n = int(timesteps)
    if n < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    point, left, right = [n], [0], [0]
    w_left, w_right, sd = [0.0], [0.0], [math.sqrt(n)]
    intervals = [(0, n)]
    head = 0
    while head < len(intervals):
        lo, hi = intervals[head]
        head += 1
        if hi - lo < 2:
            continue
        mid = (lo + hi) // 2
        point.append(mid)
        left.append(lo)
        right.append(hi)
        w_left.append((hi - mid) / (hi - lo))
        w_right.append((mid - lo) / (hi - lo))
        sd.append(math.sqrt((mid - lo) * (hi - mid) / (hi - lo)))
        intervals += [(lo, mid), (mid, hi)]
    ints = [np.array(a, dtype=np.int64) for a in (point, left, right)]
    floats = [np.array(a, dtype=np.float64) for a in (w_left, w_right, sd)]
    return (*ints, *floats)


@njit(inline="always")
def _bridge_row(zin: np.ndarray, w: np.ndarray, out: np.ndarray, point: np.ndarray,
                left: np.ndarray, right: np.ndarray, w_left: np.ndarray, w_right: np.ndarray,
                sd: np.ndarray) -> None:
    n = zin.shape[0]
    w[0] = 0.0
    w[n] = sd[0] * zin[0]
    for k in range(1, n):
        w[point[k]] = w_left[k] * w[left[k]] + w_right[k] * w[right[k]] + sd[k] * zin[k]
    for t in range(n):
        out[t] = w[t + 1] - w[t]


@njit(parallel=True, nogil=True, cache=True)
def _bridge_kernel(z: np.ndarray, out: np.ndarray, point: np.ndarray, left: np.ndarray,
                   right: np.ndarray, w_left: np.ndarray, w_right: np.ndarray,
                   sd: np.ndarray) -> None:
    n = z.shape[1]
    for i in prange(z.shape[0]):
        w = np.empty(n + 1)
        _bridge_row(z[i], w, out[i], point, left, right, w_left, w_right, sd)


def brownian_bridge(*, z: np.ndarray) -> np.ndarray:
    """Map rows of i.i.d. N(0,1) draws (P, n), in bridge order, to N(0,1) increments in time order.

    The map is linear and orthogonal, so i.i.d. input gives i.i.d. output; QMC input gets its first
    coordinates spent on the coarse path shape.
    """
    arr = np.ascontiguousarray(z, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise ValueError(f"z must have shape (P, timesteps >= 1), got {arr.shape}")
    out = np.empty_like(arr)
    _bridge_kernel(arr, out, *bridge_plan(timesteps=arr.shape[1]))
    return out


@njit(inline="always")
def _sobol_jump(sv: np.ndarray, shift: np.ndarray, index: int, quasi: np.ndarray) -> None:
    """quasi <- integer Sobol' point `index`: shift XOR the direction numbers of gray(index)."""
    g = index ^ (index >> 1)
    for i in range(sv.shape[0]):
        quasi[i] = shift[i]
    j = 0
    while g != 0:
        if g & 1:
            for i in range(sv.shape[0]):
                quasi[i] ^= sv[i, j]
        g >>= 1
        j += 1


@njit(inline="always")
def _sobol_advance(sv: np.ndarray, index: int, quasi: np.ndarray) -> None:
    """quasi: point `index` -> point `index + 1` (gray codes differ in bit ctz(index + 1))."""
    nxt = index + 1
    j = 0
    while (nxt & 1) == 0:
        nxt >>= 1
        j += 1
    for i in range(sv.shape[0]):
        quasi[i] ^= sv[i, j]


@njit(parallel=True, nogil=True, cache=True)
def _sobol_uint_kernel(sv: np.ndarray, shift: np.ndarray, start: int, out: np.ndarray) -> None:
    n = out.shape[0]
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        lo = c * _CHUNK
        hi = min(n, lo + _CHUNK)
        quasi = np.empty(sv.shape[0], dtype=np.uint64)
        _sobol_jump(sv, shift, start + lo, quasi)
        for k in range(lo, hi):
            out[k, :] = quasi
            _sobol_advance(sv, start + k, quasi)


def _qmc_normals_py(sv: np.ndarray, shift: np.ndarray, start: int, out: np.ndarray,
                    point: np.ndarray, left: np.ndarray, right: np.ndarray, w_left: np.ndarray,
                    w_right: np.ndarray, sd: np.ndarray) -> None:
    """Fill out (P, n) with bridged normals from Sobol' points start .. start + P - 1."""
    n_points, dim = out.shape
    top = np.uint64(11)  # keep the top 53 of 64 bits: exactly representable as float64
    for c in prange((n_points + _CHUNK - 1) // _CHUNK):
        lo = c * _CHUNK
        hi = min(n_points, lo + _CHUNK)
        quasi = np.empty(dim, dtype=np.uint64)
        zin = np.empty(dim)
        w = np.empty(dim + 1)
        _sobol_jump(sv, shift, start + lo, quasi)
        for k in range(lo, hi):
            for i in range(dim):
                zin[i] = _ppnd16(((quasi[i] >> top) + 0.5) * 1.1102230246251565e-16)  # 2**-53
            if dim == 1:
                out[k, 0] = zin[0]
            else:
                _bridge_row(zin, w, out[k], point, left, right, w_left, w_right, sd)
            _sobol_advance(sv, start + k, quasi)


_qmc_normals_parallel = njit(parallel=True, nogil=True, cache=True)(_qmc_normals_py)
# The workqueue threading layer is not thread-safe; a background producer then runs this one.
# Not cached: numba's cache key omits `parallel`, so it would share the parallel build's entries.
_qmc_normals_serial = njit(nogil=True)(_qmc_normals_py)


def scrambled_sobol_tables(*, dim: int, seed: np.random.SeedSequence) -> tuple[np.ndarray, ...]:
    """Scrambled direction numbers (dim, 64) and digital shift (dim,) of scipy's Sobol' engine.

    scipy exposes no random access, so its scrambled tables are read and driven by the Gray-code
    kernel here; tests check the points equal `Sobol.random` bit-for-bit.
    """
    engine = qmc.Sobol(d=dim, scramble=True, bits=_SOBOL_BITS, rng=np.random.default_rng(seed))
    sv = np.ascontiguousarray(engine._sv, dtype=np.uint64)
    shift = np.ascontiguousarray(engine._shift, dtype=np.uint64)
    if sv.shape != (dim, _SOBOL_BITS) or shift.shape != (dim,):
        raise RuntimeError("unexpected scipy Sobol' internals; check the scipy version")
    return sv, shift


def sobol_points_uint(*, sv: np.ndarray, shift: np.ndarray, start: int, n: int) -> np.ndarray:
    """Integer Sobol' points start .. start + n - 1, (n, dim) uint64 (scipy's is x * 2**-64)."""
    if start < 0 or n < 0 or start + n > 2**63 - 1:
        raise ValueError(f"start/n out of range: start={start}, n={n}")
    out = np.empty((n, sv.shape[0]), dtype=np.uint64)
    _sobol_uint_kernel(sv, shift, start, out)
    return out


@functools.cache
def threading_layer_is_threadsafe() -> bool:
    """Whether numba's threading layer takes parallel launches from several threads at once."""
    _inverse_normal_kernel(np.full(1, 0.5), np.empty(1))  # the layer is chosen on first launch
    try:
        return str(numba.threading_layer()) != "workqueue"
    except ValueError:
        return False


def _produce(make_draw: Any, first: int, slots: threading.Semaphore, out: queue.Queue,
             stop: threading.Event) -> None:
    """Producer loop: generate draws first, first + 1, ... while a buffer slot is free."""
    index = first
    try:
        while not stop.is_set():
            if not slots.acquire(timeout=_POLL_S):
                continue
            if stop.is_set():
                return
            out.put(make_draw(index))
            index += 1
    except BaseException as exc:  # handed to the consumer, which re-raises it in next()
        out.put(exc)


def _shutdown(stop: threading.Event, thread: threading.Thread | None) -> None:
    stop.set()
    if thread is not None and thread is not threading.current_thread():
        thread.join()


class NormalStream:
    """One reproducible stream of draws (C, M, timesteps) float64; see the module docstring."""

    def __init__(self, source: NormalsSource, stream_id: int, skip: int) -> None:
        self._source = source
        self.stream_id = stream_id
        self._position = skip
        self._closed = False
        self._stop = threading.Event()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._slots = threading.Semaphore(source.prefetch)
        self._make_draw = source._draw_maker(stream_id)
        self._thread: threading.Thread | None = None
        if source.prefetch > 0:
            self._thread = threading.Thread(
                target=_produce,
                args=(self._make_draw, skip, self._slots, self._queue, self._stop),
                name=f"normals-{source.kind}-{stream_id}",
                daemon=True,
            )
            self._thread.start()
        # Stops the producer even if close() is never called (the thread holds no ref to self).
        self._finalizer = weakref.finalize(self, _shutdown, self._stop, self._thread)

    @property
    def position(self) -> int:
        """Draws consumed so far, including the skip the stream was opened with."""
        return self._position

    def next(self) -> Any:
        """The next draw: (contracts_per_draw, paths_per_contract, timesteps) N(0,1) increments."""
        if self._closed:
            raise RuntimeError(f"normal stream {self.stream_id} is closed")
        if self._thread is None:
            draw = self._make_draw(self._position)
        else:
            item = self._queue.get()
            if isinstance(item, BaseException):
                self.close()
                raise RuntimeError(f"normal stream {self.stream_id} producer failed") from item
            draw = item
            self._slots.release()
        self._position += 1
        return self._source._to_device(draw)

    def close(self) -> None:
        """Stop and join the producer thread and drop buffered draws; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        # Free a slot so a producer blocked on acquire sees the stop flag promptly.
        self._slots.release()
        self._finalizer()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._source._release(self)

    def __enter__(self) -> NormalStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class NormalsSource:
    """Factory of reproducible normal streams with fixed shapes and a hard memory cap.

    Each open stream buffers at most `prefetch` draws ahead plus the draw in hand:
    (prefetch + 1) * C * M * timesteps * 8 bytes, times `max_open_streams` (default 2: training and
    validation), is checked against `cap_bytes` (setting memory.normals_bytes) here, at
    construction; opening more streams at once than that is refused. `prefetch=0` generates each
    draw inside `next()`, with no thread. `close()` (or `with`) closes every open stream.
    """

    def __init__(self, kind: NormalsKind, *, timesteps: int, paths_per_contract: int,
                 contracts_per_draw: int, seed: int, cap_bytes: int, prefetch: int = 2,
                 max_open_streams: int = 2, device: Literal["cpu", "cuda"] = "cpu") -> None:
        if kind not in ("qmc", "philox"):
            raise ValueError(f"kind must be 'qmc' or 'philox', got {kind!r}")
        for name, value, low in (("timesteps", timesteps, 1),
                                 ("paths_per_contract", paths_per_contract, 1),
                                 ("contracts_per_draw", contracts_per_draw, 1),
                                 ("seed", seed, 0), ("prefetch", prefetch, 0),
                                 ("max_open_streams", max_open_streams, 1)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        m = int(paths_per_contract)
        if kind == "qmc" and m & (m - 1):
            raise ValueError(f"paths_per_contract must be a power of two for QMC, got {m}")
        if kind == "qmc" and timesteps > qmc.Sobol.MAXDIM:
            raise ValueError(f"timesteps must be <= {qmc.Sobol.MAXDIM} for QMC, got {timesteps}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self.kind: NormalsKind = kind
        self.timesteps = int(timesteps)
        self.paths_per_contract = m
        self.contracts_per_draw = int(contracts_per_draw)
        self.seed = int(seed)
        self.prefetch = int(prefetch)
        self.max_open_streams = int(max_open_streams)
        self.device = device
        self.draw_shape = (self.contracts_per_draw, m, self.timesteps)
        self.draw_bytes = nbytes_of(self.draw_shape, np.float64)
        self.buffer_bytes = (self.prefetch + 1) * self.draw_bytes * self.max_open_streams
        check_cap(f"normals source ({self.max_open_streams} stream(s) x (prefetch {self.prefetch}"
                  f" + 1) draws of {self.draw_shape} float64)", self.buffer_bytes, int(cap_bytes),
                  setting="memory.normals_bytes")
        self._xp: Any = np
        if device == "cuda":
            from spectral_core.device import array_module

            self._xp = array_module("cuda")
        self._open: weakref.WeakSet[NormalStream] = weakref.WeakSet()
        self._closed = False
        self._lock = threading.Lock()
        self._qmc_kernel: Any = _qmc_normals_parallel
        if kind == "qmc" and self.prefetch > 0 and not threading_layer_is_threadsafe():
            self._qmc_kernel = _qmc_normals_serial
        self._plan = bridge_plan(timesteps=self.timesteps)

    def _draw_maker(self, stream_id: int) -> Any:
        """A pure function draw index -> host draw; it holds no reference to the stream."""
        shape = self.draw_shape
        n_points = shape[0] * shape[1]
        if self.kind == "philox":
            key = np.random.SeedSequence([self.seed, stream_id, 1]).generate_state(2, np.uint64)

            def philox_draw(index: int) -> np.ndarray:
                bits = np.random.Philox(key=key, counter=int(index) << 192)
                return np.random.Generator(bits).standard_normal(shape)

            return philox_draw

        dim, plan, kernel = self.timesteps, self._plan, self._qmc_kernel
        seed = self.seed

        def qmc_draw(index: int) -> np.ndarray:
            tables = scrambled_sobol_tables(
                dim=dim, seed=np.random.SeedSequence([seed, stream_id, 0, int(index)])
            )
            out = np.empty((n_points, dim), dtype=np.float64)  # (C*M, n)
            kernel(*tables, 0, out, *plan)
            return out.reshape(shape)  # (C, M, n)

        return qmc_draw

    def _to_device(self, draw: np.ndarray) -> Any:
        # No GPU Sobol' here: a CUDA source copies each finished draw to the device once.
        return draw if self._xp is np else self._xp.asarray(draw)

    def stream(self, stream_id: int, *, skip: int = 0) -> NormalStream:
        """Open stream `stream_id` positioned after `skip` draws; its producer starts now."""
        for name, value in (("stream_id", stream_id), ("skip", skip)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if skip >= _MAX_DRAWS:
            raise ValueError(f"skip must be < 2**63 draws, got {skip}")
        with self._lock:
            if self._closed:
                raise RuntimeError("normals source is closed")
            if len(self._open) >= self.max_open_streams:
                raise RuntimeError(
                    f"{len(self._open)} stream(s) already open, max_open_streams="
                    f"{self.max_open_streams} (the memory cap was sized for that many); close one"
                )
            stream = NormalStream(self, int(stream_id), int(skip))
            self._open.add(stream)
        return stream

    def _release(self, stream: NormalStream) -> None:
        with self._lock:
            self._open.discard(stream)

    @property
    def open_streams(self) -> int:
        """Streams opened and not yet closed (or garbage collected)."""
        return len(self._open)

    def close(self) -> None:
        """Close every open stream and refuse new ones; idempotent."""
        with self._lock:
            self._closed = True
            streams = list(self._open)
        for stream in streams:
            stream.close()

    def __enter__(self) -> NormalsSource:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
