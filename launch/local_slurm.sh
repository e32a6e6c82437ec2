#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for CI and for trying esen-launch without a cluster.
#
#   launch/local_slurm.sh start    install what is missing, start everything, wait until jobs run
#   launch/local_slurm.sh stop     stop every daemon this script started (state is kept)
#   launch/local_slurm.sh status   say what runs and show the nodes
#
# It needs root and Debian's packages (slurm-wlm 22.05, munge, MariaDB), but no systemd: every
# daemon is started by hand, with its configuration, sockets, logs and data under one state
# directory ($ESEN_SLURM_DIR, default /tmp/esen-slurm) and on private ports from
# $ESEN_SLURM_PORT_BASE (default 16817, or the ports the state directory already uses), so a
# system-wide SLURM or MySQL is left alone and several clusters can run side by side.
#
#   munged      own key and socket                       $STATE_DIR/munge/
#   mariadbd    accounting database, 127.0.0.1 only       $STATE_DIR/mysql/
#   slurmdbd    accounting daemon (sacct, submitit's job states)
#   slurmctld   controller of cluster "esen"
#   slurmd      two nodes, esen-n1 and esen-n2 (2 CPUs each), one slurmd each, partition "debug"
#
# The node names resolve to 127.0.0.1 through /etc/hosts, so that a multi-node job finds its
# master address from the node list as it would on a real cluster.
# Clients (sbatch, srun, sacct, submitit, esen-launch) find the cluster through SLURM_CONF:
# `start` ends by printing the export line.
set -euo pipefail

STATE_DIR=${ESEN_SLURM_DIR:-/tmp/esen-slurm}
# The ports of an existing cluster win over the default, so that `start` with another
# environment never rewrites the configuration of a running cluster.
existing_port=$(sed -n 's/^SlurmctldPort=//p' "$STATE_DIR/etc/slurm.conf" 2>/dev/null || true)
PORT_BASE=${ESEN_SLURM_PORT_BASE:-${existing_port:-16817}}
CLUSTER=esen
NODES=(esen-n1 esen-n2)
CPUS_PER_NODE=2
MEMORY_MB_PER_NODE=8000

SLURMCTLD_PORT=$PORT_BASE
SLURMDBD_PORT=$((PORT_BASE + 1))
MYSQL_PORT=$((PORT_BASE + 2))
FIRST_SLURMD_PORT=$((PORT_BASE + 3))

ETC=$STATE_DIR/etc
RUN=$STATE_DIR/run
LOG=$STATE_DIR/log
MUNGE_DIR=$STATE_DIR/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
MYSQL_DIR=$STATE_DIR/mysql
MYSQL_SOCKET=$MYSQL_DIR/mysqld.sock
MYSQL_PASSWORD=esen-local-slurm
SLURM_CONF_FILE=$ETC/slurm.conf
SLURMDBD_CONF_FILE=$ETC/slurmdbd.conf
export SLURM_CONF=$SLURM_CONF_FILE

PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
HOSTS_MARKER="# esen-train local SLURM nodes"

log() { echo "local_slurm: $*" >&2; }
die() { log "error: $*"; exit 1; }

# --- helpers ---------------------------------------------------------------------------------

pid_alive() {  # pid_alive PIDFILE: the process named in PIDFILE runs
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_until() {  # wait_until SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.3 s
    local seconds=$1 description=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "timed out after ${seconds}s waiting for $description"
        sleep 0.3
    done
}

stop_daemons() {  # stop_daemons PIDFILE...: TERM them all at once, KILL what still runs after 15 s
    local pidfile pids=() names=()
    for pidfile in "$@"; do
        if pid_alive "$pidfile"; then
            pids+=("$(cat "$pidfile")")
            names+=("$(basename "$pidfile" .pid)")
            kill -TERM "${pids[-1]}"
        fi
        rm -f "$pidfile"
    done
    ((${#pids[@]} == 0)) && return 0
    local deadline=$((SECONDS + 15)) pid
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            log "pid $pid ignored TERM for 15 s, killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    log "stopped ${names[*]}"
}

# --- installation ----------------------------------------------------------------------------

install_packages() {
    local missing=() package
    for package in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" ||
            missing+=("$package")
    done
    ((${#missing[@]} == 0)) && return 0
    [[ $(id -u) == 0 ]] || die "installing ${missing[*]} needs root"
    log "installing ${missing[*]} (apt prints that policy-rc.d denied starting services: expected)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}

# --- configuration ---------------------------------------------------------------------------

write_file() {  # write_file PATH MODE < content: atomic, so a running daemon never reads half a file
    local path=$1 mode=$2
    cat >"$path.tmp"
    chmod "$mode" "$path.tmp"
    mv -f "$path.tmp" "$path"
}

write_slurm_conf() {
    local node_lines="" i
    for i in "${!NODES[@]}"; do
        node_lines+="NodeName=${NODES[$i]} NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=$((FIRST_SLURMD_PORT + i)) "
        node_lines+="CPUs=$CPUS_PER_NODE Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS_PER_NODE "
        node_lines+="ThreadsPerCore=1 RealMemory=$MEMORY_MB_PER_NODE State=UNKNOWN"$'\n'
    done
    local node_list
    node_list=$(IFS=,; echo "${NODES[*]}")
    # cred_expire=5 and the 5 s scheduler intervals make a requeued job start again within
    # seconds instead of the default two minutes (the requeue tests depend on it).
    write_file "$SLURM_CONF_FILE" 644 <<EOF
# Written by launch/local_slurm.sh; rewritten on every start.
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$SLURMCTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MailProg=/bin/true
KillWait=5
MinJobAge=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$SLURMDBD_PORT
# For slurmdbd connections this names the munge socket (AuthInfo covers only the cluster's own).
AccountingStoragePass=$MUNGE_SOCKET
JobCompType=jobcomp/none
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
DefMemPerCPU=1000
${node_lines}PartitionName=debug Nodes=$node_list Default=YES MaxTime=INFINITE State=UP
EOF
    # slurmdbd refuses a configuration file that others can read (it holds the database password).
    write_file "$SLURMDBD_CONF_FILE" 600 <<EOF
# Written by launch/local_slurm.sh; rewritten on every start.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$SLURMDBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=$MYSQL_PASSWORD
StorageLoc=slurm_acct_db
EOF
}

add_node_names_to_hosts() {
    local names=() name
    for name in "${NODES[@]}"; do
        getent hosts "$name" >/dev/null || names+=("$name")
    done
    ((${#names[@]} == 0)) && return 0
    printf '127.0.0.1 %s %s\n' "${names[*]}" "$HOSTS_MARKER" >>/etc/hosts
    log "added ${names[*]} to /etc/hosts"
}

# --- daemons ---------------------------------------------------------------------------------

start_munge() {
    mkdir -p "$MUNGE_DIR"
    chown munge:munge "$MUNGE_DIR"
    chmod 755 "$MUNGE_DIR"
    if [[ ! -s $MUNGE_DIR/munge.key ]]; then
        runuser -u munge -- mungekey --create --keyfile="$MUNGE_DIR/munge.key"
    fi
    pid_alive "$MUNGE_DIR/munged.pid" && return 0
    # munged only trusts a socket directory that is not group/world-writable: /tmp is, so the
    # socket lives in our own 755 directory (the key in it stays 600).
    runuser -u munge -- /usr/sbin/munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" --num-threads=10
    wait_until 10 munged munge --socket="$MUNGE_SOCKET" --string=ready
    log "started munged"
}

mysql_client() {
    mariadb --no-defaults --socket="$MYSQL_SOCKET" --user=root "$@"
}

start_mariadb() {
    mkdir -p "$MYSQL_DIR"
    chown mysql:mysql "$MYSQL_DIR"
    if [[ ! -d $MYSQL_DIR/data/mysql ]]; then
        mariadb-install-db --no-defaults --user=mysql --datadir="$MYSQL_DIR/data" \
            --auth-root-authentication-method=socket --skip-test-db >"$LOG/mariadb-install.log" 2>&1 ||
            die "mariadb-install-db failed, see $LOG/mariadb-install.log"
    fi
    if ! pid_alive "$MYSQL_DIR/mariadbd.pid"; then
        # A small buffer pool: the accounting tables of a test cluster are tiny (slurmdbd logs
        # that the value is below its recommendation; that is expected).
        /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$MYSQL_DIR/data" \
            --socket="$MYSQL_SOCKET" --port="$MYSQL_PORT" --bind-address=127.0.0.1 \
            --pid-file="$MYSQL_DIR/mariadbd.pid" --log-error="$LOG/mariadbd.log" \
            --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 --skip-name-resolve \
            </dev/null >/dev/null 2>&1 &
        wait_until 60 "MariaDB (see $LOG/mariadbd.log)" mysql_client -e "SELECT 1"
        log "started mariadbd on 127.0.0.1:$MYSQL_PORT"
    fi
    mysql_client <<EOF
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$MYSQL_PASSWORD';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
}

start_slurmdbd() {
    pid_alive "$RUN/slurmdbd.pid" && return 0
    # slurmdbd has no -f: it reads the slurmdbd.conf beside $SLURM_CONF.
    /usr/sbin/slurmdbd </dev/null >/dev/null 2>>"$LOG/slurmdbd.stderr" ||
        die "slurmdbd did not start, see $LOG/slurmdbd.log"
    wait_until 30 "slurmdbd (see $LOG/slurmdbd.log)" sacctmgr -n list cluster
    log "started slurmdbd on 127.0.0.1:$SLURMDBD_PORT"
}

register_cluster() {
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >&2
    fi
}

start_slurmctld() {
    pid_alive "$RUN/slurmctld.pid" && return 0
    /usr/sbin/slurmctld -f "$SLURM_CONF_FILE" </dev/null >/dev/null 2>>"$LOG/slurmctld.stderr" ||
        die "slurmctld did not start, see $LOG/slurmctld.log"
    wait_until 30 "slurmctld (see $LOG/slurmctld.log)" scontrol ping
    log "started slurmctld on 127.0.0.1:$SLURMCTLD_PORT"
}

start_slurmd() {  # start_slurmd NODE
    local node=$1
    mkdir -p "$STATE_DIR/slurmd-$node"
    pid_alive "$RUN/slurmd-$node.pid" && return 0
    /usr/sbin/slurmd -f "$SLURM_CONF_FILE" -N "$node" </dev/null >/dev/null 2>>"$LOG/slurmd-$node.stderr" ||
        die "slurmd for $node did not start, see $LOG/slurmd-$node.log"
    log "started slurmd for node $node"
}

nodes_up() {  # every node answers and takes jobs (not unknown, down or drained)
    [[ -z $(sinfo -h -N -o '%t' | grep -Ev '^(idle|alloc|mix|comp)$') ]]
}

cluster_runs_jobs() {  # srun waits for free nodes: bound each try
    timeout 20 srun --nodes=${#NODES[@]} --ntasks-per-node=1 --time=1 true
}

no_node_completing() {  # srun returns before slurmctld has cleaned up after the job
    [[ -z $(sinfo -h -N -o '%t' | grep '^comp') ]]
}

# --- commands --------------------------------------------------------------------------------

start() {
    [[ $(id -u) == 0 ]] || die "start needs root (it runs munged, MariaDB and the SLURM daemons)"
    install_packages
    mkdir -p "$ETC" "$RUN" "$LOG" "$STATE_DIR/slurmctld"
    # Reuse the running daemons, but only when they were started with this configuration:
    # SLURM re-reads slurm.conf only on restart.
    local previous=""
    [[ -f $SLURM_CONF_FILE ]] && previous=$(cat "$SLURM_CONF_FILE" "$SLURMDBD_CONF_FILE" 2>/dev/null || true)
    write_slurm_conf
    if [[ -n $previous && $previous != "$(cat "$SLURM_CONF_FILE" "$SLURMDBD_CONF_FILE")" ]]; then
        log "configuration changed: restarting the SLURM daemons"
        stop_slurm_daemons
    fi
    add_node_names_to_hosts
    start_munge
    start_mariadb
    start_slurmdbd
    register_cluster
    start_slurmctld
    local node
    for node in "${NODES[@]}"; do start_slurmd "$node"; done
    wait_until 60 "the nodes to come up (see $LOG/slurmd-*.log)" nodes_up
    # A first job proves the whole chain (munge, slurmd, slurmstepd); a busy cluster already has.
    if [[ -z $(squeue -h -o %i) ]]; then
        wait_until 60 "a test job to run (srun true)" cluster_runs_jobs
        wait_until 30 "the test job's clean-up on the nodes" no_node_completing
    fi
    log "cluster $CLUSTER is up: ${#NODES[@]} nodes x $CPUS_PER_NODE CPUs, partition debug"
    echo "export SLURM_CONF=$SLURM_CONF_FILE"
}

stop_slurm_daemons() {
    # slurmctld saves its state and reports to slurmdbd as it stops: slurmdbd goes last.
    local node slurmd_pidfiles=()
    for node in "${NODES[@]}"; do slurmd_pidfiles+=("$RUN/slurmd-$node.pid"); done
    stop_daemons "$RUN/slurmctld.pid" "${slurmd_pidfiles[@]}"
    stop_daemons "$RUN/slurmdbd.pid"
}

stop() {
    [[ -d $STATE_DIR ]] || { log "nothing to stop: $STATE_DIR does not exist"; return 0; }
    # Jobs still running would outlive their slurmd (slurmstepd keeps them): cancel them first.
    if pid_alive "$RUN/slurmctld.pid"; then
        scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    fi
    stop_slurm_daemons
    stop_daemons "$MYSQL_DIR/mariadbd.pid" "$MUNGE_DIR/munged.pid"
}

status() {
    local running=0 name pidfile
    local -A pidfiles=(
        [munged]=$MUNGE_DIR/munged.pid [mariadbd]=$MYSQL_DIR/mariadbd.pid
        [slurmdbd]=$RUN/slurmdbd.pid [slurmctld]=$RUN/slurmctld.pid
    )
    for name in "${NODES[@]}"; do pidfiles["slurmd-$name"]=$RUN/slurmd-$name.pid; done
    for name in munged mariadbd slurmdbd slurmctld "${NODES[@]/#/slurmd-}"; do
        pidfile=${pidfiles[$name]}
        if pid_alive "$pidfile"; then
            echo "$name: running (pid $(cat "$pidfile"))"
            running=$((running + 1))
        else
            echo "$name: stopped"
        fi
    done
    if ((running == ${#pidfiles[@]})); then
        sinfo -N -o '%N %P %t %c %m'
        echo "export SLURM_CONF=$SLURM_CONF_FILE"
        return 0
    fi
    return 1
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status   (state in \$ESEN_SLURM_DIR, default /tmp/esen-slurm)" >&2; exit 2 ;;
esac
