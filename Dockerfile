# The agentbus image: built from this checkout in a Rust 1.95 stage, run from a slim
# Debian with only CA certificates beside the binary.
#
#   docker build -t agentbus .
#   docker run --rm -v agentbus-data:/data -v ./agentbus.yaml:/etc/agentbus/agentbus.yaml:ro agentbus
#
# compose.yaml builds and runs it with Conduit and nginx (README, "Deploying").

FROM rust:1.95-bookworm AS builder
WORKDIR /build
# The manifest names the benches, so cargo wants their files even for a release build of
# the binary; tests/ is not needed.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY examples ./examples
# The registry and target caches survive between builds (BuildKit); the binary is copied
# out of the cached target directory, which is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/build/target \
    cargo build --release --locked --bin agentbus \
    && install -m 0755 target/release/agentbus /usr/local/bin/agentbus

FROM debian:bookworm-slim
# ca-certificates: model providers and a homeserver behind TLS are reached over HTTPS.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 agentbus \
    && useradd --system --uid 10001 --gid agentbus --home-dir /data --shell /usr/sbin/nologin agentbus \
    && mkdir -p /data /etc/agentbus \
    && chown agentbus:agentbus /data \
    && chmod 0700 /data
COPY --from=builder /usr/local/bin/agentbus /usr/local/bin/agentbus
# The config is mounted here (read-only); its store.path should be /data, the volume that
# holds the journal, history, sessions and the generated tokens.
ENV AGENTBUS_CONFIG=/etc/agentbus/agentbus.yaml
USER agentbus
WORKDIR /data
VOLUME ["/data"]
# appservice.bind: transactions from the homeserver, the admin API, /metrics.
EXPOSE 9000
ENTRYPOINT ["agentbus"]
CMD ["serve"]
