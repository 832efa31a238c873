# Image of the xdpfw appliance (see docker-compose.yml). BCC comes from Debian, as on a host.
FROM debian:12-slim
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3-bpfcc libbpfcc python3-venv iproute2 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/xdpfw
COPY pyproject.toml README.md ./
COPY xdpfw ./xdpfw
COPY scripts ./scripts
# Editable: the program's C sources and the unit template stay where the code expects them.
RUN python3 -m venv --system-site-packages .venv \
    && .venv/bin/pip install --no-cache-dir -e .
ENV PATH=/opt/xdpfw/.venv/bin:$PATH
ENTRYPOINT ["xdpfw"]
CMD ["serve", "--config", "/etc/xdpfw/config.toml"]
