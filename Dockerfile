# Tollgate: build with the Rust toolchain, run on a small Debian image as a non-root user.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin tollgate \
 && strip target/release/tollgate

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin tollgate \
 && mkdir -p /data && chown tollgate:tollgate /data
COPY --from=build /src/target/release/tollgate /usr/local/bin/tollgate
USER tollgate
WORKDIR /data
ENV TOLLGATE_LISTEN=0.0.0.0:8080 \
    TOLLGATE_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8080
# tini forwards SIGTERM so in-flight requests drain before the container stops.
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/tollgate"]
CMD ["serve"]
