# SpectralMC pricing service on a CUDA runtime (falls back to CPU when no GPU is visible).
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 spectralmc
WORKDIR /app

# Dependencies first so code edits do not invalidate the heavy layer. The gpu extra brings cupy
# and numba-cuda with NVVM (the runtime image has no nvcc/NVVM of its own).
COPY pyproject.toml README.md ./
COPY spectral_core ./spectral_core
COPY storage ./storage
COPY server ./server
COPY config ./config
COPY bench ./bench
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --upgrade pip \
 && /opt/venv/bin/pip install '.[gpu]'
COPY openapi.yaml ./
# Compile the numba pricing kernels once at build time into a cache the service user can read
# and extend (a read-only in-tree cache would be ignored); the loader still warms up before the
# first model swap, which is a cache hit when the host CPU matches the build's.
ENV NUMBA_CACHE_DIR=/opt/numba-cache
RUN mkdir -p /opt/numba-cache \
 && /opt/venv/bin/python -c "from spectral_core.config import CoreConfig; \
from spectral_core.cvnn import build_model; from spectral_core.pricer import Pricer; \
c = CoreConfig(); m = build_model(c.arch, n_freq=c.spectrum.n_freq); \
[Pricer(m, c, reproducible=r).warm_up() for r in (False, True)]" \
 && chown -R spectralmc /opt/numba-cache

USER spectralmc
ENV PATH=/opt/venv/bin:$PATH \
    SPECTRALMC_SERVER__HOST=0.0.0.0 \
    SPECTRALMC_SERVER__PORT=8080 \
    SPECTRALMC_STORE__URL=file:///home/spectralmc/var/store \
    SPECTRALMC_TRAINING__DEVICE=auto
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD python3 -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["spectralmc"]
CMD ["serve"]
