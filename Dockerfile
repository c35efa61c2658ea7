# One image for every stilltag process: tagging worker, training worker, beat, Flower, migrate.
# torch from PyPI bundles its CUDA libraries, so the GPU needs only the host's NVIDIA driver
# and the NVIDIA container toolkit.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    PATH=/app/.venv/bin:$PATH \
    STILLTAG_DATA_DIR=/var/lib/stilltag

RUN pip install --no-cache-dir "uv>=0.5,<1"

WORKDIR /app

# Dependencies first (the big, slow layer), so a code change does not reinstall torch.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-install-project

COPY . .
RUN uv sync --frozen --no-dev

# Non-root; the data folder holds the model cache (the models themselves live in the model store).
RUN useradd --system --create-home --uid 10001 stilltag \
    && mkdir -p "$STILLTAG_DATA_DIR" \
    && chown stilltag:stilltag "$STILLTAG_DATA_DIR"
USER stilltag
# Processes run in the data folder, so beat's schedule file and caches land somewhere writable.
WORKDIR /var/lib/stilltag

ENTRYPOINT ["stilltag"]
CMD ["--help"]
