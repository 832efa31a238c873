# Image of the xdpfw appliance (see docker-compose.yml). BCC comes from Debian, as on a host.
# The base is debian:12-slim; where no registry is reachable, scripts/docker-setup.sh makes it
# with debootstrap.
ARG BASE=debian:12-slim
FROM ${BASE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3-bpfcc libbpfcc python3-venv iproute2 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/xdpfw
# Dependencies first, in a layer of their own: a change to the code does not fetch them again.
# From build/wheels when scripts/docker-setup.sh put them there (no index needed: an offline
# or proxied build host), else from the index. "wheel[s]": optional, the glob may match nothing.
COPY pyproject.toml build/wheel[s] /tmp/wheels/
RUN cp /tmp/wheels/pyproject.toml . && python3 -m venv --system-site-packages .venv \
    && python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && if ls /tmp/wheels/*.whl >/dev/null 2>&1; then echo "--no-index --find-links /tmp/wheels"; fi > /tmp/pip-from \
    && .venv/bin/pip install --no-cache-dir --disable-pip-version-check -q $(cat /tmp/pip-from) -r /tmp/requirements.txt
COPY README.md ./
COPY xdpfw ./xdpfw
COPY scripts ./scripts
# Editable: the program's C sources and the unit template stay where the code expects them.
RUN .venv/bin/pip install --no-cache-dir --disable-pip-version-check -q $(cat /tmp/pip-from) --no-deps -e . \
    && rm -rf /tmp/wheels /tmp/requirements.txt /tmp/pip-from \
    && ln -s /opt/xdpfw/.venv/bin/xdpfw /usr/local/bin/xdpfw
ENTRYPOINT ["xdpfw"]
CMD ["serve", "--config", "/etc/xdpfw/config.toml"]
