#!/usr/bin/env bash
# Runs the real-MongoDB suite: starts the one-node replica set of docker-compose.yml,
# waits until it is primary, runs the conformance suite and the MongoDB-specific tests
# with INTRACOM_TEST_MONGODB_URI set, and takes the server down again.
#
#   scripts/test-mongodb.sh            # start, test, stop
#   KEEP=1 scripts/test-mongodb.sh     # leave the server running afterwards
#   INTRACOM_TEST_MONGODB_URI=mongodb://host:27017/?replicaSet=rs0 scripts/test-mongodb.sh
#                                      # use a server you already have (no docker)
#
# The TTL cases wait for MongoDB's TTL monitor (about every 60 s): a run takes a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${INTRACOM_TEST_MONGODB_URI:-}" ]; then
  if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
  elif command -v docker-compose >/dev/null 2>&1; then
    compose=(docker-compose)
  else
    echo "error: needs docker compose (or set INTRACOM_TEST_MONGODB_URI to an existing replica set)" >&2
    exit 2
  fi
  echo "== starting MongoDB (replica set rs0) with ${compose[*]}"
  if [ -z "${KEEP:-}" ]; then
    trap '"${compose[@]}" down -v >/dev/null 2>&1 || true' EXIT
  fi
  "${compose[@]}" up -d --wait mongodb
  export INTRACOM_TEST_MONGODB_URI="mongodb://localhost:27017/?directConnection=true"
fi

echo "== running the MongoDB suite against ${INTRACOM_TEST_MONGODB_URI}"
scripts/test --test mongodb "$@"
