# The chorus image: one image, one entry point (`chorus`); docker-compose.yml picks the command.
#   docker build -t chorus .                              # JAX on CPU
#   docker build -t chorus:cuda --build-arg JAX_EXTRA=cuda12 .   # JAX with CUDA 12 (NVIDIA GPUs)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY stream ./stream
COPY operators ./operators

# Every dependency ships a manylinux wheel for CPython 3.11, so no compiler is needed.
ARG JAX_EXTRA=""
RUN pip install . \
 && if [ -n "$JAX_EXTRA" ]; then pip install "jax[${JAX_EXTRA}]"; fi

RUN useradd --system --create-home --uid 10001 chorus \
 && mkdir -p /var/lib/chorus \
 && chown chorus /var/lib/chorus
USER chorus

# Containers serve /metrics on all interfaces; state (firehose cursor, snapshots) in a volume.
ENV CHORUS_METRICS_HOST=0.0.0.0 \
    CHORUS_METRICS_PORT=9464 \
    CHORUS_STATE_DIR=/var/lib/chorus
VOLUME ["/var/lib/chorus"]
EXPOSE 9464

ENTRYPOINT ["chorus"]
CMD ["--help"]
