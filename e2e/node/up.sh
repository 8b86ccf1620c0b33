#!/usr/bin/env bash
# Start a single-node Kubernetes v1.32.0 on this VM, state under $FLOTILLA_NODE_DIR (~/.cache/flotilla/node):
#   etcd + kube-apiserver + kube-controller-manager (as tests/controlplane.py starts them, PKI and kubeconfigs
#   written by its own helpers), then kube-scheduler, containerd, kubelet, kube-proxy.
# Logs in logs/<name>.log, pids in logs/<name>.pid. Stop everything with down.sh.
set -euo pipefail
S="$(cd "$(dirname "$0")" && pwd)"   # this folder: static inputs
REPO="$(cd "$S/../.." && pwd)"
D="${FLOTILLA_NODE_DIR:-$HOME/.cache/flotilla/node}"   # state: images, logs, etcd, kubelet root
W=$D/run              # PKI, tokens, kubeconfigs, component configs
L=$D/logs
V=$D/var              # etcd data, containerd root, kubelet root
CPBIN=$HOME/.cache/flotilla/controlplane/v1.32.0/bin
NBIN=$HOME/.cache/flotilla/node/bin
NODE=flotilla-node
NODE_IP=10.254.0.1     # a /32 on lo: kubelet refuses a loopback (127/8) node IP; the VM has no dummy driver
ETCD_PORT=23790 PEER_PORT=23800 API_PORT=16443
SERVICE_CIDR=10.0.0.0/24 KUBERNETES_SVC_IP=10.0.0.1   # the `kubernetes` Service takes the range's first IP
mkdir -p "$W" "$L" "$V"

spawn() {  # name binary args...: background, own session, log + pid file
  local name=$1; shift
  setsid "$@" > "$L/$name.log" 2>&1 < /dev/null &
  echo $! > "$L/$name.pid"
  echo "started $name pid $!"
}
wait_for() {  # what timeout cmd...
  local what=$1 t=$2; shift 2
  local end=$((SECONDS + t))
  until "$@" > /dev/null 2>&1; do
    (( SECONDS < end )) || { echo "TIMEOUT waiting for $what"; return 1; }
    sleep 0.5
  done
  echo "$what ok after $((SECONDS - start))s"
}
start=$SECONDS

# --- node address, sysctls ---------------------------------------------------------------------------
ip addr show dev lo | grep -q "$NODE_IP/32" || ip addr add "$NODE_IP/32" dev lo
echo 1 > /proc/sys/net/ipv4/ip_forward

# --- PKI + tokens + kubeconfigs, with tests/controlplane.py's helpers -------------------------------------
if [[ ! -f $W/ca.crt ]]; then
  (cd "$REPO" && .venv/bin/python - "$W" "$NODE_IP" "$API_PORT" "$KUBERNETES_SVC_IP" <<'EOF'
import secrets, sys
from pathlib import Path
from tests.controlplane import _write_pki, write_kubeconfig
w, node_ip, port, svc_ip = Path(sys.argv[1]), *sys.argv[2:]
_write_pki(w, extra_ips=(node_ip, svc_ip))  # pods reach the apiserver as the `kubernetes` Service's ClusterIP
server = f"https://{node_ip}:{port}"
users = {  # kubeconfig name: (user, groups)
    "admin": ("admin", "system:masters"),
    "kcm": ("system:kube-controller-manager", "system:masters"),
    "scheduler": ("system:kube-scheduler", ""),          # bound by RBAC bootstrap roles
    "kube-proxy": ("system:kube-proxy", ""),             # bound to system:node-proxier
    "kubelet": ("system:node:flotilla-node", "system:nodes"),  # Node authorizer
}
lines = []
for name, (user, groups) in users.items():
    tok = secrets.token_hex(16)
    lines.append(f'{tok},{user},{user},"{groups}"' if groups else f"{tok},{user},{user}")
    write_kubeconfig(w / f"{name}.kubeconfig", server, w / "ca.crt", user, tok)
(w / "tokens.csv").write_text("\n".join(lines) + "\n")
EOF
  )
fi

# --- control plane ---------------------------------------------------------------------------------
etcd_url=http://127.0.0.1:$ETCD_PORT
spawn etcd "$CPBIN/etcd" --name=default --data-dir="$V/etcd" \
  --listen-client-urls=$etcd_url --advertise-client-urls=$etcd_url \
  --listen-peer-urls=http://127.0.0.1:$PEER_PORT --initial-advertise-peer-urls=http://127.0.0.1:$PEER_PORT \
  --initial-cluster=default=http://127.0.0.1:$PEER_PORT --unsafe-no-fsync=true --log-level=warn
wait_for etcd 60 curl -sf $etcd_url/health

spawn kube-apiserver "$CPBIN/kube-apiserver" --etcd-servers=$etcd_url \
  --bind-address=$NODE_IP --advertise-address=$NODE_IP --secure-port=$API_PORT \
  --tls-cert-file="$W/apiserver.crt" --tls-private-key-file="$W/apiserver.key" \
  --client-ca-file="$W/ca.crt" --token-auth-file="$W/tokens.csv" \
  --service-account-key-file="$W/sa.pub" --service-account-signing-key-file="$W/sa.key" \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-cluster-ip-range=$SERVICE_CIDR --allow-privileged=true \
  --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
  --kubelet-preferred-address-types=InternalIP \
  --cert-dir="$W/certs" --v=1
wait_for kube-apiserver 90 "$CPBIN/kubectl" --kubeconfig "$W/admin.kubeconfig" get --raw /readyz

# all default controllers (the suite runs only four): node lifecycle, endpointslice, serviceaccount, ...
spawn kube-controller-manager "$CPBIN/kube-controller-manager" --kubeconfig="$W/kcm.kubeconfig" \
  --leader-elect=false --secure-port=0 --root-ca-file="$W/ca.crt" \
  --service-account-private-key-file="$W/sa.key" --v=1

spawn kube-scheduler "$NBIN/kube-scheduler" --kubeconfig="$W/scheduler.kubeconfig" \
  --authentication-kubeconfig="$W/scheduler.kubeconfig" --authorization-kubeconfig="$W/scheduler.kubeconfig" \
  --leader-elect=false --bind-address=127.0.0.1 --secure-port=10259 --v=1

# --- containerd ------------------------------------------------------------------------------------
if ! { [[ -S /run/containerd/containerd.sock ]] && ctr version > /dev/null 2>&1; }; then
  mkdir -p "$D/cni/net.d"
  sed "s#@NODE_DIR@#$D#g" "$S/containerd/config.toml" > "$W/containerd.toml"
  cp "$S/cni/10-flotilla-node.conflist" "$D/cni/net.d/"
  spawn containerd containerd --config "$W/containerd.toml"
  wait_for containerd 30 test -S /run/containerd/containerd.sock
fi
# images: the pause image and the project's own (build-images.sh, build-project-images.sh), each imported once
# per build (a marker in containerd's own root, which holds the images: the archive's stamp, then the image names
# it holds). An image that is gone from containerd although its marker says imported is imported again.
mkdir -p "$V/containerd/flotilla-imported"
present=$(ctr -n k8s.io images ls -q)
for archive in "$D/pause.oci.tar" "$D"/images/*.tar; do
  marker=$V/containerd/flotilla-imported/$(basename "$archive").stamp
  stamp=$(stat -c %Y-%s "$archive")
  fresh=0
  # a marker that names no image (written before markers listed them) proves nothing: import again
  if [[ $(head -1 "$marker" 2>/dev/null) == "$stamp" && $(wc -l < "$marker") -gt 1 ]]; then
    fresh=1
    while read -r ref; do grep -qxF "$ref" <<< "$present" || fresh=0; done < <(tail -n +2 "$marker")
  fi
  if [[ $fresh != 1 ]]; then
    t=$SECONDS
    out=$(ctr -n k8s.io images import "$archive")
    { echo "$stamp"; sed -n 's/^unpacking \([^ ]*\) .*/\1/p' <<< "$out"; } > "$marker"
    echo "imported $(basename "$archive") in $((SECONDS - t))s"
  fi
done

# --- kubelet ---------------------------------------------------------------------------------------
cat > "$W/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
healthzBindAddress: 127.0.0.1
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
failSwapOn: false
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
resolvConf: /etc/resolv.conf
registerNode: true
# No registry can be reached: an image the kubelet garbage-collects (the pause image included) cannot come back.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# The node's disk is this machine's, shared with the build caches, the images' archives and the suite: the default
# thresholds (nodefs 10%, imagefs 15% free) would evict the scenario's pods and taint the node for the host's disk
# use, which is not what the node suite tests. Evict only when the disk is all but full.
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
EOF
spawn kubelet "$NBIN/kubelet" --config="$W/kubelet.yaml" --kubeconfig="$W/kubelet.kubeconfig" \
  --root-dir="$V/kubelet" --hostname-override=$NODE --node-ip=$NODE_IP ${KUBELET_EXTRA:-} --v=2

# --- kube-proxy ------------------------------------------------------------------------------------
cat > "$W/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection: {kubeconfig: $W/kube-proxy.kubeconfig}
hostnameOverride: $NODE
clusterCIDR: 10.244.0.0/24
bindAddress: 127.0.0.1
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
EOF
spawn kube-proxy "$NBIN/kube-proxy" --config="$W/kube-proxy.yaml" --v=2
echo "up.sh done in $((SECONDS - start))s; kubectl: $CPBIN/kubectl --kubeconfig $W/admin.kubeconfig"
