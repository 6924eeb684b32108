# The planning service with its bundled pointmaze-umaze model.
#   docker build -t worldplan .                          # CPU
#   docker build -t worldplan --build-arg EXTRAS=cuda .  # CUDA 12 (jax[cuda12])
# Another model: mount its bundle directory and set WORLDPLAN_MODEL_DIR to it.
FROM python:3.11-slim

ARG EXTRAS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    MPLBACKEND=Agg

WORKDIR /src
COPY . .
RUN pip install --no-cache-dir ".${EXTRAS:+[${EXTRAS}]}"

RUN useradd --create-home --uid 10001 worldplan
USER worldplan
WORKDIR /home/worldplan

EXPOSE 8000

# /readyz answers 503 until every program is compiled (about a minute on 2 CPU cores).
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"]

CMD ["worldplan", "serve", "--host", "0.0.0.0", "--port", "8000"]
