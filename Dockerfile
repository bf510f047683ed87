# syntax=docker/dockerfile:1.7
# piggyback-serve: one image for CPU and NVIDIA GPUs (PyPI's torch wheels carry CUDA; on a
# host without a GPU, PIGGY_DEVICE=auto picks the CPU). CPU-only and much smaller:
#   docker build --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu .
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
# Dependencies alone first, from pyproject.toml with empty package stubs: this layer
# (torch and all) is rebuilt only when pyproject.toml changes, not on every code edit.
COPY pyproject.toml README.md ./
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir masks server client \
    && touch masks/__init__.py server/__init__.py client/__init__.py \
    && pip install '.[server]' \
    && pip uninstall -y piggyback-serve \
    && rm -rf masks server client build ./*.egg-info
COPY masks ./masks
COPY server ./server
COPY client ./client
RUN pip install --no-deps --no-cache-dir . && rm -rf build ./*.egg-info

FROM python:${PYTHON_VERSION}-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIGGY_HOME=/data \
    PIGGY_HOST=0.0.0.0 \
    PIGGY_PORT=8000
COPY --from=build /opt/venv /opt/venv
# The demo, built at build time: the bundled tasks, checked against the installed
# backbone's fingerprint (the build fails if they don't match). `demo-seed` uploads them.
RUN piggy-masks demo --out /opt/piggy/demo-tasks
RUN useradd --system --uid 10001 --user-group --home-dir /data --create-home piggy
WORKDIR /app
COPY deploy/seed_demo.py ./deploy/seed_demo.py
USER piggy
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PIGGY_PORT', '8000'), timeout=2)"]
# Alone (`docker run -p 8000:8000 IMAGE`): the offline demo, its tasks in /data.
# docker-compose.yml runs `piggy-serve` against Redis instead.
CMD ["piggy-serve", "--demo"]
