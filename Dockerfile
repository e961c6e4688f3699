# Multi-stage build: compile in the Rust image, run in a small Debian image as a non-root user.
# Run the demo:  docker build -t sde-gateway . && docker run --rm -p 50051:50051 sde-gateway
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY src ./src
COPY config ./config
RUN cargo build --release --locked && strip target/release/sde-gateway

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/sde sde \
    && mkdir -p /var/lib/sde && chown sde /var/lib/sde
COPY --from=build /src/target/release/sde-gateway /usr/local/bin/sde-gateway
COPY config/gateway.example.toml /etc/sde-gateway/gateway.example.toml
USER sde
WORKDIR /var/lib/sde
EXPOSE 50051
# The demo listens on all interfaces inside the container; the port is published by `-p`.
ENTRYPOINT ["sde-gateway"]
CMD ["serve", "--demo", "--dir", "/var/lib/sde/demo", "--listen", "0.0.0.0:50051"]
