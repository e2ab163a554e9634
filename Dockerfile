# tlsproxy as a sidecar image: a non-root daemon on a read-only root filesystem.
#
#   docker build -t tlsproxy .
#   docker run --read-only --tmpfs /run/tlsproxy:uid=65532,gid=65532 \
#     -v "$PWD/certs:/etc/tlsproxy/tls:ro" -p 8443:8443 -p 9090:9090 tlsproxy
#
# BASE_IMAGE is any Debian bookworm image, for the build stage only (the
# runtime stage starts from scratch); deploy/README.md shows how to build one
# from Debian's packages where no registry is reachable.
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim

# ---------------------------------------------------------------- build
FROM ${BASE_IMAGE} AS build

# Debian's python3 (3.11 on bookworm); versions float with Debian's security
# updates, which is what we want for a TLS-facing daemon.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml README.md /src/
COPY proxy/ /src/proxy/
COPY deploy/docker/install-venv.sh deploy/docker/runtime-tree.sh /usr/local/bin/
# /runtime: the interpreter, its trimmed stdlib and exactly the shared
# libraries it loads; /opt/tlsproxy: the venv, without pip.
RUN /usr/local/bin/install-venv.sh /src /opt/tlsproxy \
 && /usr/local/bin/runtime-tree.sh /opt/tlsproxy /runtime

# ---------------------------------------------------------------- runtime
FROM scratch

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="tlsproxy" \
      org.opencontainers.image.description="TLS-terminating sidecar proxy on Trio that tells Prometheus how every handshake ended" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# No base image: the tree runtime-tree.sh assembled (no shell, no package
# manager, no compiler) and the venv, each one layer (buildah --layers=false,
# as `make image` runs it, commits the stage as one).
COPY --from=build /runtime/ /
COPY --from=build /opt/tlsproxy /opt/tlsproxy
# The sidecar config of deploy/kubernetes: certificates from ./tls/ beside it.
# A ConfigMap (or -v) mounted on /etc/tlsproxy replaces it.
COPY deploy/kubernetes/base/tlsproxy.toml /etc/tlsproxy/tlsproxy.toml

# Everything the daemon writes goes under /run/tlsproxy, which Kubernetes
# mounts as an emptyDir (docker: --tmpfs) so the root filesystem can be
# read-only. TLSPROXY_STATE_DIR holds the self-signed default certificate
# (only used without --config). TLSPROXY_METRICS_DIR holds the workers'
# multiprocess metrics files when workers > 1 (emptied at start).
ENV PATH=/opt/tlsproxy/bin:/usr/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TLSPROXY_STATE_DIR=/run/tlsproxy/state \
    TLSPROXY_METRICS_DIR=/run/tlsproxy/metrics

# distroless's "nonroot": a fixed numeric uid, so runAsNonRoot can verify it.
USER 65532:65532
WORKDIR /run/tlsproxy

# TLS listener and admin (/metrics /healthz /readyz) of tlsproxy.toml.
EXPOSE 8443 9090

# The daemon itself is PID 1: it installs handlers for SIGTERM (drain),
# SIGINT and SIGHUP, so no init shim is needed for signals. With workers > 1
# it starts the workers, forwards the signals to them and reaps them itself;
# workers start nothing, so no orphan is ever left for PID 1 to reap.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tlsproxy"]
CMD ["run", "--config", "/etc/tlsproxy/tlsproxy.toml"]
