# MLServer that serves a model inside the exact conda-pack environment it was trained in.
#   docker build -t mlserver-env-entrypoint .
#   docker run -v "$PWD":/mnt/models -e MLSERVER_ENV_TARBALL=/mnt/models/old-sklearn.tar.gz -p 8080:8080 mlserver-env-entrypoint
# Without MLSERVER_ENV_TARBALL (and no environment.tar.gz in /mnt/models) the image's own
# MLServer serves the model. docs/deployment.md has the rest.

# Any Debian-like image with python3.11 and its venv module; the tests pass a local one.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# 1. MLServer, its scikit-learn runtime and the entrypoint's dependencies in a virtualenv, every
#    version pinned by docker/constraints.txt (tested together; see docker/requirements.in).
FROM ${BASE_IMAGE} AS deps
COPY docker/requirements.in docker/constraints.txt /tmp/lock/
RUN python3 -m venv /opt/mlserver \
    && /opt/mlserver/bin/pip install --no-cache-dir --disable-pip-version-check \
        -r /tmp/lock/requirements.in -c /tmp/lock/constraints.txt \
    && /opt/mlserver/bin/pip check \
    && rm -rf /tmp/lock

# 2. This project as a wheel (its own layer: a code change does not reinstall MLServer).
FROM deps AS wheel
COPY pyproject.toml README.md /src/
COPY entrypoint /src/entrypoint
RUN /opt/mlserver/bin/pip wheel --no-cache-dir --disable-pip-version-check --no-deps --wheel-dir /wheels /src

# 3. The image: stage 1 plus the wheel (no compiler, no pip cache, no sources). Built on stage 1
#    rather than copying its virtualenv, so a code change rebuilds only the small layers below.
FROM deps
# lbzip2 decodes a tar.bz2 environment on up to 4 cores (on two, 2.5x faster than libbz2);
# without it the entrypoint decodes bzip2 itself. Debian's package, if the base lacks it.
# hadolint ignore=DL3008
RUN command -v lbzip2 >/dev/null || { apt-get update -qq \
        && apt-get install -y -qq --no-install-recommends lbzip2 \
        && rm -rf /var/lib/apt/lists/*; }
# uid 1000 in group 0; what it must write is group 0 and group-writable, so an arbitrary uid
# in group 0 (as OpenShift runs containers) can write it too. A login shell (`IMAGE bash -lc …`)
# has its PATH reset by /etc/profile: profile.d puts back the environment the entrypoint activated.
# hadolint ignore=SC2016
RUN useradd --no-log-init --uid 1000 --gid 0 --home-dir /home/mlserver --create-home mlserver \
    && install -d -o 1000 -g 0 -m 2775 /opt/envs \
    && install -d -m 0755 /mnt/models \
    && chmod 2775 /home/mlserver \
    && echo 'PATH="${CONDA_PREFIX:+$CONDA_PREFIX/bin:}/opt/mlserver/bin:$PATH"' > /etc/profile.d/mlserver-env.sh

# MLSERVER_ENV_CACHE_DIR is short on purpose: the environment's prefix becomes
# /opt/envs/<8 hex digits>, and conda-unpack cannot write a longer prefix than the packed one
# into binary files. MLServer 1.7 writes its Prometheus files to ./.metrics and (from 1.3 on)
# creates ./.envs at start unless told otherwise: under /tmp both work with a read-only root
# filesystem (with a tmpfs at /tmp). MLServer 1.1 reads neither variable and needs neither.
ENV PATH=/opt/mlserver/bin:$PATH \
    MLSERVER_ENV_CACHE_DIR=/opt/envs \
    MLSERVER_MODELS_DIR=/mnt/models \
    MLSERVER_METRICS_DIR=/tmp/mlserver-metrics \
    MLSERVER_ENVIRONMENTS_DIR=/tmp/mlserver-envs \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

COPY --from=wheel /wheels /tmp/wheels
# --no-index: every dependency must already be in the virtualenv (docker/constraints.txt).
RUN pip install --no-cache-dir --disable-pip-version-check --no-index /tmp/wheels/*.whl \
    && pip check \
    && rm -rf /tmp/wheels

VOLUME ["/opt/envs"]
WORKDIR /home/mlserver
USER 1000:0
EXPOSE 8080 8081 8082
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
    CMD ["/opt/mlserver/bin/python", "-I", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('MLSERVER_HTTP_PORT', '8080') + '/v2/health/ready', timeout=4)"]
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="mlserver-env-entrypoint" \
      org.opencontainers.image.description="MLServer serving a model inside the conda-pack environment it was trained in" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# -I (isolated): PYTHONHOME or PYTHONPATH set for the environment (a pod copying its training
# machine's) would otherwise break the image's own interpreter before the entrypoint runs ("Fatal
# Python error"); the entrypoint drops them for the environment's. The health check likewise.
ENTRYPOINT ["/opt/mlserver/bin/python", "-I", "-m", "entrypoint"]
CMD ["mlserver", "start", "/mnt/models"]
