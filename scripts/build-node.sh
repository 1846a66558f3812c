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
self="${BASH_SOURCE[0]}"
name=build-node
src="${here}/node"
cache_root="${XSTILTS_K8S_CACHE:-${HOME}/.cache/xstilts}/node"
binaries=(kubelet kube-proxy pause coredns)
# shellcheck source=lib/cached-go-build.sh
source "${here}/lib/cached-go-build.sh"
cached_build_begin "$@"

k8s_version="$(mod_version "${src}" k8s.io/kubernetes)"
coredns_version="$(mod_version "${src}/coredns" github.com/coredns/coredns)"
log "kubernetes ${k8s_version}, coredns ${coredns_version}; go build -p ${jobs}"

log "building kubelet, kube-proxy, pause ..."
(cd "${src}" && go build "${build_flags[@]}" -ldflags="$(k8s_ldflags "${k8s_version}")" -o "${tmp}/" ./cmd/...)

log "building coredns ..."
(cd "${src}/coredns" && go build "${build_flags[@]}" \
   -ldflags="-s -w -X github.com/coredns/coredns/coremain.GitCommit=${coredns_version}" \
   -o "${tmp}/coredns" .)

cat > "${tmp}/VERSIONS" <<EOV
kubernetes ${k8s_version}
coredns ${coredns_version}
$(go env GOVERSION) $(go env GOOS)/$(go env GOARCH)
EOV
cached_build_finish
