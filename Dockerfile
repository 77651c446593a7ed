# rwkv7-appliance container: docs/CONTAINER.md.
#   docker build -t rwkv7 .                      (GPU image: CUDA 12.8, torch cu128, wkv7 kernel built ahead of time)
#   docker compose up                            (trains recipe 0.1b; RECIPE=1.5b docker compose up)
# CI builds this same file on a plain Debian base with SKIP_KERNEL=1 (tests/container/ci_image.sh).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
# The runtime stays on the devel image by default: a GPU the ahead-of-time kernel doesn't cover falls back to a
# one-time JIT build (nvcc), and DeepSpeed's CPU-offload Adam is JIT-built too. A -runtime image works otherwise.
ARG RUNTIME_IMAGE=${BASE_IMAGE}

# ---------------------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder
# torch comes first and on its own (see the Makefile); its wheel source is a build arg. TORCH_INDEX_URL is added as
# an extra index for the `make setup` step only; pass an empty value to install from the default index alone.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cu128"
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0;10.0;12.0"
# SKIP_KERNEL=1: no ahead-of-time wkv7 build (a machine without the CUDA toolchain, e.g. CI). The image records it
# in $RWKV7_KERNEL_DIR/KERNEL_SKIPPED and entrypoint.py warns at every start.
ARG SKIP_KERNEL=0
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RWKV7_KERNEL_DIR=/opt/rwkv7/kernels
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# OS packages: only those the base lacks (the CI base already has them; apt is not touched then).
# hadolint ignore=DL3008
RUN need=(python3 python3-venv make ca-certificates); \
    if [ "$SKIP_KERNEL" != 1 ]; then need+=(python3-dev g++); fi; \
    missing=(); for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done; \
    if [ ${#missing[@]} -gt 0 ]; then \
        apt-get update && apt-get install -y --no-install-recommends "${missing[@]}" && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /app
COPY . /app

# The pinned dependency set, installed by the same Makefile target CI runs (venv at /opt/venv, editable install of
# /app: the runtime stage keeps both paths).
RUN if [ -n "$TORCH_INDEX_URL" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL"; fi; \
    make setup PY=python3 VENV=/opt/venv TORCH_SPEC="$TORCH_SPEC" \
    && /opt/venv/bin/python -c "import torch, rwkv7; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# The wkv7 CUDA kernel, ahead of time, for every arch in TORCH_CUDA_ARCH_LIST (no GPU needed, only nvcc).
RUN mkdir -p "$RWKV7_KERNEL_DIR" \
    && if [ "$SKIP_KERNEL" = 1 ]; then \
        echo "built with SKIP_KERNEL=1: no ahead-of-time wkv7 kernel (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)" \
            > "$RWKV7_KERNEL_DIR/KERNEL_SKIPPED"; \
    else \
        /opt/venv/bin/python kernels/build.py; \
    fi

# ---------------------------------------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime
ARG SKIP_KERNEL=0
ARG APP_UID=10001
ENV DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# python3 of the same base as the builder (the venv links to it); the compiler and headers for the JIT fallback.
# hadolint ignore=DL3008
RUN need=(python3 ca-certificates); \
    if [ "$SKIP_KERNEL" != 1 ]; then need+=(python3-dev g++); fi; \
    missing=(); for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done; \
    if [ ${#missing[@]} -gt 0 ]; then \
        apt-get update && apt-get install -y --no-install-recommends "${missing[@]}" && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --gid "$APP_UID" rwkv \
    && useradd --uid "$APP_UID" --gid "$APP_UID" --create-home --shell /bin/bash rwkv \
    && mkdir -p /app/data /app/out /cache/huggingface /cache/rwkv7 \
    && chown -R rwkv:rwkv /app /cache

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/rwkv7/kernels /opt/rwkv7/kernels
COPY --from=builder --chown=rwkv:rwkv /app /app

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RWKV7_KERNEL_DIR=/opt/rwkv7/kernels \
    RWKV7_KERNEL_CACHE=/cache/rwkv7/kernels \
    HF_HOME=/cache/huggingface

USER ${APP_UID}:${APP_UID}
WORKDIR /app
# data/ (downloads and tokenized corpora), out/ (runs: checkpoints, logs, check.json), /cache (HF_HOME, JIT kernels)
VOLUME ["/app/data", "/app/out", "/cache"]
ENTRYPOINT ["/opt/venv/bin/python", "/app/entrypoint.py"]
CMD ["train", "--recipe", "0.1b"]
