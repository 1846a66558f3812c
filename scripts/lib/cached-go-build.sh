# Shared by scripts/build-control-plane.sh and scripts/build-node.sh (sourced, not run):
# argument handling, build flags, the content-hash cache key, locking and the final
# move into the cache. The caller sets, before sourcing:
#
#   self       the calling script's path (its header comment is its --help)
#   name       the prefix of its log lines
#   src        the Go module folder whose files make the cache key
#   cache_root the folder that holds one <versions-hash>/bin per build
#   binaries   the names the build must produce
#
# and then calls `cached_build_begin "$@"`. That exits early (printing the bin folder)
# for --print-dir, --check, or when the binaries are already cached; otherwise it holds
# the build lock and leaves ${tmp} (an empty folder to build into), ${build_flags[@]},
# ${jobs} and ${bin} set. The caller builds into ${tmp}, writes ${tmp}/VERSIONS, and
# calls `cached_build_finish`.

log() { printf '[%s] %s\n' "${name}" "$*" >&2; }

# Parallel compile jobs: the CPU count, at most one per 2 GiB of available memory
# (linking kube-apiserver takes about 2 GiB).
default_jobs() {
  local n mem_kb by_mem
  n="$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)"
  mem_kb="$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo 2>/dev/null || true)"
  if [[ -n "${mem_kb}" ]]; then
    by_mem=$(( mem_kb / (2 * 1024 * 1024) ))
    (( by_mem < 1 )) && by_mem=1
    (( n > by_mem )) && n=${by_mem}
  fi
  echo "${n}"
}

mod_version() { # module path -> version from the build list of the module in $1
  (cd "$1" && go list -m -f '{{if .Replace}}{{.Replace.Version}}{{else}}{{.Version}}{{end}}' "$2")
}

# -ldflags stamping a Kubernetes binary with its version ($1), as the release build does.
k8s_ldflags() {
  local version="$1" minor p flags="-s -w"
  minor="$(echo "${version}" | sed -E 's/^v[0-9]+\.([0-9]+).*/\1/')"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X ${p}.gitVersion=${version} -X ${p}.gitMajor=1 -X ${p}.gitMinor=${minor}"
    flags+=" -X ${p}.gitTreeState=clean"
  done
  echo "${flags}"
}

have_all() {
  local b
  for b in "${binaries[@]}"; do [[ -x "${bin}/${b}" ]] || return 1; done
}

cached_build_begin() {
  local mode=build
  case "${1:-}" in
    "") ;;
    --print-dir) mode=print ;;
    --check) mode=check ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${self}"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac

  command -v go >/dev/null || { echo "go is required (https://go.dev/dl/)" >&2; exit 1; }

  # Build flags. Kept in one place: they are part of the cache key.
  export CGO_ENABLED=0
  export GOFLAGS="-mod=readonly"
  jobs="${XSTILTS_K8S_JOBS:-$(default_jobs)}"
  build_flags=(-trimpath -p "${jobs}")

  # Bump build_format when changing how the binaries are built (the flags above), so that
  # caches made the old way are not reused.
  local build_format=1 hash dest
  hash="$( {
    go env GOVERSION GOOS GOARCH
    echo "CGO_ENABLED=${CGO_ENABLED} -trimpath -ldflags=-s -w +version-stamps format=${build_format}"
    (cd "${src}" && find . -name go.mod -o -name go.sum -o -name '*.go' | LC_ALL=C sort \
       | while read -r f; do echo "${f}"; cat "${f}"; done)
  } | sha256sum | cut -c1-16)"
  dest="${cache_root}/${hash}"
  bin="${dest}/bin"

  case "${mode}" in
    print) echo "${bin}"; exit 0 ;;
    check) echo "${bin}"; have_all; exit $? ;;
  esac
  if have_all; then
    log "already built"
    echo "${bin}"
    exit 0
  fi

  mkdir -p "${dest}"
  # One build at a time per cache key (parallel test runs may race here).
  exec 9>"${dest}/.lock"
  if command -v flock >/dev/null; then
    flock 9
  fi
  if have_all; then
    log "already built (by a concurrent run)"
    echo "${bin}"
    exit 0
  fi

  tmp="${dest}/bin.tmp.$$"
  rm -rf "${tmp}"
  mkdir -p "${tmp}"
  trap 'rm -rf "${tmp}"' EXIT
  build_start=$(date +%s)
  log "output: ${bin}"
}

cached_build_finish() {
  local b
  for b in "${binaries[@]}"; do
    [[ -x "${tmp}/${b}" ]] || { log "missing ${b} after build"; exit 1; }
  done
  rm -rf "${bin}"
  mv "${tmp}" "${bin}"
  trap - EXIT
  log "built in $(( $(date +%s) - build_start ))s"
  echo "${bin}"
}
