#!/usr/bin/env bash
# Build the node side of the one-node test cluster from Go modules:
#
#   kubelet      k8s.io/kubernetes/cmd/kubelet/app      (same versions as the control plane)
#   kube-proxy   k8s.io/kubernetes/cmd/kube-proxy/app
#   pause        the pod sandbox process (scripts/node/cmd/pause; a static binary)
#   coredns      github.com/coredns/coredns with the cluster-DNS plugins (own module)
#
# The versions are pinned by scripts/node/go.mod and scripts/node/coredns/go.mod
# (+ go.sum). scripts/node/go.mod keeps every module the control plane shares at the
# control plane's version (scripts/control-plane/go.mod), so a warm Go build cache
# from scripts/build-control-plane.sh is reused. The kubelet is pinned at the API
# server's version: kubelet 1.38 needs containerd 2.x, which Debian 12 does not ship.
#
# The binaries are cached outside the repository in
#
#   ${XSTILTS_K8S_CACHE:-$HOME/.cache/xstilts}/node/<versions-hash>/bin/
#
# where <versions-hash> covers the module files, the main packages, the Go toolchain
# and the build flags. When the binaries are already there the script does nothing.
# The last line it prints (stdout) is always the bin directory; progress goes to stderr.
#
# The runtime parts (containerd, runc, CNI plugins, iptables, ...) are Debian packages:
# scripts/setup-node-deps.sh installs the missing ones.
#
# Options (environment):
#   XSTILTS_K8S_CACHE   cache root (default ~/.cache/xstilts; the node goes in node/)
#   XSTILTS_K8S_JOBS    parallel compile jobs, go build -p (default as for the control plane)
#   --print-dir         (argument) print the bin directory without building
#   --check             (argument) exit 0 if built, 1 if not; prints the bin directory
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="${here}/node"
cache_root="${XSTILTS_K8S_CACHE:-${HOME}/.cache/xstilts}/node"
binaries=(kubelet kube-proxy pause coredns)

mode=build
case "${1:-}" in
  "") ;;
  --print-dir) mode=print ;;
  --check) mode=check ;;
  -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
  *) echo "unknown argument: $1" >&2; exit 2 ;;
esac

command -v go >/dev/null || { echo "go is required (https://go.dev/dl/)" >&2; exit 1; }

log() { printf '[build-node] %s\n' "$*" >&2; }

export CGO_ENABLED=0
export GOFLAGS="-mod=readonly"
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
jobs="${XSTILTS_K8S_JOBS:-$(default_jobs)}"
build_flags=(-trimpath -p "${jobs}")

mod_version() { # module path -> version from the build list of the module in $1
  (cd "$1" && go list -m -f '{{if .Replace}}{{.Replace.Version}}{{else}}{{.Version}}{{end}}' "$2")
}

# ---- cache key -------------------------------------------------------------
build_format=1
key_inputs() {
  go env GOVERSION GOOS GOARCH
  echo "CGO_ENABLED=${CGO_ENABLED} -trimpath -ldflags=-s -w +version-stamps format=${build_format}"
  (cd "${src}" && find . -name go.mod -o -name go.sum -o -name '*.go' | LC_ALL=C sort \
     | while read -r f; do echo "${f}"; cat "${f}"; done)
}
hash="$(key_inputs | sha256sum | cut -c1-16)"
dest="${cache_root}/${hash}"
bin="${dest}/bin"

have_all() {
  local b
  for b in "${binaries[@]}"; do [[ -x "${bin}/${b}" ]] || return 1; done
}

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
exec 9>"${dest}/.lock"
if command -v flock >/dev/null; then
  flock 9
fi
if have_all; then
  log "already built (by a concurrent run)"
  echo "${bin}"
  exit 0
fi

k8s_version="$(mod_version "${src}" k8s.io/kubernetes)"
coredns_version="$(mod_version "${src}/coredns" github.com/coredns/coredns)"
k8s_minor="$(echo "${k8s_version}" | sed -E 's/^v[0-9]+\.([0-9]+).*/\1/')"

tmp="${dest}/bin.tmp.$$"
rm -rf "${tmp}"
mkdir -p "${tmp}"
trap 'rm -rf "${tmp}"' EXIT

start=$(date +%s)
log "kubernetes ${k8s_version}, coredns ${coredns_version}; go build -p ${jobs}"
log "output: ${bin}"

vpkg=k8s.io/component-base/version
cpkg=k8s.io/client-go/pkg/version
k8s_ldflags="-s -w"
for p in "${vpkg}" "${cpkg}"; do
  k8s_ldflags+=" -X ${p}.gitVersion=${k8s_version} -X ${p}.gitMajor=1 -X ${p}.gitMinor=${k8s_minor}"
  k8s_ldflags+=" -X ${p}.gitTreeState=clean"
done

log "building kubelet, kube-proxy, pause ..."
(cd "${src}" && go build "${build_flags[@]}" -ldflags="${k8s_ldflags}" -o "${tmp}/" ./cmd/...)

log "building coredns ..."
(cd "${src}/coredns" && go build "${build_flags[@]}" \
   -ldflags="-s -w -X github.com/coredns/coredns/coremain.GitCommit=${coredns_version}" \
   -o "${tmp}/coredns" .)

for b in "${binaries[@]}"; do
  [[ -x "${tmp}/${b}" ]] || { log "missing ${b} after build"; exit 1; }
done

cat > "${tmp}/VERSIONS" <<EOV
kubernetes ${k8s_version}
coredns ${coredns_version}
$(go env GOVERSION) $(go env GOOS)/$(go env GOARCH)
EOV

rm -rf "${bin}"
mv "${tmp}" "${bin}"
trap - EXIT
log "built in $(( $(date +%s) - start ))s"
echo "${bin}"
