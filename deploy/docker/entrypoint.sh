#!/bin/sh
# Entrypoint of the lateserve images (deploy/docker/*.Dockerfile), also run outside a container by
# tests/deploy/test_entrypoint.py. Settings come from the environment (a Kubernetes ConfigMap in deploy/k8s):
#
#   entrypoint.sh [serve]        lateserve serve, flags from LATESERVE_* below (the default command)
#   entrypoint.sh gateway        lateserve gateway --grpc-target $LATESERVE_GRPC_TARGET (the HTTP sidecar)
#   entrypoint.sh health [ARGS]  the grpc.health.v1 probe (healthcheck.py): exit 0 when SERVING
#   entrypoint.sh CMD ...        anything else runs as given
#
#   LATESERVE_MODEL                   a local directory (a mounted volume, e.g. /models/my-colbert) or a Hub id;
#                                     empty: the bundled all-MiniLM-L6-v2. Hub downloads go to HF_HOME (mount a
#                                     cache volume there); with HF_HUB_OFFLINE=1 only that cache is read.
#   LATESERVE_GRPC_PORT (50051)       LATESERVE_HTTP_PORT (8000)        LATESERVE_HOST (0.0.0.0)
#   LATESERVE_GATEWAY (1)             0: --no-gateway (gRPC only; run `entrypoint.sh gateway` beside it)
#   LATESERVE_METRICS_PORT (9400)     --metrics-port: Prometheus /metrics of the serving process (its lateserve_*
#                                     series, with or without the gateway); 0 disables
#   LATESERVE_METRICS_HOST            with LATESERVE_GATEWAY=0 only: the metrics bind address, passed as --host
#                                     (LATESERVE_HOST); with the gateway, metrics share HTTP's LATESERVE_HOST
#   LATESERVE_SHUTDOWN_GRACE_SECONDS  --shutdown-grace-seconds (default 30: keep terminationGracePeriodSeconds above)
#   LATESERVE_DEVICE, LATESERVE_DTYPE, LATESERVE_WORKERS, LATESERVE_DOC_CACHE_MB, LATESERVE_MAX_MODEL_LEN,
#   LATESERVE_SERVED_MODEL_NAME       the flags of the same name, when set
#   LATESERVE_EXTRA_ARGS              more `lateserve serve` flags, split on spaces
#   LATESERVE_GRPC_TARGET             the gateway's backend (127.0.0.1:$LATESERVE_GRPC_PORT)
#   LATESERVE_PYTHON (python)         the interpreter that has lateserve installed
#   LATESERVE_DRY_RUN                 1: print the command (one argument per line) instead of running it
set -eu

here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
python=${LATESERVE_PYTHON:-python}
grpc_port=${LATESERVE_GRPC_PORT:-50051}
http_port=${LATESERVE_HTTP_PORT:-8000}
host=${LATESERVE_HOST:-0.0.0.0}

die() {
    echo "entrypoint: $*" >&2
    exit 64
}

is_uint() {
    case $1 in
        '' | *[!0-9]*) return 1 ;;
        *) return 0 ;;
    esac
}

run() {
    if [ "${LATESERVE_DRY_RUN:-0}" = 1 ]; then
        printf '%s\n' "$@"
        exit 0
    fi
    exec "$@"
}

check_model() {
    model=$1
    case $model in
        '') return 0 ;;
        /* | ./* | ../*)
            [ -d "$model" ] || die "LATESERVE_MODEL=$model: no such directory (mount the model there)"
            [ -f "$model/config.json" ] || die "LATESERVE_MODEL=$model: no config.json in it (not a checkpoint directory)"
            ;;
        *)
            # A Hub id: downloaded into HF_HOME on first start, read from there afterwards.
            if [ "${HF_HUB_OFFLINE:-0}" = 1 ] && [ -n "${HF_HOME:-}" ] && [ ! -d "$HF_HOME/hub" ]; then
                die "LATESERVE_MODEL=$model is a Hub id, HF_HUB_OFFLINE=1 and HF_HOME=$HF_HOME holds no hub cache"
            fi
            ;;
    esac
}

case ${1:-serve} in
    -*) command=serve ;; # `docker run IMAGE --workers 2`: flags for lateserve serve
    *)
        command=${1:-serve}
        [ $# -gt 0 ] && shift
        ;;
esac

for port in "$grpc_port" "$http_port" "${LATESERVE_METRICS_PORT:-9400}"; do
    is_uint "$port" || die "ports must be numbers, got '$port'"
done

case $command in
    serve)
        model=${LATESERVE_MODEL:-}
        check_model "$model"
        grace=${LATESERVE_SHUTDOWN_GRACE_SECONDS:-30}
        set -- "$@" --grpc-host "$host" --grpc-port "$grpc_port" --shutdown-grace-seconds "$grace"
        # --metrics-port binds to --host, which --no-gateway leaves to the metrics alone.
        case ${LATESERVE_GATEWAY:-1} in
            0 | false | no) set -- "$@" --no-gateway --host "${LATESERVE_METRICS_HOST:-$host}" ;;
            *)
                if [ -n "${LATESERVE_METRICS_HOST:-}" ] && [ "$LATESERVE_METRICS_HOST" != "$host" ]; then
                    die "LATESERVE_METRICS_HOST needs LATESERVE_GATEWAY=0 (with the gateway, metrics bind to LATESERVE_HOST)"
                fi
                set -- "$@" --host "$host" --port "$http_port"
                ;;
        esac
        set -- "$@" --metrics-port "${LATESERVE_METRICS_PORT:-9400}"
        [ -n "${LATESERVE_DEVICE:-}" ] && set -- "$@" --device "$LATESERVE_DEVICE"
        [ -n "${LATESERVE_DTYPE:-}" ] && set -- "$@" --dtype "$LATESERVE_DTYPE"
        [ -n "${LATESERVE_WORKERS:-}" ] && set -- "$@" --workers "$LATESERVE_WORKERS"
        [ -n "${LATESERVE_DOC_CACHE_MB:-}" ] && set -- "$@" --doc-cache-mb "$LATESERVE_DOC_CACHE_MB"
        [ -n "${LATESERVE_MAX_MODEL_LEN:-}" ] && set -- "$@" --max-model-len "$LATESERVE_MAX_MODEL_LEN"
        [ -n "${LATESERVE_SERVED_MODEL_NAME:-}" ] && set -- "$@" --served-model-name "$LATESERVE_SERVED_MODEL_NAME"
        # shellcheck disable=SC2086 # LATESERVE_EXTRA_ARGS is a list of flags, split on purpose
        set -- "$@" ${LATESERVE_EXTRA_ARGS:-}
        if [ -n "$model" ]; then
            set -- "$model" "$@"
        fi
        run "$python" -m lateserve.server serve "$@"
        ;;
    gateway)
        target=${LATESERVE_GRPC_TARGET:-127.0.0.1:$grpc_port}
        run "$python" -m lateserve.server gateway --grpc-target "$target" --host "$host" --port "$http_port" "$@"
        ;;
    health)
        run "$python" "$here/healthcheck.py" --target "127.0.0.1:$grpc_port" "$@"
        ;;
    *)
        run "$command" "$@"
        ;;
esac
