# Aura's image: the gateway and the worker (same image, different command).
#   docker build -t aura-platform:0.1.0 .
# The tag follows the version in pyproject.toml; deploy/k8s and docker-compose.yml use it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# What `pip install .` needs: the project's metadata (README.md is its long description)
# and the package. No dev extras: the image runs the platform, not the tests.
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . \
    && groupadd --system --gid 10001 aura \
    && useradd --system --uid 10001 --gid aura --create-home --home-dir /home/aura aura

# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /home/aura

# 8000: the gateway (API, /healthz, /readyz, /metrics); 9100: a worker's /metrics
# (WORKER_METRICS_PORT).
EXPOSE 8000 9100

# The worker overrides it: aura worker --queues realtime_queue,bulk_queue --concurrency 2
CMD ["aura", "gateway", "--host", "0.0.0.0", "--port", "8000"]
