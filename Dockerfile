# syntax=docker/dockerfile:1
# The Nexus images, one target each (names and tags as deploy/images/kustomization.yaml
# sets them for every manifest and for the webhook's injected sidecar and launcher):
#   docker build --target sidecar  -t ghcr.io/nexus/nexus-sidecar:0.1.0 .
#   docker build --target gateway  -t ghcr.io/nexus/nexus-gateway:0.1.0 .
#   docker build --target launcher -t ghcr.io/nexus/nexus-launch:0.1.0 .
#   docker build --target nexusctl -t ghcr.io/nexus/nexusctl:0.1.0 .
# Not built on the development machines (they have no Docker engine); tests/tests/kube.rs
# checks that these targets, paths and entrypoints match what the manifests and the
# injector use, and the static launcher build below is the one docs/deployment.md gives.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p nexus-sidecar -p nexus-gateway -p nexusctl
# The launcher runs inside the plugin's own image, whatever its libc: linked statically.
RUN RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked \
      -p nexus-launch --target x86_64-unknown-linux-gnu --target-dir target/static \
 && mkdir -p /out/nexus/bin /out/nexus/profiles \
 && cp target/static/x86_64-unknown-linux-gnu/release/nexus-launch /out/nexus/bin/ \
 && cp profiles/*.toml /out/nexus/profiles/

# glibc and libgcc only, no shell; uid 65532 as the manifests run it.
FROM gcr.io/distroless/cc-debian12:nonroot AS sidecar
COPY --from=build /src/target/release/nexus-sidecar /usr/local/bin/nexus-sidecar
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/nexus-sidecar"]

FROM gcr.io/distroless/cc-debian12:nonroot AS gateway
COPY --from=build /src/target/release/nexus-gateway /usr/local/bin/nexus-gateway
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/nexus-gateway"]

# The debug variant adds busybox in /busybox: the operator toolbox pod
# (deploy/base/operator.yaml) idles with /busybox/sleep until `kubectl exec`.
FROM gcr.io/distroless/cc-debian12:debug-nonroot AS nexusctl
COPY --from=build /src/target/release/nexusctl /usr/local/bin/nexusctl
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/nexusctl"]

# The injector's init container runs `cp -R /nexus/. /nexus-install/`: busybox has cp.
FROM busybox:1.36 AS launcher
COPY --from=build /out/nexus /nexus
USER 65532:65532
