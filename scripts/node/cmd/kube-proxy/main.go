// Command kube-proxy is the upstream Kubernetes service proxy
// (k8s.io/kubernetes/cmd/kube-proxy/app), built from Go modules for the
// one-node test cluster. Same imports as the upstream main package.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // JSON log format registration
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client metric registration
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric registration
	"k8s.io/kubernetes/cmd/kube-proxy/app"
)

func main() {
	os.Exit(cli.Run(app.NewProxyCommand()))
}
