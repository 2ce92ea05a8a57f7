# Local stand-ins for the third-party images of docker-compose.yml, built from Debian packages on the base image
# of ops/docker/make-base-image.sh, for machines that cannot pull (the tests). Each target mimics how its official
# image is run: the compose file gives the same command to either.
#   docker build -f ops/docker/standins.Dockerfile --target redis      -t synapse-standin-redis .
#   docker build -f ops/docker/standins.Dockerfile --target prometheus -t synapse-standin-prometheus .
#   docker build -f ops/docker/standins.Dockerfile --target haproxy    -t synapse-standin-haproxy .

ARG BASE_IMAGE=synapse-base:bookworm

# redis:7: `redis-server` on the PATH, data in /data.
FROM ${BASE_IMAGE} AS redis
RUN apt-get update -qq && apt-get install -y -qq redis-server >/dev/null && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
CMD ["redis-server"]

# prom/prometheus: the binary is the entrypoint (the command is its flags), user nobody, data in /prometheus.
FROM ${BASE_IMAGE} AS prometheus
RUN apt-get update -qq && apt-get install -y -qq prometheus >/dev/null && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus && chown nobody:nogroup /prometheus
WORKDIR /prometheus
USER nobody
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]

# haproxy:2.8: `haproxy` on the PATH, run as user haproxy, config in /usr/local/etc/haproxy.
FROM ${BASE_IMAGE} AS haproxy
RUN apt-get update -qq && apt-get install -y -qq haproxy >/dev/null && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /usr/local/etc/haproxy
USER haproxy
STOPSIGNAL SIGUSR1
CMD ["haproxy", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
