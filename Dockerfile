# syntax=docker/dockerfile:1
# Herald container image: a Rust builder stage, then a small Debian runtime.
#   docker build -t herald .
#   docker run --rm herald --help
# The image runs `herald serve` as an unprivileged user, HTTP on 0.0.0.0:8080.
# Configure it with HERALD_<SECTION>__<KEY> variables (see herald.example.toml)
# or mount a file and pass `--config /etc/herald/herald.toml`.

# ---- build -----------------------------------------------------------------
FROM rust:1-bookworm AS builder
# librdkafka is built from source by rdkafka's cmake-build feature: it needs
# cmake, and its build includes curl headers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake libcurl4-openssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cache mounts keep the registry and build artifacts between image builds;
# the binary is copied out because the target dir is not part of the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin herald \
    && install -D -m 0755 target/release/herald /out/usr/local/bin/herald
# Files Herald reads at run time from its working directory.
RUN mkdir -p /out/app/templates \
    && if [ -d templates ]; then cp -r templates/. /out/app/templates/; fi \
    && if [ -d schemas ]; then cp -r schemas /out/app/schemas; fi \
    && cp herald.example.toml /out/app/herald.example.toml

# ---- run -------------------------------------------------------------------
FROM debian:bookworm-slim
# ca-certificates: TLS to SMTP relays, webhook targets and brokers.
# libcurl4: librdkafka may link it (harmless when it does not).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libcurl4 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home-dir /app --shell /usr/sbin/nologin herald
COPY --from=builder /out/ /
WORKDIR /app
USER herald
ENV HERALD_HTTP__BIND=0.0.0.0:8080 \
    RUST_LOG=info
EXPOSE 8080
ENTRYPOINT ["herald"]
CMD ["serve"]
