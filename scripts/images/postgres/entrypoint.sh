#!/bin/sh
# First start: initdb with POSTGRES_USER / POSTGRES_PASSWORD, create POSTGRES_DB.
# Then run the server on all addresses, password (scram) authentication from the network.
set -eu
: "${PGDATA:=/var/lib/postgresql/data}"
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=${POSTGRES_USER}}"
sockets=/var/run/postgresql
if [ ! -s "${PGDATA}/PG_VERSION" ]; then
  : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required}"
  mkdir -p "${PGDATA}"
  chmod 700 "${PGDATA}"
  pwfile="$(mktemp)"
  printf '%s' "${POSTGRES_PASSWORD}" > "${pwfile}"
  initdb --pgdata="${PGDATA}" --username="${POSTGRES_USER}" --pwfile="${pwfile}" \
    --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  rm -f "${pwfile}"
  echo "host all all 0.0.0.0/0 scram-sha-256" >> "${PGDATA}/pg_hba.conf"
  pg_ctl --pgdata="${PGDATA}" --options="-c listen_addresses='' -k ${sockets}" --wait start >/dev/null
  if [ "${POSTGRES_DB}" != postgres ]; then
    createdb --host="${sockets}" --username="${POSTGRES_USER}" "${POSTGRES_DB}"
  fi
  pg_ctl --pgdata="${PGDATA}" --mode=fast --wait stop >/dev/null
fi
exec postgres -D "${PGDATA}" -c listen_addresses='*' -k "${sockets}"
