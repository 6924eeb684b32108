# Redis for docker/compose.local.yaml, where redis:7-alpine cannot be pulled: Debian's
# redis-server (7.0) on the base image the other services use. It runs compose.yaml's
# command, as the official image does.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
LABEL org.worldplan.image=redis

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/*

# The sessions' append-only file, on the volume compose mounts here, written by redis
RUN mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379

# Like the official image: with no configuration file, Redis's protected mode would refuse
# the replicas (they are not on loopback), so it is turned off for `redis-server ...`.
ENTRYPOINT ["sh", "-c", "if [ \"$1\" = redis-server ]; then shift; set -- redis-server --protected-mode no \"$@\"; fi; exec \"$@\"", "entrypoint"]
CMD ["redis-server"]
