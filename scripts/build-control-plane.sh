#!/usr/bin/env bash
# Build a real Kubernetes control plane from Go modules, for the tests.
#
#   etcd                     go.etcd.io/etcd/server/v3/etcdmain
#   kube-apiserver           k8s.io/kubernetes/cmd/kube-apiserver/app
#   kube-controller-manager  k8s.io/kubernetes/cmd/kube-controller-manager/app
#   kube-scheduler           k8s.io/kubernetes/cmd/kube-scheduler/app
#   kwok                     sigs.k8s.io/kwok/cmd/kwok (fake nodes; own module)
#
# The versions are pinned by scripts/control-plane/go.mod and
# scripts/control-plane/kwok/go.mod (+ go.sum). The binaries are cached outside
# the repository in
#
#   ${XSTILTS_K8S_CACHE:-$HOME/.cache/xstilts/control-plane}/<versions-hash>/bin/
#
# where <versions-hash> covers the module files, the main packages, the Go
# toolchain and the build flags. When the binaries are already there the script
# does nothing. The last line it prints (stdout) is always the bin directory;
# progress goes to stderr.
#
# Cold build on 2 CPU cores: about 9.5 minutes (module download ~15 s, then
# ~9 min compile and link), peak ~2.7 GB RSS; ~390 MB of binaries, and ~4 GB
# in the Go build cache.
#
# Options (environment):
#   XSTILTS_K8S_CACHE   cache root (default ~/.cache/xstilts/control-plane)
#   XSTILTS_K8S_JOBS    parallel compile jobs, go build -p (default: CPU count,
#                       at most one per 2 GiB of available memory)
#   --print-dir         (argument) print the bin directory without building
#   --check             (argument) exit 0 if built, 1 if not; prints the bin directory
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
self="${BASH_SOURCE[0]}"
name=build-control-plane
src="${here}/control-plane"
cache_root="${XSTILTS_K8S_CACHE:-${HOME}/.cache/xstilts/control-plane}"
binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)
# shellcheck source=lib/cached-go-build.sh
source "${here}/lib/cached-go-build.sh"
cached_build_begin "$@"

k8s_version="$(mod_version "${src}" k8s.io/kubernetes)"
etcd_version="$(mod_version "${src}" go.etcd.io/etcd/server/v3)"
kwok_version="$(mod_version "${src}/kwok" sigs.k8s.io/kwok)"
log "kubernetes ${k8s_version}, etcd ${etcd_version}, kwok ${kwok_version}; go build -p ${jobs}"

log "building etcd, kube-apiserver, kube-controller-manager, kube-scheduler ..."
(cd "${src}" && go build "${build_flags[@]}" -ldflags="$(k8s_ldflags "${k8s_version}")" -o "${tmp}/" ./cmd/...)

log "building kwok ..."
kv="${kwok_version#v}"
(cd "${src}/kwok" && go build "${build_flags[@]}" \
   -ldflags="-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${kv}" \
   -o "${tmp}/kwok" sigs.k8s.io/kwok/cmd/kwok)

cat > "${tmp}/VERSIONS" <<EOV
kubernetes ${k8s_version}
etcd ${etcd_version}
kwok ${kwok_version}
$(go env GOVERSION) $(go env GOOS)/$(go env GOARCH)
EOV
cached_build_finish
