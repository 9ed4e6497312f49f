# syntax=docker/dockerfile:1
# Build stage: release binary. etcd-client's build script needs protoc *and* the
# well-known .proto files (libprotobuf-dev, which protobuf-compiler only recommends, so
# --no-install-recommends would drop it); the check fails the build here, with a message,
# rather than deep inside cargo.
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
 && rm -rf /var/lib/apt/lists/* \
 && printf 'syntax = "proto3";\nimport "google/protobuf/descriptor.proto";\n' >/tmp/check.proto \
 && protoc -I/tmp -o /dev/null /tmp/check.proto \
 || { echo "protoc cannot resolve google/protobuf/descriptor.proto (libprotobuf-dev)" >&2; exit 1; }
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin resource-plane

# Runtime stage: the binary, its default config, a non-root user.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /app resource-plane
WORKDIR /app
COPY --from=build /src/target/release/resource-plane /usr/local/bin/resource-plane
COPY config ./config
USER 10001
ENV APP_PORT=8080 LOG_FORMAT=json
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/resource-plane"]
