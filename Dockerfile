# piggyback-serve: one image for CPU and NVIDIA GPUs. Build with BuildKit (Docker >= 23 by
# default; Docker 20.10: DOCKER_BUILDKIT=1); no `# syntax=` line, so no frontend is pulled.
#
# torch: PyPI's torch==2.14.1 for Linux x86_64 is a CUDA build and pulls the CUDA libraries
# (~4.5 GB installed): the image (5.5 GB) then runs on a GPU (docker-compose.gpu.yml) or,
# with PIGGY_DEVICE=auto on a host without one, on the CPU. triton (torch.compile's GPU
# compiler, 0.9 GB) is removed: the server runs eager PyTorch only. CPU only and much
# smaller, where download.pytorch.org is reachable:
#   docker build --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu .
# Wheels put in deploy/wheels/ (torch, the CUDA libraries, anything) are installed from
# there instead of being downloaded: see deploy/wheels/README.md.
# BASE_IMAGE: any Debian-like image with python3 >= 3.11 and python3-venv
# (deploy/docker-check.sh builds one locally where no registry is reachable).
ARG PYTHON_VERSION=3.11
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim

# The dependencies alone, from pyproject.toml with empty package stubs: this stage (torch
# and all) is rebuilt only when pyproject.toml changes, not on every code edit.
FROM ${BASE_IMAGE} AS deps
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
WORKDIR /src
# pyproject.toml alone: an empty README.md stands in for the real one (pyproject names it),
# so that editing the README does not rebuild this layer.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=deploy/wheels,target=/wheels \
    mkdir -p src/piggyback_serve \
    && touch README.md src/piggyback_serve/__init__.py \
    && if ls /wheels/*.whl >/dev/null 2>&1; then pip install --find-links /wheels /wheels/*.whl; fi \
    && pip install --find-links /wheels '.[server]' \
    && pip uninstall -y piggyback-serve triton \
    && rm -rf src build README.md

# The project itself, as a wheel (setuptools is already in the venv: torch needs it).
FROM deps AS build
COPY README.md ./
COPY src ./src
RUN pip wheel --no-deps --no-build-isolation --no-cache-dir --wheel-dir /dist .

# The runtime image is the dependency stage itself: its venv layer (GBs, reused while
# pyproject.toml is unchanged) is not copied again; the project goes on top as one small
# layer, so that a code change ships MBs. No compiler or pip cache in any layer.
FROM deps
ENV PYTHONUNBUFFERED=1 \
    PIGGY_HOME=/data \
    PIGGY_HOST=0.0.0.0 \
    PIGGY_PORT=8000
RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    pip install --no-deps --no-cache-dir /dist/*.whl
# The demo, built at build time: the bundled tasks, checked against the installed
# backbone's fingerprint (the build fails if they don't match). `demo-seed` uploads them,
# as the user below: the files are written private (0600), hence the chmod.
RUN piggy-masks demo --out /opt/piggy/demo-tasks && chmod -R a+rX /opt/piggy
RUN useradd --system --uid 10001 --user-group --home-dir /data --create-home piggy
WORKDIR /app
COPY deploy/seed_demo.py ./deploy/seed_demo.py
USER piggy
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PIGGY_PORT', '8000'), timeout=2)"]
# Alone (`docker run -p 8000:8000 IMAGE`): the offline demo, its tasks in /data. The Open
# Inference Protocol over gRPC listens on PIGGY_GRPC_PORT (8001): add `-p 8001:8001`.
# docker-compose.yml runs `piggy-serve` against Redis instead.
CMD ["piggy-serve", "--demo"]
