#!/usr/bin/env bash
# Build the images the one-node test cluster runs, from the project's own Dockerfile,
# with buildah (Debian package; no Docker engine, no registry):
#
#   localhost/xstilts/trainer:e2e      Dockerfile, target trainer, TRAINER_FLAVOR=cpu
#   localhost/xstilts/controller:e2e   Dockerfile, target controller
#   localhost/xstilts/mlflow:e2e       Dockerfile, target mlflow
#   localhost/xstilts/postgres:e2e     scripts/images/postgres (Debian's postgresql-15)
#
# Every image stands on a CPU base made offline: a Debian bookworm root filesystem from
# debootstrap with Python 3.11 (and pip, venv, libgomp), imported into buildah as
# localhost/xstilts/python-base; the Dockerfile's PYTHON_BASE argument selects it. Python
# packages come from PyPI (torch from PyPI is its CUDA build: the trainer image carries
# the nvidia-* wheels, several GB, though it runs on CPU). What is not built here: the
# production trainer on nvidia/cuda (no registry to pull it from) and the python:slim
# based production images; those are the Dockerfile's defaults.
#
# Caching, outside the repository, under ${XSTILTS_K8S_CACHE:-$HOME/.cache/xstilts}/images:
#   base-<hash>.tar            the root filesystem (hash: suite, packages, this script)
#   storage/                   buildah's store (overlay); --layers keeps the torch layer
#   archives/<name>-<hash>.tar an OCI archive per image; <hash> covers what the image is
#                              built from (Dockerfile, base, and for trainer and
#                              controller the build context the .dockerignore lets in)
#   sets/<hash>/images.json    name -> {ref, archive}: what tests/e2e imports into
#                              containerd (the harness skips images already there)
# The last line printed (stdout) is the directory holding images.json.
#
# Options: --print-dir (print that directory, build nothing), --check (exit 0 when built),
#          --only NAME[,NAME] (build only those images; images.json lists what is built).
# Needs root (buildah, debootstrap); scripts/setup-node-deps.sh installs the packages.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "${here}/.." && pwd)"
cache="${XSTILTS_K8S_CACHE:-${HOME}/.cache/xstilts}/images"
names=(trainer controller mlflow postgres)
suite=bookworm
mirror="${XSTILTS_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
base_packages=python3,python3-pip,python3-venv,ca-certificates,libgomp1
tag=e2e

mode=build
only=""
while (($#)); do
  case "$1" in
    --print-dir) mode=print ;;
    --check) mode=check ;;
    --only) only="$2"; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
if [[ -n "${only}" ]]; then
  IFS=, read -r -a names <<< "${only}"
fi

log() { printf '[build-images] %s\n' "$*" >&2; }
sha() { sha256sum | cut -c1-16; }

# ---- cache keys --------------------------------------------------------------
base_hash="$( { echo "${suite} ${base_packages} format=1"; sed -n '/^# ---- base/,/^# ---- end base/p' "${BASH_SOURCE[0]}"; } | sha)"
base_ref="localhost/xstilts/python-base:${suite}-${base_hash}"
context_hash() { # the files the .dockerignore lets into the build context
  (cd "${repo}" && git ls-files -co --exclude-standard -- pyproject.toml README.md xstilts trainer operator demo \
     | grep -vE '(__pycache__|\.pyc$)' | LC_ALL=C sort | while read -r f; do [[ -f "$f" ]] && { echo "$f"; cat "$f"; }; done) | sha
}
image_hash() {
  local name="$1"
  {
    echo "${name} ${base_hash} format=1"
    case "${name}" in
      postgres) cat "${here}/images/postgres/"* ;;
      *) cat "${repo}/Dockerfile" "${repo}/.dockerignore" ;;
    esac
    case "${name}" in trainer|controller) context_hash ;; esac
  } | sha
}
declare -A hashes
set_key=""
for n in "${names[@]}"; do
  hashes[$n]="$(image_hash "$n")"
  set_key+="${n}=${hashes[$n]} "
done
set_dir="${cache}/sets/$(echo "${set_key}" | sha)"

archive_of() { echo "${cache}/archives/$1-${hashes[$1]}.tar"; }
have_all() {
  local n
  [[ -f "${set_dir}/images.json" ]] || return 1
  for n in "${names[@]}"; do [[ -f "$(archive_of "$n")" ]] || return 1; done
}

case "${mode}" in
  print) echo "${set_dir}"; exit 0 ;;
  check) echo "${set_dir}"; have_all; exit $? ;;
esac

if have_all; then
  log "already built"
  echo "${set_dir}"
  exit 0
fi

for tool in buildah debootstrap; do
  command -v "${tool}" >/dev/null || { log "${tool} is missing: run scripts/setup-node-deps.sh"; exit 1; }
done
[[ "$(id -u)" == 0 ]] || { log "needs root (buildah, debootstrap)"; exit 1; }

mkdir -p "${cache}/archives" "${cache}/storage" "${set_dir}"
exec 9>"${cache}/.lock"
command -v flock >/dev/null && flock 9

bh=(buildah --root "${cache}/storage" --runroot /run/xstilts-buildah --storage-driver overlay)
start_all=$(date +%s)

# ---- base: Debian bookworm with Python 3.11, made offline from Debian packages ----------
base_tar="${cache}/base-${base_hash}.tar"
if [[ ! -f "${base_tar}" ]]; then
  t0=$(date +%s)
  root="${cache}/rootfs.tmp.$$"
  rm -rf "${root}"
  trap 'rm -rf "${root}"' EXIT
  log "debootstrap ${suite} (${base_packages}) ..."
  debootstrap --variant=minbase --include="${base_packages}" "${suite}" "${root}" "${mirror}" >&2
  # Like the python image: `python` and `pip` on PATH, pip installs into the system.
  rm -f "${root}"/usr/lib/python3*/EXTERNALLY-MANAGED
  ln -sf python3 "${root}/usr/bin/python"
  [[ -e "${root}/usr/bin/pip" ]] || ln -sf pip3 "${root}/usr/bin/pip"
  rm -rf "${root}"/var/cache/apt/archives/*.deb "${root}"/var/lib/apt/lists/*
  tar -C "${root}" --numeric-owner -cf "${base_tar}.tmp" .
  mv "${base_tar}.tmp" "${base_tar}"
  rm -rf "${root}"
  trap - EXIT
  log "base root filesystem in $(( $(date +%s) - t0 ))s"
fi
# ---- end base
if ! "${bh[@]}" inspect --type image "${base_ref}" >/dev/null 2>&1; then
  ctr_id="$("${bh[@]}" from scratch)"
  "${bh[@]}" add "${ctr_id}" "${base_tar}" / >/dev/null
  "${bh[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python3 "${ctr_id}"
  "${bh[@]}" commit -q "${ctr_id}" "${base_ref}" >/dev/null
  "${bh[@]}" rm "${ctr_id}" >/dev/null
fi

common=(build --isolation chroot --network host --layers --pull-never)
# RUN steps trust what this machine trusts (a TLS-inspecting proxy's CA, say), without the
# bundle entering an image: it is mounted for the build only.
host_ca=/etc/ssl/certs/ca-certificates.crt
if [[ -f "${host_ca}" ]]; then
  common+=(--volume "${host_ca}:${host_ca}:ro")
fi
for n in "${names[@]}"; do
  archive="$(archive_of "$n")"
  ref="localhost/xstilts/${n}:${tag}"
  if [[ ! -f "${archive}" ]]; then
    t0=$(date +%s)
    log "building ${ref} ..."
    case "${n}" in
      postgres)
        "${bh[@]}" "${common[@]}" --build-arg BASE="${base_ref}" -t "${ref}" "${here}/images/postgres" >&2 ;;
      trainer|controller)
        # buildah 1.28 cannot bind-mount from a stage that came entirely from its layer
        # cache (RUN --mount=...,from=wheel finds nothing): drop the cached wheel, so that
        # the target's build makes it again (a few seconds).
        "${bh[@]}" "${common[@]}" --quiet --build-arg PYTHON_BASE="${base_ref}" --target wheel \
          -t localhost/xstilts/wheel:cache -f "${repo}/Dockerfile" "${repo}" >/dev/null
        "${bh[@]}" rmi -f localhost/xstilts/wheel:cache >/dev/null
        "${bh[@]}" "${common[@]}" --build-arg PYTHON_BASE="${base_ref}" --build-arg TRAINER_FLAVOR=cpu \
          --build-arg SOURCE_DIGEST="$(context_hash)" \
          --target "${n}" -t "${ref}" -f "${repo}/Dockerfile" "${repo}" >&2 ;;
      *)
        "${bh[@]}" "${common[@]}" --build-arg PYTHON_BASE="${base_ref}" --build-arg TRAINER_FLAVOR=cpu \
          --target "${n}" -t "${ref}" -f "${repo}/Dockerfile" "${repo}" >&2 ;;
    esac
    rm -f "${cache}/archives/${n}-"*.tar  # one archive per image: the newest
    "${bh[@]}" push --quiet --disable-compression "${ref}" "oci-archive:${archive}.tmp:${ref}" >&2
    mv "${archive}.tmp" "${archive}"
    log "${n}: $(( $(date +%s) - t0 ))s, $(du -h "${archive}" | cut -f1)"
  fi
done

{
  echo "{"
  sep=""
  for n in "${names[@]}"; do
    printf '%s  "%s": {"ref": "localhost/xstilts/%s:%s", "archive": "%s"}' "${sep}" "$n" "$n" "${tag}" "$(archive_of "$n")"
    sep=$',\n'
  done
  printf '\n}\n'
} > "${set_dir}/images.json"
log "images ready in $(( $(date +%s) - start_all ))s"
echo "${set_dir}"
