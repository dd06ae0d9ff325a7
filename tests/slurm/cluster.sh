#!/usr/bin/env bash
# A real multi-node Slurm cluster on this one machine, for tests and CI (docs/test-cluster.md).
#
#   tests/slurm/cluster.sh install|up|down|status [--version 22.05|24.11] [--nodes N]
#                          [--state-dir DIR] [--bind DIR]... [--timeout SECONDS] [--name ID]
#                          [--slurmd-timeout SECONDS]
#
# Every node (and the controller) lives in its own network namespace with its own address in a private
# range that exists only inside those namespaces (a bridge in the controller's namespace, one veth per
# node). 22.05 runs Debian 12's packages natively; 24.11 (for --segment with topology/block) runs from a
# Debian 13 chroot, where jobs see only the bind-mounted folders, at the same paths as on the host.
# Client wrappers (sbatch, squeue, ...) in STATE_DIR/bin run the real client inside the controller's
# namespace, so a program that calls `sbatch` by name talks to this cluster once that folder leads PATH.
# Needs root. Everything it creates is named after the cluster id (s22 or s24) and removed by `down`.
set -euo pipefail

readonly SCRIPT_NAME="cluster.sh"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
readonly REPO_ROOT
readonly CACHE_DIR="/var/lib/mos-test-slurm"
readonly REGISTRY_DIR="/run/mos-test-slurm"
readonly HOSTS_FILE="/etc/hosts"
readonly NETNS_DIR="/run/netns"
readonly CLIENT_COMMANDS=(sbatch squeue scontrol scancel sinfo srun salloc sacct)
readonly HOST_PACKAGES_2205=(slurmctld slurmd slurm-client munge iproute2 util-linux)
readonly HOST_PACKAGES_2411=(debootstrap iproute2 util-linux)
readonly CHROOT_PACKAGES="slurmctld,slurmd,slurm-client,munge,python3"
readonly CHROOT_SUITE="trixie"
readonly MARKER_FILE=".mos-test-slurm"

COMMAND=""
VERSION="22.05"
NODE_COUNT=""
STATE_DIR=""
TIMEOUT=60
BINDS=()
NAME=""
SLURMD_TIMEOUT=""

die() {
  echo "$SCRIPT_NAME: $*" >&2
  exit 1
}

usage_error() {
  echo "$SCRIPT_NAME: $*" >&2
  echo "usage: $SCRIPT_NAME install|up|down|status [--version 22.05|24.11] [--nodes N] [--state-dir DIR] [--bind DIR]... [--timeout S] [--name ID]" >&2
  exit 2
}

log() {
  echo "$SCRIPT_NAME [$CID]: $*" >&2
}

now() {
  date +%s.%N
}

elapsed_since() {
  awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'
}

parse_args() {
  [[ $# -ge 1 ]] || usage_error "missing command"
  COMMAND="$1"
  shift
  case "$COMMAND" in
    install | up | down | status) ;;
    *) usage_error "unknown command '$COMMAND' (allowed: install, up, down, status)" ;;
  esac
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --version) VERSION="${2:-}"; shift 2 || usage_error "--version needs a value" ;;
      --nodes) NODE_COUNT="${2:-}"; shift 2 || usage_error "--nodes needs a value" ;;
      --state-dir) STATE_DIR="${2:-}"; shift 2 || usage_error "--state-dir needs a value" ;;
      --bind) BINDS+=("${2:-}"); shift 2 || usage_error "--bind needs a value" ;;
      --timeout) TIMEOUT="${2:-}"; shift 2 || usage_error "--timeout needs a value" ;;
      --name) NAME="${2:-}"; shift 2 || usage_error "--name needs a value" ;;
      --slurmd-timeout) SLURMD_TIMEOUT="${2:-}"; shift 2 || usage_error "--slurmd-timeout needs a value" ;;
      *) usage_error "unknown option '$1'" ;;
    esac
  done
  [[ -z "$NODE_COUNT" || "$NODE_COUNT" =~ ^[1-9][0-9]?$ ]] || usage_error "--nodes must be 1..99 (got '$NODE_COUNT')"
  [[ -z "$NAME" || "$NAME" =~ ^[a-z][a-z0-9]{1,4}$ ]] || usage_error "--name must be 2-5 lowercase letters/digits, starting with a letter (got '$NAME')"
  [[ "$TIMEOUT" =~ ^[1-9][0-9]*$ ]] || usage_error "--timeout must be a positive number of seconds (got '$TIMEOUT')"
  [[ -z "$SLURMD_TIMEOUT" || "$SLURMD_TIMEOUT" =~ ^[1-9][0-9]*$ ]] \
    || usage_error "--slurmd-timeout must be a positive number of seconds (got '$SLURMD_TIMEOUT')"
  for dir in "${BINDS[@]}"; do
    [[ "$dir" == /* ]] || usage_error "--bind needs an absolute path (got '$dir')"
  done
}

# Names, addresses and paths of one cluster. The two versions never share a name, so both can run at once;
# --name gives a further independent cluster (its own names and /24), e.g. for lifecycle tests.
set_profile() {
  case "$VERSION" in
    22.05 | 22) VERSION="22.05"; CID="s22"; NET="10.250.22"; ROOT="" ;;
    24.11 | 24) VERSION="24.11"; CID="s24"; NET="10.250.24"; ROOT="$CACHE_DIR/trixie-24.11" ;;
    *) usage_error "--version must be 22.05 or 24.11 (got '$VERSION')" ;;
  esac
  if [[ -n "$NAME" && "$NAME" != "$CID" ]]; then
    CID="$NAME"
    NET="10.250.$((100 + $(cksum <<<"$NAME" | cut -d' ' -f1) % 150))"
  fi
  CTL_NAME="${CID}ctl"
  CTL_NS="mos-$CID-ctl"
  CTL_IP="$NET.1"
  HOSTS_TAG="# mos-test-slurm $CID"
  REGISTRY_FILE="$REGISTRY_DIR/$CID.state-dir"
  LOCK_FILE="$REGISTRY_DIR/$CID.lock"
  if [[ -z "$STATE_DIR" && -f "$REGISTRY_FILE" ]]; then
    STATE_DIR="$(cat "$REGISTRY_FILE")"
  fi
  STATE_DIR="${STATE_DIR:-/tmp/mos-slurm-$CID}"
  STATE_DIR="${STATE_DIR%/}"
  [[ "$STATE_DIR" == /* ]] || usage_error "--state-dir needs an absolute path (got '$STATE_DIR')"
  CONF="$STATE_DIR/etc/slurm.conf"
  MUNGE_SOCKET="$STATE_DIR/run/munge.socket"
  # A unix socket path must fit in 108 bytes.
  ((${#MUNGE_SOCKET} < 100)) || usage_error "--state-dir is too long for munge's socket path (keep it under 80 characters): $STATE_DIR"
  BIN_DIR="$STATE_DIR/bin"
}

node_name() { echo "${CID}n$1"; }
node_ip() { echo "$NET.$((10 + $1))"; }
node_ns() { echo "mos-$CID-n$1"; }

require_root() {
  [[ "$(id -u)" -eq 0 ]] || die "must run as root (network namespaces, mounts, apt)"
}

# take_lock SECONDS: one cluster.sh at a time per cluster id (concurrent test sessions, CI and a shell).
take_lock() {
  local seconds="$1"
  mkdir -p "$REGISTRY_DIR"
  # fd 9: daemons are started with it closed, so they never hold the lock.
  exec 9>"$LOCK_FILE"
  flock -w "$seconds" 9 || die "timed out after ${seconds}s waiting for the lock $LOCK_FILE (another cluster.sh for $CID?)"
}

# ---------------------------------------------------------------- install

# retry ATTEMPTS WHAT CMD...: run CMD until it succeeds, at most ATTEMPTS times, 10 s apart.
retry() {
  local attempts="$1" what="$2" i out
  shift 2
  out="$(mktemp)"
  for ((i = 1; i <= attempts; i++)); do
    if "$@" >"$out" 2>&1; then
      rm -f "$out"
      return 0
    fi
    log "$what failed (attempt $i of $attempts): $(tail -n 1 "$out")"
    ((i == attempts)) || sleep 10
  done
  log "last output of $what: $(tail -n 5 "$out")"
  rm -f "$out"
  die "$what failed $attempts times"
}

package_installed() {
  [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

install_host_packages() {
  local missing=() pkg
  for pkg in "$@"; do
    package_installed "$pkg" || missing+=("$pkg")
  done
  [[ ${#missing[@]} -gt 0 ]] || return 0
  log "apt-get install ${missing[*]}"
  # Another apt (another session) may hold apt's locks for a while: retry, bounded.
  retry 6 "apt-get update" timeout 300 apt-get update -qq
  retry 3 "apt-get install ${missing[*]}" env DEBIAN_FRONTEND=noninteractive \
    timeout 600 apt-get -o DPkg::Lock::Timeout=60 install -y -qq --no-install-recommends "${missing[@]}"
}

# The Debian mirror this host already uses (apt's own configuration), so no host name is written here.
host_debian_mirror() {
  local codename site
  codename="$(awk -F= '$1 == "VERSION_CODENAME" { print $2 }' /etc/os-release)"
  # shellcheck disable=SC2016  # apt's own $(FIELD) placeholders
  site="$(apt-get indextargets --format '$(SITE) $(RELEASE)' 2>/dev/null \
    | awk -v c="$codename" '$2 == c { print $1; exit }')"
  [[ -n "$site" ]] || die "cannot find the Debian mirror for '$codename' in apt's configuration (run apt-get update)"
  echo "$site"
}

mounts_under() {
  awk -v p="$1/" 'index($2 "/", p) == 1 { print $2 }' /proc/mounts
}

chroot_ready() {
  [[ -x "$ROOT/usr/sbin/slurmctld" && "$(chroot "$ROOT" /usr/sbin/slurmctld -V 2>/dev/null)" == *" 24.11."* ]]
}

install_chroot() {
  chroot_ready && return 0
  local partial="$ROOT.partial" mirror start
  [[ -z "$(mounts_under "$ROOT")" ]] \
    || die "refusing to rebuild $ROOT: something is mounted under it (run: $SCRIPT_NAME down --version 24.11)"
  # A killed debootstrap can leave its own proc/sys mounts in the partial tree.
  unmount_all_under "$partial"
  [[ -z "$(mounts_under "$partial")" ]] || die "cannot unmount what is mounted under $partial"
  mirror="$(host_debian_mirror)"
  rm -rf "$partial" "$ROOT"
  mkdir -p "$CACHE_DIR"
  start="$(now)"
  log "debootstrap $CHROOT_SUITE (slurm 24.11) into $ROOT"
  timeout 1200 debootstrap --variant=minbase --include="$CHROOT_PACKAGES" "$CHROOT_SUITE" "$partial" "$mirror" \
    >"$CACHE_DIR/debootstrap.log" 2>&1 \
    || die "debootstrap failed or ran past 1200 s: $(tail -n 3 "$CACHE_DIR/debootstrap.log" | tr '\n' ' ')"
  mv "$partial" "$ROOT"
  log "chroot built in $(elapsed_since "$start")s"
}

installed() {
  if [[ "$VERSION" == "22.05" ]]; then
    command -v munged >/dev/null && [[ "$(slurmctld -V 2>/dev/null)" == *" 22.05."* ]]
  else
    chroot_ready
  fi
}

cmd_install() {
  require_root
  # Another session may be installing the same thing (debootstrap takes minutes).
  take_lock 900
  local start
  start="$(now)"
  if [[ "$VERSION" == "22.05" ]]; then
    install_host_packages "${HOST_PACKAGES_2205[@]}"
  else
    install_host_packages "${HOST_PACKAGES_2411[@]}"
    install_chroot
  fi
  installed || die "slurm $VERSION is still not usable after install"
  log "installed (slurm $VERSION) in $(elapsed_since "$start")s"
}

# ---------------------------------------------------------------- configuration

write_slurm_conf() {
  local i
  mkdir -p "$STATE_DIR"/{etc,log,run,ctld,spool,munge}
  {
    echo "# Written by tests/slurm/cluster.sh for the $CID test cluster (slurm $VERSION)."
    echo "ClusterName=mos$CID"
    echo "SlurmctldHost=$CTL_NAME($CTL_IP)"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    echo "AuthInfo=socket=$MUNGE_SOCKET"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "MpiDefault=none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "JobCompType=jobcomp/none"
    echo "ReturnToService=2"
    # How long a silent node stays up before slurmctld calls it DOWN (Slurm's default: 300 s). The host-loss
    # test's own cluster sets it short, so a killed node is noticed within the test.
    if [[ -n "$SLURMD_TIMEOUT" ]]; then
      echo "SlurmdTimeout=$SLURMD_TIMEOUT"
    fi
    # Schedule a batch job the moment it is submitted (Slurm's default batches them for up to 3 s).
    echo "SchedulerParameters=batch_sched_delay=0"
    # Trust the node lines below rather than the hardware: every node shares this machine's cores.
    echo "SlurmdParameters=config_overrides"
    echo "StateSaveLocation=$STATE_DIR/ctld"
    echo "SlurmdSpoolDir=$STATE_DIR/spool/%n"
    echo "SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid"
    echo "SlurmdPidFile=$STATE_DIR/run/slurmd-%n.pid"
    echo "SlurmctldLogFile=$STATE_DIR/log/slurmctld.log"
    echo "SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log"
    echo "SlurmctldPort=6817"
    echo "SlurmdPort=6818"
    if [[ "$VERSION" == "24.11" ]]; then
      echo "TopologyPlugin=topology/block"
    fi
    for ((i = 1; i <= NODE_COUNT; i++)); do
      echo "NodeName=$(node_name "$i") NodeAddr=$(node_ip "$i") NodeHostname=$(node_name "$i") CPUs=4 RealMemory=4096 State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  } >"$CONF"
  if [[ "$VERSION" == "24.11" ]]; then
    # No cgroup filesystem Slurm 24.11 can use here.
    echo "CgroupPlugin=disabled" >"$STATE_DIR/etc/cgroup.conf"
    write_topology_conf
  fi
}

# Blocks of 2 consecutive nodes (a smaller last block is fatal for slurmctld, so N must be even).
write_topology_conf() {
  local i block=1
  {
    for ((i = 1; i <= NODE_COUNT; i += 2)); do
      echo "BlockName=b$block Nodes=$(node_name "$i"),$(node_name $((i + 1)))"
      block=$((block + 1))
    done
    echo "BlockSizes=2"
  } >"$STATE_DIR/etc/topology.conf"
}

write_munge_key() {
  local key="$STATE_DIR/munge/munge.key"
  chmod 0700 "$STATE_DIR/munge"
  if [[ ! -s "$key" ]]; then
    head -c 1024 /dev/urandom >"$key.tmp"
    chmod 0400 "$key.tmp"
    mv "$key.tmp" "$key"
  fi
}

hosts_lines() {
  local i
  echo "$CTL_IP $CTL_NAME $HOSTS_TAG"
  for ((i = 1; i <= NODE_COUNT; i++)); do
    echo "$(node_ip "$i") $(node_name "$i") $HOSTS_TAG"
  done
}

# Lines of a file that do not end with our tag (exact: another cluster's tag may share a prefix).
lines_without_tag() {
  awk -v tag=" $HOSTS_TAG" 'length($0) < length(tag) || substr($0, length($0) - length(tag) + 1) != tag' "$1"
}

has_hosts_entries() {
  [[ "$(lines_without_tag "$HOSTS_FILE")" != "$(cat "$HOSTS_FILE")" ]]
}

# Rewrites a hosts file without our tagged lines (plus the given lines); temp + rename, in place if
# the file cannot be replaced (a bind-mounted /etc/hosts).
rewrite_hosts_file() {
  local file="$1" extra="$2" tmp
  tmp="$(mktemp "$file.mos.XXXXXX")"
  { lines_without_tag "$file"; [[ -z "$extra" ]] || echo "$extra"; } >"$tmp"
  chmod 0644 "$tmp"
  if ! mv -f "$tmp" "$file" 2>/dev/null; then
    cat "$tmp" >"$file"
    rm -f "$tmp"
  fi
}

add_hosts_entries() {
  if [[ "$VERSION" == "22.05" ]]; then
    rewrite_hosts_file "$HOSTS_FILE" "$(hosts_lines)"
  else
    # The chroot is ours: it gets its own complete hosts file.
    { echo "127.0.0.1 localhost"; hosts_lines; } >"$ROOT/etc/hosts"
  fi
}

remove_hosts_entries() {
  if has_hosts_entries; then
    rewrite_hosts_file "$HOSTS_FILE" ""
  fi
}

# ---------------------------------------------------------------- network

create_namespace() {
  local ns="$1"
  ip netns add "$ns" || die "cannot create network namespace $ns"
  ip -n "$ns" link set lo up
}

create_network() {
  local i ns
  create_namespace "$CTL_NS"
  ip -n "$CTL_NS" link add br0 type bridge
  ip -n "$CTL_NS" addr add "$CTL_IP/24" dev br0
  ip -n "$CTL_NS" link set br0 up
  for ((i = 1; i <= NODE_COUNT; i++)); do
    ns="$(node_ns "$i")"
    create_namespace "$ns"
    ip -n "$CTL_NS" link add "veth$i" type veth peer name eth0 netns "$ns"
    ip -n "$CTL_NS" link set "veth$i" master br0 up
    ip -n "$ns" addr add "$(node_ip "$i")/24" dev eth0
    ip -n "$ns" link set eth0 up
  done
}

our_namespaces() {
  local ns
  for ns in "$NETNS_DIR"/mos-"$CID"-*; do
    [[ -e "$ns" ]] && basename "$ns"
  done
  return 0
}

# PIDs of live processes inside one of our namespaces: the daemons, their job steps and the jobs'
# tasks. Zombies have no namespace links, so they never match. One pass over /proc for all namespaces.
pids_in_our_namespaces() {
  local ids=() ns
  while read -r ns; do
    [[ -n "$ns" ]] && ids+=("net:[$(stat -L -c %i "$NETNS_DIR/$ns")]")
  done < <(our_namespaces)
  [[ ${#ids[@]} -gt 0 ]] || return 0
  find /proc -mindepth 3 -maxdepth 3 -path '/proc/[0-9]*/ns/net' -printf '%l %h\n' 2>/dev/null \
    | grep -F -f <(printf '%s\n' "${ids[@]}") | awk '{ split($2, part, "/"); print part[3] }' || true
}

stop_processes() {
  local pids deadline
  mapfile -t pids < <(pids_in_our_namespaces)
  [[ ${#pids[@]} -gt 0 ]] || return 0
  log "stopping ${#pids[@]} processes in the $CID namespaces"
  kill -TERM "${pids[@]}" 2>/dev/null || true
  deadline=$((SECONDS + 10))
  while [[ -n "$(pids_in_our_namespaces)" ]]; do
    if ((SECONDS >= deadline)); then
      mapfile -t pids < <(pids_in_our_namespaces)
      log "sending KILL to ${#pids[@]} processes still alive after 10s: ${pids[*]}"
      kill -KILL "${pids[@]}" 2>/dev/null || true
      wait_until 5 "processes in the $CID namespaces to exit after KILL" no_processes_left
      break
    fi
    sleep 0.2
  done
}

no_processes_left() {
  [[ -z "$(pids_in_our_namespaces)" ]]
}

delete_namespaces() {
  local ns
  while read -r ns; do
    [[ -n "$ns" ]] && { ip netns del "$ns" || log "cannot delete namespace $ns"; }
  done < <(our_namespaces)
  return 0
}

# ---------------------------------------------------------------- chroot mounts (24.11)

bind_dirs() {
  local dirs=("${BINDS[@]}")
  [[ ${#dirs[@]} -gt 0 ]] || dirs=(/tmp "$REPO_ROOT")
  dirs+=("$STATE_DIR")
  printf '%s\n' "${dirs[@]}" | sort -u
}

covered_by_bind() {
  local dir="$1" other
  while read -r other; do
    [[ "$other" != "$dir" && "$dir/" == "$other/"* ]] && return 0
  done < <(bind_dirs)
  return 1
}

mount_chroot() {
  local dir
  [[ -z "$(mounts_under "$ROOT")" ]] || die "the chroot $ROOT is in use by another 24.11 cluster (mounts under it)"
  mkdir -p "$ROOT/proc" "$ROOT/dev"
  mount -t proc proc "$ROOT/proc"
  mount --bind /dev "$ROOT/dev"
  # Unbuffered steps (srun -u, SLURM_UNBUFFEREDIO=1 as nemo_run's scripts set) give tasks a pty.
  mount --bind /dev/pts "$ROOT/dev/pts"
  mount --bind /dev/shm "$ROOT/dev/shm"
  while read -r dir; do
    [[ -d "$dir" ]] || die "--bind folder $dir does not exist"
    covered_by_bind "$dir" && continue
    mkdir -p "$ROOT$dir"
    mount --bind "$dir" "$ROOT$dir"
  done < <(bind_dirs)
}

# Unmounts everything mounted under a folder of ours, deepest first.
unmount_all_under() {
  local target
  while read -r target; do
    [[ -n "$target" ]] || continue
    umount "$target" 2>/dev/null || umount -l "$target" || log "cannot unmount $target"
  done < <(mounts_under "$1" | awk '{ print length($0) " " $0 }' | sort -rn | cut -d' ' -f2-)
}

unmount_chroot() {
  [[ -n "$ROOT" && -d "$ROOT" ]] || return 0
  unmount_all_under "$ROOT"
}

# ---------------------------------------------------------------- daemons

# Runs a command in namespace $1 with hostname $2 (and inside the chroot for 24.11), in the background,
# logging to $3. nsenter, unshare and sh exec in turn, so $! is the daemon's own PID.
start_in_namespace() {
  local ns="$1" host="$2" logfile="$3"
  shift 3
  # shellcheck disable=SC2016  # the inner sh expands these
  if [[ -n "$ROOT" ]]; then
    nsenter --net="$NETNS_DIR/$ns" -- unshare --uts -- /bin/sh -c 'hostname "$0" && root="$1" && shift && exec chroot "$root" "$@"' \
      "$host" "$ROOT" "$@" </dev/null >>"$logfile" 2>&1 9>&- &
  else
    nsenter --net="$NETNS_DIR/$ns" -- unshare --uts -- /bin/sh -c 'hostname "$0" && exec "$@"' \
      "$host" "$@" </dev/null >>"$logfile" 2>&1 9>&- &
  fi
  echo "$!"
}

wait_until() {
  local seconds="$1" what="$2" deadline
  shift 2
  deadline="$(($(date +%s) + seconds))"
  until "$@"; do
    if (($(date +%s) >= deadline)); then
      log "timed out after ${seconds}s waiting for $what"
      return 1
    fi
    sleep 0.2
  done
}

record_pid() {
  echo "$1 $2" >>"$STATE_DIR/run/pids"
}

start_munged() {
  local pid
  pid="$(start_in_namespace "$CTL_NS" "$CTL_NAME" "$STATE_DIR/log/munged.out" \
    /usr/sbin/munged --foreground --force --socket="$MUNGE_SOCKET" --key-file="$STATE_DIR/munge/munge.key" \
    --pid-file="$STATE_DIR/munge/munged.pid" --log-file="$STATE_DIR/log/munged.log" \
    --seed-file="$STATE_DIR/munge/munged.seed")"
  record_pid munged "$pid"
  wait_until "$TIMEOUT" "munged to create its socket $MUNGE_SOCKET" test -S "$MUNGE_SOCKET" \
    || die "munged did not start"
}

# A Slurm client in the controller's namespace, bounded: a dead controller makes clients retry for long.
client() {
  local cmd="$1"
  shift
  if [[ -n "$ROOT" ]]; then
    SLURM_CONF="$CONF" timeout 10 nsenter --net="$NETNS_DIR/$CTL_NS" -- chroot "$ROOT" "/usr/bin/$cmd" "$@"
  else
    SLURM_CONF="$CONF" timeout 10 nsenter --net="$NETNS_DIR/$CTL_NS" -- "/usr/bin/$cmd" "$@"
  fi
}

controller_answers() {
  [[ "$(client scontrol ping 2>/dev/null)" == *"is UP"* ]]
}

start_slurmctld() {
  local pid
  pid="$(start_in_namespace "$CTL_NS" "$CTL_NAME" "$STATE_DIR/log/slurmctld.out" \
    env SLURM_CONF="$CONF" /usr/sbin/slurmctld -D -i -f "$CONF")"
  record_pid slurmctld "$pid"
  wait_until "$TIMEOUT" "slurmctld on $CTL_NAME ($CTL_IP:6817) to answer scontrol ping" controller_answers \
    || die "slurmctld did not come up"
}

start_slurmds() {
  local i name pid
  for ((i = 1; i <= NODE_COUNT; i++)); do
    name="$(node_name "$i")"
    mkdir -p "$STATE_DIR/spool/$name"
    pid="$(start_in_namespace "$(node_ns "$i")" "$name" "$STATE_DIR/log/slurmd-$name.out" \
      env SLURM_CONF="$CONF" /usr/sbin/slurmd -D -N "$name" -f "$CONF")"
    record_pid "slurmd-$name" "$pid"
  done
}

# Node states as "name state" lines, as the controller sees them.
node_states() {
  client sinfo -h -N -o '%N %t' 2>/dev/null | sort -u
}

all_nodes_usable() {
  local states count
  states="$(node_states)" || return 1
  count="$(grep -cE ' (idle|alloc|mix|comp)$' <<<"$states" || true)"
  [[ "$count" -eq "$NODE_COUNT" && "$(wc -l <<<"$states")" -eq "$NODE_COUNT" ]]
}

# ---------------------------------------------------------------- wrappers and state

# One client wrapper: the real command, run in the controller's namespace (and the 24.11 chroot) with
# the caller's arguments and working directory unchanged.
write_wrapper() {
  local cmd="$1" file="$BIN_DIR/$1"
  {
    echo '#!/usr/bin/env bash'
    echo "# Generated by tests/slurm/cluster.sh: Slurm's $cmd inside the $CID test cluster (slurm $VERSION)."
    echo 'set -euo pipefail'
    echo "export SLURM_CONF='$CONF'"
    echo "cmd='/usr/bin/$cmd' netns='$NETNS_DIR/$CTL_NS' root='$ROOT' cluster_netns='$NETNS_DIR/mos-$CID-'"
    cat <<'EOF'
# Already inside the cluster (a job on a node; the chroot, where $root does not exist): the real client
# is right here.
if [[ -n "$root" && ! -d "$root" ]]; then
  exec "$cmd" "$@"
fi
for ns in "$cluster_netns"*; do
  if [[ /proc/self/ns/net -ef "$ns" ]]; then
    exec "$cmd" "$@"
  fi
done
if [[ -z "$root" ]]; then
  exec nsenter --net="$netns" -- "$cmd" "$@"
fi
# The chroot sees the bound folders at the same paths: keep the working directory when it is one of them.
dir="$PWD"
if [[ ! "$PWD" -ef "$root$PWD" ]]; then
  case "$cmd" in
    */sbatch | */srun | */salloc)
      echo "${cmd##*/}: working directory $PWD is not visible inside the slurm chroot $root (cluster.sh --bind)" >&2
      exit 1
      ;;
  esac
  dir=/
fi
# shellcheck disable=SC2016  # expanded by the inner sh, inside the chroot
exec nsenter --net="$netns" -- chroot "$root" /bin/sh -c 'cd "$0" && exec "$@"' "$dir" "$cmd" "$@"
EOF
  } >"$file.tmp"
  chmod 0755 "$file.tmp"
  mv "$file.tmp" "$file"
}

write_state() {
  local i names=() ips=() tmp="$STATE_DIR/cluster.env.tmp" cmd
  mkdir -p "$BIN_DIR"
  for cmd in "${CLIENT_COMMANDS[@]}"; do
    write_wrapper "$cmd"
  done
  for ((i = 1; i <= NODE_COUNT; i++)); do
    names+=("$(node_name "$i")")
    ips+=("$(node_ip "$i")")
  done
  {
    echo "VERSION=$VERSION"
    echo "CLUSTER_ID=$CID"
    echo "STATE_DIR=$STATE_DIR"
    echo "BIN_DIR=$BIN_DIR"
    echo "SLURM_CONF=$CONF"
    echo "CONTROLLER=$CTL_NAME"
    echo "CONTROLLER_IP=$CTL_IP"
    echo "CONTROLLER_NS=$CTL_NS"
    echo "NODES=\"${names[*]}\""
    echo "NODE_IPS=\"${ips[*]}\""
    echo "CHROOT=$ROOT"
    echo "BINDS=\"$(bind_dirs | tr '\n' ' ' | sed 's/ $//')\""
  } >"$tmp"
  mv "$tmp" "$STATE_DIR/cluster.env"
  echo "$STATE_DIR" >"$REGISTRY_FILE"
}

# Node count of the cluster described by the state dir (empty when there is none).
recorded_node_count() {
  [[ -f "$STATE_DIR/cluster.env" ]] || return 0
  awk -F'"' '/^NODES=/ { print split($2, names, " ") }' "$STATE_DIR/cluster.env"
}

# True when the process is alive (not a zombie) and runs the named program.
process_alive() {
  local pid="$1" program="$2" stat
  stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
  [[ "$stat" == "$pid ($program) "* && "$stat" != "$pid ($program) Z"* ]]
}

recorded_daemons_alive() {
  local name pid
  [[ -s "$STATE_DIR/run/pids" ]] || return 1
  while read -r name pid; do
    process_alive "$pid" "${name%%-*}" || return 1
  done <"$STATE_DIR/run/pids"
}

# True when every folder this `up` wants visible in the chroot is (under) one the running cluster bound.
recorded_binds_cover_requested() {
  local recorded dir other covered
  [[ -n "$ROOT" ]] || return 0
  recorded="$(awk -F'"' '/^BINDS=/ { print $2 }' "$STATE_DIR/cluster.env" | tr ' ' '\n')"
  while read -r dir; do
    covered=1
    while read -r other; do
      [[ -n "$other" && "$dir/" == "$other/"* ]] && covered=0
    done <<<"$recorded"
    ((covered == 0)) || return 1
  done < <(bind_dirs)
}

cluster_healthy() {
  [[ -f "$STATE_DIR/cluster.env" && -e "$NETNS_DIR/$CTL_NS" ]] || return 1
  [[ "$(recorded_node_count)" -eq "$NODE_COUNT" ]] || return 1
  recorded_binds_cover_requested && recorded_daemons_alive && all_nodes_usable
}

# ---------------------------------------------------------------- commands

teardown() {
  if [[ -e "$NETNS_DIR/$CTL_NS" && -f "$CONF" ]] && controller_answers; then
    # Cancel jobs first so their steps end through Slurm; the namespace sweep catches the rest.
    client scancel --quiet --full --user=root 2>/dev/null || true
  fi
  stop_processes
  delete_namespaces
  unmount_chroot
  remove_hosts_entries
  if [[ -f "$STATE_DIR/$MARKER_FILE" ]]; then
    [[ -z "$(mounts_under "$STATE_DIR")" ]] || die "refusing to delete $STATE_DIR: something is mounted under it"
    rm -rf "$STATE_DIR"
  fi
  rm -f "$REGISTRY_FILE"
}

# EXIT trap of a failed `up`: show and keep the daemons' logs, then remove the half-started cluster.
up_failed() {
  local logs="$STATE_DIR.failed-logs" file
  trap - EXIT
  rm -rf "$logs"
  cp -r "$STATE_DIR/log" "$logs" 2>/dev/null || true
  for file in "$logs"/*; do
    [[ -s "$file" ]] || continue
    log "--- last lines of $file:"
    tail -n 5 "$file" >&2
  done
  log "up failed: removing what it started (logs kept in $logs)"
  teardown
}

cmd_up() {
  require_root
  take_lock "$TIMEOUT"
  local start
  NODE_COUNT="${NODE_COUNT:-$(recorded_node_count)}"
  NODE_COUNT="${NODE_COUNT:-4}"
  if [[ "$VERSION" == "24.11" ]] && ((NODE_COUNT % 2 != 0)); then
    usage_error "slurm 24.11 here uses topology blocks of 2 nodes: --nodes must be even (got $NODE_COUNT)"
  fi
  installed || die "slurm $VERSION is not installed; run: tests/slurm/cluster.sh install --version $VERSION"
  if cluster_healthy; then
    echo "$STATE_DIR" >"$REGISTRY_FILE"
    log "already up ($NODE_COUNT nodes); state in $STATE_DIR"
    echo "$STATE_DIR"
    return 0
  fi
  if [[ -n "$(our_namespaces)" || -f "$STATE_DIR/$MARKER_FILE" ]] || has_hosts_entries; then
    log "removing a stale or different $CID cluster first"
    teardown
  fi
  [[ ! -e "$STATE_DIR" || -f "$STATE_DIR/$MARKER_FILE" || -z "$(ls -A "$STATE_DIR")" ]] \
    || die "--state-dir $STATE_DIR exists and is not a cluster.sh state dir; choose another"
  start="$(now)"
  mkdir -p "$STATE_DIR"
  touch "$STATE_DIR/$MARKER_FILE"
  trap up_failed EXIT
  write_slurm_conf
  write_munge_key
  create_network
  add_hosts_entries
  [[ -z "$ROOT" ]] || mount_chroot
  start_munged
  start_slurmctld
  start_slurmds
  wait_until "$TIMEOUT" "all $NODE_COUNT slurmd nodes to register as idle (sinfo)" all_nodes_usable \
    || die "nodes did not come up: $(node_states | tr '\n' ' ')"
  write_state
  trap - EXIT
  log "up: $NODE_COUNT nodes idle in $(elapsed_since "$start")s; wrappers in $BIN_DIR"
  echo "$STATE_DIR"
}

cmd_down() {
  require_root
  take_lock "$TIMEOUT"
  teardown
  rm -rf "$STATE_DIR.failed-logs"
  log "down: no $CID namespaces, processes, mounts or hosts lines left"
}

cmd_status() {
  NODE_COUNT="${NODE_COUNT:-$(recorded_node_count)}"
  if [[ -z "$NODE_COUNT" || ! -e "$NETNS_DIR/$CTL_NS" ]]; then
    echo "$CID: down"
    return 1
  fi
  echo "$CID: slurm $VERSION, state in $STATE_DIR, wrappers in $BIN_DIR"
  node_states | sed 's/^/  /'
  all_nodes_usable
}

main() {
  parse_args "$@"
  set_profile
  case "$COMMAND" in
    install) cmd_install ;;
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
  esac
}

main "$@"
