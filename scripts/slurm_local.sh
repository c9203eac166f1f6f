#!/usr/bin/env bash
# A one-node Slurm on loopback, started WITHOUT systemd: for tests, CI and local runs.
#
#   scripts/slurm_local.sh up      install packages if missing, start munged, slurmctld, slurmd,
#                                  wait until the node takes jobs (idempotent: fast when up)
#   scripts/slurm_local.sh down    cancel all jobs, stop slurmd, slurmctld and the munged we started
#   scripts/slurm_local.sh status  say what runs; exit 0 when the node takes jobs, 3 otherwise
#   scripts/slurm_local.sh clean   down, then remove the scratch folder (job state, logs)
#
# Environment:
#   PHI4_SLURM_DIR      scratch folder for config, state, spool, logs, pids (/tmp/phi4-slurm)
#   PHI4_SLURM_TIMEOUT  seconds to wait for the node to become ready (60)
#
# Config lives in $PHI4_SLURM_DIR/etc/slurm.conf; /etc/slurm/slurm.conf is made a symlink to it
# so that sbatch, squeue, scontrol... find it without SLURM_CONF (unless a real slurm.conf of
# someone else's is there: then it is left alone and you export SLURM_CONF yourself).
# Works with Debian 12 (Slurm 22.05) and Debian 13 (Slurm 24.11): only options both accept.
# No accounting (no slurmdbd): sacct does not work; use `scontrol show job` (MinJobAge=3600)
# or the jobcomp/filetxt file $PHI4_SLURM_DIR/log/jobcomp.txt.
set -euo pipefail

DIR="${PHI4_SLURM_DIR:-/tmp/phi4-slurm}"
TIMEOUT="${PHI4_SLURM_TIMEOUT:-60}"
CONF="$DIR/etc/slurm.conf"
ETC_CONF=/etc/slurm/slurm.conf
MARK="# Written by phi4 scripts/slurm_local.sh"
PKGS=(slurmctld slurmd slurm-client munge)
OPTIONAL_PKGS=(slurm-wlm-basic-plugins)
MUNGE_KEY=/etc/munge/munge.key
MUNGE_PIDFILE=/run/munge/munged.pid
export SLURM_CONF="$CONF"
# The daemons, runuser and apt's helpers live in sbin, which a non-login PATH may lack.
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="$PATH:/usr/sbin:/sbin" ;; esac

T0=$(date +%s.%N)
say() { echo "slurm_local: $*"; }
err() { echo "slurm_local: ERROR: $*" >&2; }
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

log_tails() {
    local f files=("$DIR/log/munged.out" "$DIR/log/slurmctld.out" "$DIR/log/slurmctld.log"
                   "$DIR/log/slurmd.out" "$DIR/log/slurmd.log")
    munge_ok || files+=(/var/log/munge/munged.log)
    for f in "${files[@]}"; do
        if [[ -s "$f" ]]; then
            echo "----- last lines of $f -----" >&2
            tail -n 15 "$f" >&2
        fi
    done
}

die() { err "$*"; log_tails; exit 1; }

# pid_alive PIDFILE NAME: prints the pid and succeeds when the file names a live process NAME.
pid_alive() {
    local pid
    [[ -r "$1" ]] || return 1
    pid=$(tr -dc '0-9' <"$1")
    [[ -n "$pid" && -r "/proc/$pid/comm" ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2" ]] || return 1
    echo "$pid"
}

# procs_named NAME: pids of processes whose command name is NAME (pgrep -x without procps).
procs_named() {
    local d c
    for d in /proc/[0-9]*; do
        read -r c <"$d/comm" 2>/dev/null || continue
        [[ "$c" == "$1" ]] && echo "${d#/proc/}"
    done
    return 0
}

# stop_pids PID NAME [PID NAME...]: SIGTERM to all, wait up to 15 s, then SIGKILL.
stop_pids() {
    local -a pids=() names=()
    local i j left
    while (($# >= 2)); do
        pids+=("$1") names+=("$2")
        kill -TERM "$1" 2>/dev/null || true
        shift 2
    done
    for ((i = 0; i < 150; i++)); do
        left=0
        for j in "${!pids[@]}"; do [[ -d "/proc/${pids[j]}" ]] && left=1; done
        ((left)) || break
        sleep 0.1
    done
    for j in "${!pids[@]}"; do
        if [[ -d "/proc/${pids[j]}" ]]; then
            err "${names[j]} (pid ${pids[j]}) ignored SIGTERM for 15 s: killing it"
            kill -KILL "${pids[j]}" 2>/dev/null || true
        else
            say "stopped ${names[j]} (pid ${pids[j]})"
        fi
    done
}

as_root() {
    if [[ $EUID -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then
            exec sudo -E "$0" "$@"
        fi
        err "must run as root (or with sudo available)"
        exit 1
    fi
}

# ---------------------------------------------------------------------------------------------
# Packages
# ---------------------------------------------------------------------------------------------

pkgs_missing() {
    local p
    for p in "$@"; do
        [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" == *" installed" ]] || echo "$p"
    done
}

# (Output is captured before matching: grep -q closing a pipe early trips pipefail.)
has_candidate() {
    local out
    out=$(apt-cache policy "$1" 2>/dev/null || true)
    [[ "$out" =~ Candidate:\ [^\(] ]]
}

install_packages() {
    local missing p optional=() rc=0 made_policy=0 apt_opts
    mapfile -t missing < <(pkgs_missing "${PKGS[@]}")
    mapfile -t optional < <(pkgs_missing "${OPTIONAL_PKGS[@]}")
    if [[ ${#missing[@]} -eq 0 ]] && [[ ${#optional[@]} -eq 0 || -e /usr/sbin/slurmctld ]]; then
        # slurm-wlm-basic-plugins comes with slurmctld on every release we know; do not
        # insist on it by name once the daemons are installed.
        return 0
    fi
    missing+=("${optional[@]}")
    command -v apt-get >/dev/null || die "Slurm is not installed and apt-get is missing: install ${missing[*]}"
    say "installing ${missing[*]} (Debian $(cat /etc/debian_version 2>/dev/null || echo '?'))"
    export DEBIAN_FRONTEND=noninteractive
    apt_opts=(-y -q --no-install-recommends -o DPkg::Lock::Timeout=300 -o Dpkg::Use-Pty=0
              -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    local need_update=0
    for p in "${missing[@]}"; do has_candidate "$p" || need_update=1; done
    if [[ $need_update -eq 1 ]]; then
        say "apt-get update (package lists lack some of them)"
        apt-get -q -o DPkg::Lock::Timeout=300 update >"$DIR/log/apt.log" 2>&1 \
            || { tail -n 20 "$DIR/log/apt.log" >&2; die "apt-get update failed"; }
    fi
    # Drop optional packages this release does not know (a newer Debian may fold them).
    local want=()
    for p in "${missing[@]}"; do
        if [[ " ${OPTIONAL_PKGS[*]} " == *" $p "* ]] && ! has_candidate "$p"; then
            say "note: $p is not in this release's lists; skipping it"
            continue
        fi
        want+=("$p")
    done
    # Package scripts must not try to start daemons (no init system here); Docker images
    # usually ship such a policy already.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    apt-get install "${apt_opts[@]}" "${want[@]}" >>"$DIR/log/apt.log" 2>&1 || rc=$?
    if [[ $rc -ne 0 && $need_update -eq 0 ]]; then
        say "install failed; retrying after apt-get update (stale package lists?)"
        rc=0
        { apt-get -q -o DPkg::Lock::Timeout=300 update &&
          apt-get install "${apt_opts[@]}" "${want[@]}"; } >>"$DIR/log/apt.log" 2>&1 || rc=$?
    fi
    [[ $made_policy -eq 1 ]] && rm -f /usr/sbin/policy-rc.d
    if [[ $rc -ne 0 ]]; then
        tail -n 30 "$DIR/log/apt.log" >&2
        die "apt-get install ${want[*]} failed (full log: $DIR/log/apt.log)"
    fi
    say "installed in $(elapsed) s: $(slurmctld -V 2>/dev/null || echo '?')"
}

# ---------------------------------------------------------------------------------------------
# munge
# ---------------------------------------------------------------------------------------------

munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_ok; then
        return 0
    fi
    id munge >/dev/null 2>&1 || die "user munge is missing (is the munge package installed?)"
    install -d -m 0700 -o munge -g munge /etc/munge
    if [[ ! -s "$MUNGE_KEY" ]]; then
        say "writing a new munge key to $MUNGE_KEY"
        (umask 077 && dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none)
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
    # Without systemd's tmpfiles nobody makes /run/munge; munged insists on owners and modes.
    install -d -m 0755 -o munge -g munge /run/munge
    for d in /var/lib/munge /var/log/munge; do
        [[ -d "$d" ]] || install -d -m 0700 -o munge -g munge "$d"
    done
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged </dev/null >"$DIR/log/munged.out" 2>&1 9>&- \
        || die "munged failed to start"
    local i
    for ((i = 0; i < 50; i++)); do
        if munge_ok; then
            local pid
            pid=$(pid_alive "$MUNGE_PIDFILE" munged || true)
            echo "${pid:-}" >"$DIR/run/munged.ours"
            return 0
        fi
        sleep 0.1
    done
    die "munged does not answer (munge -n | unmunge fails)"
}

# ---------------------------------------------------------------------------------------------
# slurm.conf
# ---------------------------------------------------------------------------------------------

write_conf() {   # writes the wanted config to $1
    local out=$1 line kv key val host layout=() mem=0 cpus=1 headroom conf_mem defmem
    line=$(slurmd -C 2>/dev/null || true)
    line=$(sed -n '/^NodeName=/{p;q}' <<<"$line")
    [[ -n "$line" ]] || die "slurmd -C printed no node line"
    host=$(hostname -s 2>/dev/null || uname -n)
    host=${host%%.*}
    for kv in $line; do
        key=${kv%%=*} val=${kv#*=}
        case $key in
            NodeName) host=$val ;;
            CPUs) cpus=$val; layout+=("$kv") ;;
            Boards | SocketsPerBoard | CoresPerSocket | ThreadsPerCore) layout+=("$kv") ;;
            RealMemory) mem=$val ;;
        esac
    done
    # Headroom: 10% of memory, at least 256 MB and at most 4 GB. A node whose measured memory
    # falls under RealMemory is drained ("Low RealMemory").
    headroom=$((mem / 10))
    ((headroom < 256)) && headroom=256
    ((headroom > 4096)) && headroom=4096
    conf_mem=$((mem - headroom))
    ((conf_mem < 256)) && conf_mem=256
    # Jobs that do not ask for memory get this much per CPU: small enough that memory is never
    # what keeps several jobs from running at once.
    defmem=$((conf_mem / cpus))
    ((defmem > 1024)) && defmem=1024
    cat >"$out" <<EOF
$MARK: a one-node Slurm on loopback.
# Regenerated by every \`up\`; edits are lost. Options kept to those Slurm 22.05 and 24.11 share.
ClusterName=phi4local
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: works in containers and on machines without systemd.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# Several jobs at once: cores and memory are the consumable resources.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$defmem
# Start jobs as soon as they are submitted or resources free up (the default delays batch
# jobs by up to 3 s, which a test suite of chained jobs pays on every link).
SchedulerParameters=batch_sched_delay=0
MailProg=/bin/true
ReturnToService=2
# Finished jobs stay visible to \`scontrol show job\` for an hour (there is no sacct).
MinJobAge=3600
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
InactiveLimit=0
KillWait=10
SlurmctldTimeout=60
SlurmdTimeout=60
Waittime=0
NodeName=$host NodeAddr=127.0.0.1 NodeHostname=$host ${layout[*]} RealMemory=$conf_mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

# Slurm from 24.05 on initialises a cgroup plugin in slurmd even when no plugin uses cgroups,
# and that can fail without systemd or in containers; only these releases know "disabled".
# Earlier ones (22.05 on Debian 12) autodetect, which works here, and get no cgroup.conf.
write_cgroup_conf() {   # writes cgroup.conf to $1 when this Slurm needs one
    local v major minor
    v=$(slurmd -V 2>/dev/null || true)
    v=${v##* }
    major=${v%%.*}
    minor=${v#*.}
    minor=${minor%%.*}
    rm -f "$1"
    if [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]] && ((10#$major * 100 + 10#$minor >= 2405)); then
        printf '%s\nCgroupPlugin=disabled\n' "$MARK (Slurm $v: no cgroups)" >"$1"
    fi
}

# update_file NEW DEST: replaces DEST by NEW when they differ; succeeds when DEST changed.
update_file() {
    if [[ -f "$2" ]] && cmp -s "$1" "$2"; then
        rm -f "$1"
        return 1
    fi
    mv -f "$1" "$2"
}

link_etc_conf() {
    if [[ -L "$ETC_CONF" && "$(readlink "$ETC_CONF")" == "$CONF" ]]; then
        return 0
    fi
    if [[ -e "$ETC_CONF" && ! -L "$ETC_CONF" ]] && ! grep -qF "$MARK" "$ETC_CONF"; then
        err "$ETC_CONF exists and is not ours: leaving it; clients need: export SLURM_CONF=$CONF"
        return 0
    fi
    mkdir -p "$(dirname "$ETC_CONF")"
    ln -sfn "$CONF" "$ETC_CONF"
}

node_name() { sed -n 's/^NodeName=\([^ ]*\) .*/\1/p' "$CONF" 2>/dev/null | sed -n 1p; }

# node_state: the node's state as sinfo prints it (idle, mixed, idle*, down*, drained...).
node_state() { sinfo -h -N -n "$(node_name)" -o '%T' 2>/dev/null | sed -n 1p; }

node_ready() {
    case "$(node_state)" in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

# Epoch seconds at which the node's slurmd last registered with the controller (0 if unknown).
slurmd_registered_at() {
    local out t
    out=$(scontrol show node "$(node_name)" 2>/dev/null || true)
    t=$(sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p' <<<"$out")
    date -d "$t" +%s 2>/dev/null || echo 0
}

ctld_up() { [[ "$(scontrol ping 2>/dev/null || true)" == *"is UP"* ]]; }

# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

cmd_up() {
    mkdir -p "$DIR"/{etc,state,spool,log,run}
    chmod 0755 "$DIR"
    exec 9>"$DIR/run/lock"
    flock -w 600 9 || die "another slurm_local.sh holds $DIR/run/lock"

    install_packages
    start_munge

    local changed=0 ctld_pid="" slurmd_pid="" name pid ppid state other
    ctld_pid=$(pid_alive "$DIR/run/slurmctld.pid" slurmctld || true)
    slurmd_pid=$(pid_alive "$DIR/run/slurmd.pid" slurmd || true)
    # Daemons from another scratch folder or a system install: refuse before touching config.
    for name in slurmctld slurmd; do
        for pid in $(procs_named "$name"); do
            [[ "$pid" == "$ctld_pid" || "$pid" == "$slurmd_pid" ]] && continue
            # Our daemons' own children (slurmscriptd, a forking slurmd) briefly bear the name.
            # So does the zombie that daemonizing leaves until init reaps it.
            read -r _ _ state ppid _ <"/proc/$pid/stat" 2>/dev/null || continue
            [[ "$state" == Z || "$ppid" == "$ctld_pid" || "$ppid" == "$slurmd_pid" ]] && continue
            other=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)
            err "a $name not started from $DIR runs: pid $pid: $other"
            err "stop it first (e.g. PHI4_SLURM_DIR=<its folder> $0 down)"
            exit 1
        done
    done

    write_conf "$CONF.new"
    update_file "$CONF.new" "$CONF" && changed=1
    write_cgroup_conf "$DIR/etc/cgroup.conf.new"
    if [[ -f "$DIR/etc/cgroup.conf.new" ]]; then
        update_file "$DIR/etc/cgroup.conf.new" "$DIR/etc/cgroup.conf" && changed=1
    elif [[ -f "$DIR/etc/cgroup.conf" ]]; then
        rm -f "$DIR/etc/cgroup.conf"
        changed=1
    fi
    link_etc_conf

    if [[ $changed -eq 1 && ( -n "$ctld_pid" || -n "$slurmd_pid" ) ]]; then
        say "configuration changed: restarting the daemons"
        # shellcheck disable=SC2086
        stop_pids ${slurmd_pid:+$slurmd_pid slurmd} ${ctld_pid:+$ctld_pid slurmctld}
        ctld_pid="" slurmd_pid=""
    fi
    if [[ -n "$ctld_pid" && -n "$slurmd_pid" ]] && ctld_up && node_ready; then
        say "already up (slurmctld $ctld_pid, slurmd $slurmd_pid, node $(node_name) $(node_state)) in $(elapsed) s"
        return 0
    fi

    if [[ -z "$ctld_pid" ]]; then
        say "starting slurmctld"
        slurmctld -f "$CONF" </dev/null >"$DIR/log/slurmctld.out" 2>&1 9>&- \
            || die "slurmctld failed to start"
    fi
    local slurmd_started=0
    if [[ -z "$slurmd_pid" ]]; then
        slurmd_started=$(date +%s)
        say "starting slurmd"
        slurmd -f "$CONF" </dev/null >"$DIR/log/slurmd.out" 2>&1 9>&- || die "slurmd failed to start"
    fi

    local deadline resumed=0 state
    deadline=$(($(date +%s) + TIMEOUT))
    while :; do
        if ctld_up; then
            state=$(node_state)
            case "$state" in
                idle | mixed | allocated | completing)
                    # The controller restores the node's last state from its state files: a
                    # fresh slurmd counts only once it has registered.
                    (($(slurmd_registered_at) >= slurmd_started)) && break ;;
                drain* | down | fail)
                    # A state saved from an earlier run (e.g. drained on a memory change).
                    if [[ $resumed -eq 0 ]]; then
                        say "node $(node_name) is $state: resuming it"
                        scontrol update NodeName="$(node_name)" State=RESUME >/dev/null 2>&1 || true
                        resumed=1
                    fi ;;
            esac
        fi
        if (($(date +%s) >= deadline)); then
            pid_alive "$DIR/run/slurmctld.pid" slurmctld >/dev/null || err "slurmctld is not running"
            pid_alive "$DIR/run/slurmd.pid" slurmd >/dev/null || err "slurmd is not running"
            sinfo -N -l >&2 2>/dev/null || true
            die "node not ready after ${TIMEOUT} s (state: ${state:-controller down})"
        fi
        sleep 0.2
    done
    say "up in $(elapsed) s: node $(node_name) $(node_state), $(sinfo -h -N -o '%c CPUs, %m MB' | sed -n 1p); config $CONF"
}

cmd_down() {
    local pid ids i
    if [[ -d "$DIR/run" ]]; then
        exec 9>"$DIR/run/lock"
        flock -w 600 9 || die "another slurm_local.sh holds $DIR/run/lock"
    fi
    if pid_alive "$DIR/run/slurmctld.pid" slurmctld >/dev/null && ctld_up; then
        ids=$(squeue -h -o '%i' 2>/dev/null | tr '\n' ' ')
        if [[ -n "${ids// /}" ]]; then
            say "cancelling jobs: $ids"
            # shellcheck disable=SC2086
            scancel $ids 2>/dev/null || true
            for ((i = 0; i < 150; i++)); do
                [[ -z "$(squeue -h -t RUNNING,COMPLETING,CONFIGURING -o '%i' 2>/dev/null)" ]] && break
                sleep 0.1
            done
        fi
    fi
    local daemons=()
    if pid=$(pid_alive "$DIR/run/slurmd.pid" slurmd); then daemons+=("$pid" slurmd); fi
    if pid=$(pid_alive "$DIR/run/slurmctld.pid" slurmctld); then daemons+=("$pid" slurmctld); fi
    ((${#daemons[@]} == 0)) || stop_pids "${daemons[@]}"
    # munged only when this script started it (never a system munged that was there before).
    if [[ -r "$DIR/run/munged.ours" ]]; then
        local ours
        ours=$(tr -dc '0-9' <"$DIR/run/munged.ours")
        if [[ -n "$ours" ]] && pid=$(pid_alive "$MUNGE_PIDFILE" munged) && [[ "$pid" == "$ours" ]]; then
            stop_pids "$pid" munged
        fi
        rm -f "$DIR/run/munged.ours"
    fi
    say "down in $(elapsed) s"
}

cmd_status() {
    local pid ok=0
    if pid=$(pid_alive "$MUNGE_PIDFILE" munged) || munge_ok; then
        say "munged:    running${pid:+ (pid $pid)}"
    else
        say "munged:    not running"; ok=3
    fi
    if pid=$(pid_alive "$DIR/run/slurmctld.pid" slurmctld); then
        say "slurmctld: running (pid $pid) $(slurmctld -V 2>/dev/null)"
    else
        say "slurmctld: not running"; ok=3
    fi
    if pid=$(pid_alive "$DIR/run/slurmd.pid" slurmd); then
        say "slurmd:    running (pid $pid)"
    else
        say "slurmd:    not running"; ok=3
    fi
    say "config:    $CONF$([[ -L $ETC_CONF ]] && echo " (linked from $ETC_CONF)")"
    if command -v scontrol >/dev/null && [[ -f "$CONF" ]] && ctld_up; then
        scontrol ping
        sinfo -N -o '%N %P %T %c %m'
        squeue -o '%.8i %.9P %.20j %.8T %.10M %R'
        node_ready || ok=3
    else
        ok=3
    fi
    if [[ $ok -eq 0 ]]; then say "status: up"; else say "status: not up"; fi
    return $ok
}

cmd_clean() {
    cmd_down
    if [[ -L "$ETC_CONF" && "$(readlink "$ETC_CONF")" == "$CONF" ]]; then
        rm -f "$ETC_CONF"
    fi
    rm -rf "$DIR"
    say "removed $DIR"
}

main() {
    [[ $# -eq 1 ]] || usage
    case "$1" in
        up) as_root "$@"; cmd_up ;;
        down) as_root "$@"; cmd_down ;;
        status) cmd_status ;;
        clean) as_root "$@"; cmd_clean ;;
        *) usage ;;
    esac
}

main "$@"
