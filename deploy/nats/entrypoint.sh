#!/bin/sh
# Entrypoint of the compose `nats` service (nats:*-alpine image): export the NATS
# users' passwords from the compose secret files for nats.conf, then run nats-server
# with the given arguments.
set -eu

export_secret() {  # VARIABLE FILE
    if [ ! -s "$2" ]; then
        echo "nats: secret $2 is missing or empty: run deploy/gen-secrets.sh" >&2
        exit 1
    fi
    value=$(cat "$2")
    export "$1=$value"
}

export_secret NEXUS_NATS_ORCHESTRATOR_PASSWORD /run/secrets/nats_orchestrator_password
export_secret NEXUS_NATS_PROVIDER_PASSWORD /run/secrets/nats_provider_password
export_secret NEXUS_NATS_NODE_PASSWORD /run/secrets/nats_node_password
exec nats-server "$@"
