# The balancer for docker/compose.local.yaml, where nginx:1.27-alpine cannot be pulled:
# Debian's nginx (1.22) on the base image the other services use, with wget for
# compose.yaml's health check. compose.yaml mounts docker/nginx.conf over its own.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
LABEL org.worldplan.image=lb

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx wget \
    && rm -rf /var/lib/apt/lists/*

EXPOSE 8000
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
