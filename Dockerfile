# One image for every rayloop container: Ray head and workers, the MLflow server, the Gradio UI.
# The wheels in requirements.lock bundle their CUDA libraries, so the same image runs on CPU
# hosts and, with the NVIDIA container toolkit, on GPU hosts.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    RAYLOOP_DATA_DIR=/data

WORKDIR /app

# Dependencies first: this layer is rebuilt only when the lock changes, not on every code edit.
# psycopg is the PostgreSQL driver the compose stack needs (store + MLflow backend); the
# embedded defaults use SQLite, which is why it is not in requirements.lock.
COPY requirements.lock pyproject.toml ./
RUN pip install pip==25.3 \
    && pip install -r requirements.lock \
    && pip install psycopg==3.3.9 psycopg-binary==3.3.9

# Every package pyproject.toml installs (tests/test_deploy_configs.py holds the two lists together).
COPY cluster ./cluster
COPY store ./store
COPY train ./train
COPY tune ./tune
COPY control ./control
COPY serve ./serve
COPY monitoring ./monitoring
COPY simulation ./simulation
COPY ui ./ui
COPY rayloop ./rayloop
COPY params.yaml ./
# setuptools comes from the lock, so no build isolation (and no extra download) is needed.
RUN pip install --no-deps --no-build-isolation -e .

# Non-root; the mount points are created here so fresh named volumes mounted on them
# (data, MLflow artifacts) inherit this owner and stay writable.
RUN useradd --create-home --uid 1000 rayloop \
    && mkdir -p /data /shared /mlartifacts \
    && chown rayloop:rayloop /data /shared /mlartifacts
USER rayloop

# Serve, Gradio, Ray dashboard, MLflow, Ray GCS, Ray metrics.
EXPOSE 8000 7860 8265 5000 6379 8080

CMD ["rayloop", "status"]
