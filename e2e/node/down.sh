#!/usr/bin/env bash
# Stop what up.sh started (by pid file), remove pods' containers first, undo iptables/sysctl/address changes.
set -uo pipefail
S="$(cd "$(dirname "$0")" && pwd)"   # this folder: static inputs
REPO="$(cd "$S/../.." && pwd)"
D="${FLOTILLA_NODE_DIR:-$HOME/.cache/flotilla/node}"   # state: images, logs, etcd, kubelet root
L=$D/logs
NBIN=$HOME/.cache/flotilla/node/bin
stop() {
  local f=$L/$1.pid
  [[ -f $f ]] || return 0
  local pid; pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    echo "stopped $1 ($pid)"
  fi
  rm -f "$f"
}
# delete pods first, so that the kubelet stops their sandboxes (CNI DEL: veth, IPAM, CNI-* nat chains)
K="$HOME/.cache/flotilla/controlplane/v1.32.0/bin/kubectl --kubeconfig $D/run/admin.kubeconfig"
if [[ -f $L/kubelet.pid ]] && kill -0 "$(cat $L/kubelet.pid)" 2>/dev/null; then
  $K delete pods --all --all-namespaces --grace-period=1 --timeout=60s || true
fi
stop kube-proxy
stop kubelet
# pods' sandboxes and containers (k8s.io namespace), their shims and network namespaces
if ctr version > /dev/null 2>&1; then
  for t in $(ctr -n k8s.io tasks ls -q 2>/dev/null); do ctr -n k8s.io tasks kill -s KILL "$t" 2>/dev/null; done
  for _ in $(seq 20); do  # until no task is still running (KILL is asynchronous)
    ctr -n k8s.io tasks ls 2>/dev/null | awk 'NR > 1 && $3 == "RUNNING"' | grep -q . || break; sleep 0.5
  done
  for t in $(ctr -n k8s.io tasks ls -q 2>/dev/null); do ctr -n k8s.io tasks delete -f "$t" 2>/dev/null; done
  for c in $(ctr -n k8s.io containers ls -q 2>/dev/null); do ctr -n k8s.io containers delete "$c" 2>/dev/null; done
fi
stop containerd
# shims left behind (containerd-shim-runc-v2 re-parents to init): only those for our containerd root
for p in $(pgrep -f "containerd-shim-runc-v2 -namespace k8s.io" 2>/dev/null); do kill -KILL "$p" && echo "killed shim $p"; done
stop kube-scheduler
stop kube-controller-manager
stop kube-apiserver
stop etcd
# kubelet mounts (pod volumes) and netns mounts
grep -E " ($D/var/|/run/netns/cni-|/run/containerd/)" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l
rm -f /run/netns/cni-* 2>/dev/null
"$NBIN/kube-proxy" --cleanup > /dev/null 2>&1 && echo "kube-proxy --cleanup ok"
# chains kubelet made
# what --cleanup leaves (kubelet's KUBE-FIREWALL / canaries, CNI chains of pods not torn down): drop every
# KUBE-* / CNI-* chain and every rule naming one, keep everything else
for ipt in iptables ip6tables; do
  if $ipt-save 2>/dev/null | grep -qE 'KUBE-|CNI-'; then
    $ipt-save 2>/dev/null | grep -vE 'KUBE-|CNI-' | $ipt-restore && echo "$ipt: removed KUBE-/CNI- chains"
  fi
done
rm -rf /var/lib/cni/networks/flotilla-node /var/lib/cni/results/flotilla-node-* /var/lib/cni/results/cni-loopback-* /var/log/pods/default_* /var/log/containers/*_default_* && echo "removed host-local IPAM state"
ip link show cni0 > /dev/null 2>&1 && ip link del cni0 && echo "deleted cni0"
[[ -f $D/logs/containerd.pid ]] || rm -rf /run/containerd
ip addr del 10.254.0.1/32 dev lo 2>/dev/null && echo "removed 10.254.0.1 from lo"
# sysctls back to their values before the experiment
while read -r k v; do echo "$v" > /proc/sys/$k 2>/dev/null; done < $D/sysctl.orig
echo "sysctls restored from sysctl.orig"
# a fresh cluster next time: etcd data, kubelet root, PKI/kubeconfigs (containerd's image store is kept)
[[ ${KEEP_STATE:-} ]] || { rm -rf $D/var/etcd $D/var/kubelet $D/run && echo "removed var/etcd var/kubelet run/"; }
# empty cgroup v1 folders the kubelet (kubepods/...) and `ctr -n explore run` (explore/) left
for h in /sys/fs/cgroup/*/; do
  for top in kubepods explore; do
    [[ -d $h$top ]] && find "$h$top" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
done
ls -d /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/*/explore 2>/dev/null | sed 's/^/cgroup left: /'
