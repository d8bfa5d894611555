# The weir image the manifests in deploy/kubernetes run. Build it from the repository root:
#
#   docker build -t ghcr.io/example/weir:latest .
#
# (the name deploy/kubernetes/base/kustomization.yaml gives the `weir` image). Not built in this
# project's CI, which has no Docker engine: tests/deploy.rs only checks that this file agrees with
# the manifests (image name, the metrics port the probes use, the config path, the user, the
# `weir` entrypoint). See docs/operations.md, "The image".

# --- build: the system packages scripts/setup.sh installs for a build (librdkafka is compiled
# by rdkafka's cmake-build and needs cmake, a C++ compiler and the libcurl headers; openssl and
# zlib are linked dynamically). Java and Maven are for the local test broker only.
FROM rust:1-bookworm AS build
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        cmake g++ make pkg-config libcurl4-openssl-dev libssl-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin weir \
    && install -m 0755 target/release/weir /usr/local/bin/weir

# --- runtime: the binary and the shared libraries it links (libssl, libcrypto, libz), as a
# non-root user whose id the Deployments' securityContext names.
FROM debian:bookworm-slim
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates libssl3 zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 weir \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin weir
COPY --from=build /usr/local/bin/weir /usr/local/bin/weir
# Topic declarations for `weir topics apply` (the shipped config's topics_dir); the config file
# itself is mounted from the weir-config ConfigMap at WEIR_CONFIG.
COPY topics /etc/weir/topics
ENV WEIR_CONFIG=/etc/weir/weir.yaml
LABEL org.opencontainers.image.title="weir" \
      org.opencontainers.image.description="Workflow automation over Kafka: evaluate, execute, record"
# /metrics, /health/live and /health/ready (metrics_addr in the shipped config).
EXPOSE 9898
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/weir"]
CMD ["run"]
