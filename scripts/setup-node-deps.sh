#!/usr/bin/env bash
# Install the Debian packages the one-node test cluster and the image builds need,
# when they are missing (Debian 12 / bookworm; needs root or sudo):
#
#   containerd, runc, containernetworking-plugins   the container runtime and CNI plugins
#   iptables, nftables, conntrack, iproute2, ethtool what the kubelet and kube-proxy call
#   socat                                            kubectl port-forward
#   buildah                                          images from the Dockerfile, no Docker engine
#   debootstrap                                      the offline CPU test base image
#   chromium                                         the headless browser test of `xstilts ui`
#
# Nothing is installed when every command is already there. Prints what it installs.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have containerd || need+=(containerd)
have runc || need+=(runc)
[[ -x /usr/lib/cni/bridge || -x /opt/cni/bin/bridge ]] || need+=(containernetworking-plugins)
have iptables || need+=(iptables)
have nft || need+=(nftables)
have conntrack || need+=(conntrack)
have ip || need+=(iproute2)
have ethtool || need+=(ethtool)
have buildah || need+=(buildah)
have debootstrap || need+=(debootstrap)
have socat || need+=(socat)
have chromium || need+=(chromium)

if ((${#need[@]} == 0)); then
  exit 0
fi
echo "[setup-node-deps] installing: ${need[*]}" >&2
sudo=()
if [[ "$(id -u)" != 0 ]]; then
  have sudo || { echo "need root (or sudo) to install: ${need[*]}" >&2; exit 1; }
  sudo=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
