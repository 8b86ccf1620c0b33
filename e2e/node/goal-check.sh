#!/usr/bin/env bash
# Step 6: node Ready, a pause Pod and a python3 http.server Pod Running+Ready, a ClusterIP Service answering
# through kube-proxy's iptables rules from the host and from another pod. Only this machine's addresses.
set -euo pipefail
S="$(cd "$(dirname "$0")" && pwd)"   # this folder: static inputs
REPO="$(cd "$S/../.." && pwd)"
D="${FLOTILLA_NODE_DIR:-$HOME/.cache/flotilla/node}"   # state: images, logs, etcd, kubelet root
K="$HOME/.cache/flotilla/controlplane/v1.32.0/bin/kubectl --kubeconfig $D/run/admin.kubeconfig"
t() { echo "[$(( $(date +%s%N) / 1000000 - T0 ))ms] $*"; }
T0=$(( $(date +%s%N) / 1000000 ))
until $K get node flotilla-node > /dev/null 2>&1; do sleep 0.5; done; t "node registered"
$K wait --for=condition=Ready node/flotilla-node --timeout=120s; t "node Ready"
$K get nodes -o wide
$K apply -f "$S/pause-pod.yaml" -f "$S/web.yaml"
$K wait --for=condition=Ready pod/pause pod/web --timeout=120s; t "pause + web pods Ready"
CIP=$($K get svc web -o jsonpath='{.spec.clusterIP}')
for _ in $(seq 60); do  # endpoints -> kube-proxy sync
  iptables -t nat -S KUBE-SERVICES 2>/dev/null | grep -q "$CIP/32" && break; sleep 0.5
done; t "kube-proxy rule for $CIP present"
curl -sf -m 5 "http://$CIP/"; t "host -> ClusterIP $CIP:80 ok"
$K exec web -- python3 -c "import urllib.request as u; print(u.urlopen('http://$CIP/', timeout=5).read().decode().strip())"
t "kubectl exec web -> ClusterIP (hairpin) ok"
$K delete pod client --ignore-not-found --wait=true > /dev/null
$K run client --image=docker.io/local/pyhttp:1 --image-pull-policy=Never --restart=Never -- \
  python3 -c "import urllib.request as u; print(u.urlopen('http://$CIP/', timeout=5).read().decode().strip())"
$K wait --for=jsonpath='{.status.phase}'=Succeeded pod/client --timeout=60s; t "client pod -> ClusterIP ok"
$K logs client
$K get pods,svc,endpointslices -o wide
