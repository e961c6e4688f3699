# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, run in a distroless image (no shell, no package
# manager) as a non-root user, with a read-only root filesystem.
#
# Build and run the demo (one command once built; the anonymous volume at /var/lib/sde is the
# only writable place):
#   docker build -t sde-gateway .
#   docker run --rm --read-only -p 50051:50051 --name sde sde-gateway
# Then copy out the demo CA and a token for a client:
#   docker cp sde:/var/lib/sde/demo/tls/ca.pem . && docker cp sde:/var/lib/sde/demo/tokens/alice.jwt .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin sde-gateway \
    && strip target/release/sde-gateway \
    && mkdir -p /out/var/lib/sde

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/sde-gateway /usr/local/bin/sde-gateway
COPY --from=build /src/config/gateway.example.toml /etc/sde-gateway/gateway.example.toml
# The only writable path: the demo world, or in production the audit log and registry mounts.
COPY --from=build --chown=65532:65532 /out/var/lib/sde /var/lib/sde
VOLUME ["/var/lib/sde"]
USER 65532:65532
WORKDIR /var/lib/sde
EXPOSE 50051
# gRPC health over TLS against the demo's CA; for production, override with --ca/--domain of
# the real certificate (the Kubernetes manifests do).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["sde-gateway", "health", "--addr", "127.0.0.1:50051", "--ca", "/var/lib/sde/demo/tls/ca.pem"]
# The demo listens on all interfaces inside the container; the port is published by `-p`.
ENTRYPOINT ["sde-gateway"]
CMD ["serve", "--demo", "--dir", "/var/lib/sde/demo", "--listen", "0.0.0.0:50051"]
