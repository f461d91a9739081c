// etcd for the local test control plane: the same entry point as upstream's server/main.go,
// compiled inside this module so it shares the dependency versions kube-apiserver is tested with.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
