# Helpers of deploy/compose/smoke (sourced; not run on its own). Globals they share with the
# script: here, root, work, project, compose, bin, key, base_image, recovery_limit_ms.

# --- steps, summary, cleanup -------------------------------------------------------------------

now_ms() { date +%s%3N; }

smoke_started=$(now_ms)
step_lines=()
step_name=""
step_started=0
cluster_up=0
smoke_passed=0
dockerd_pid=""
traffic_pid=""
follower_pid=""

# begin NAME: a step starts.
begin() {
    step_name=$1
    step_started=$(now_ms)
    echo "== $step_name" >&2
}

# elapsed SINCE_MS: seconds since then, e.g. "  12.3s".
elapsed() { awk -v a="$1" -v b="$(now_ms)" 'BEGIN { printf "%6.1fs", (b - a) / 1000 }'; }

# pass DETAIL: the current step succeeded.
pass() {
    local line
    line="ok   $(elapsed "$step_started")  $step_name: $1"
    step_lines+=("$line")
    echo "   $1" >&2
}

# fail MESSAGE: the current step failed; the EXIT trap cleans up and prints the summary.
fail() {
    step_lines+=("FAIL $(elapsed "$step_started")  $step_name: $1")
    echo "smoke: FAILED: $step_name: $1" >&2
    exit 1
}

# skipped MESSAGE: something the smoke could not do here, said in the summary.
skipped() {
    step_lines+=("skip           $1")
    echo "   skipped: $1" >&2
}

summary() {
    echo
    echo "== smoke summary (project $project, work directory $work)"
    printf '%s\n' "${step_lines[@]}"
    if [ "$smoke_passed" = 1 ]; then
        echo "smoke: passed in $(elapsed "$smoke_started" | tr -d ' ')"
    else
        echo "smoke: FAILED after $(elapsed "$smoke_started" | tr -d ' ')"
    fi
}

# Stops what the smoke started, by process id: background clients, the cluster, dockerd.
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    stop_traffic 2>/dev/null || true
    stop_follower 2>/dev/null || true
    if [ "$cluster_up" = 1 ]; then
        if [ "$smoke_passed" != 1 ]; then
            echo "== last log lines of every service" >&2
            timeout 60 "${compose[@]}" -p "$project" -f "$here/compose.yaml" logs --no-color \
                --tail=25 >&2 2>/dev/null || true
        fi
        if [ "${SMOKE_KEEP:-0}" != 1 ]; then
            timeout 180 "${compose[@]}" -p "$project" -f "$here/compose.yaml" down -v \
                --remove-orphans >/dev/null 2>&1 || echo "smoke: docker compose down -v failed" >&2
        fi
    fi
    if [ -n "$dockerd_pid" ] && [ "${SMOKE_KEEP:-0}" != 1 ]; then
        kill -TERM "$dockerd_pid" 2>/dev/null || true
        local deadline=$(($(now_ms) + 30000))
        while kill -0 "$dockerd_pid" 2>/dev/null && [ "$(now_ms)" -lt "$deadline" ]; do
            sleep 0.2
        done
        kill -0 "$dockerd_pid" 2>/dev/null && echo "smoke: dockerd did not stop within 30s" >&2
    fi
    summary
    if [ "$smoke_passed" = 1 ] && [ "$status" = 0 ]; then
        rm -rf "$work"
    else
        [ "$status" != 0 ] || status=1
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- tools -----------------------------------------------------------------------------------

apt_updated=0
# install_packages PKG...: Debian packages, as root, unless SMOKE_INSTALL=0.
install_packages() {
    if [ "${SMOKE_INSTALL:-1}" = 0 ] || [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        fail "missing: $* (install these Debian packages, or run as root to let the smoke do it)"
    fi
    echo "   installing $* (apt-get)" >&2
    if [ "$apt_updated" = 0 ]; then
        apt-get update -qq >"$work/apt.log" 2>&1 || { cat "$work/apt.log" >&2; fail "apt-get update"; }
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >>"$work/apt.log" 2>&1 ||
        { tail -n 20 "$work/apt.log" >&2; fail "apt-get install $*"; }
}

compose_version() { "${compose[@]}" version --short 2>/dev/null || echo "?"; }

# wait_for SECONDS WHAT COMMAND...: runs COMMAND until it succeeds; fails past the deadline.
wait_for() {
    local limit=$1 what=$2
    shift 2
    local deadline=$(($(now_ms) + limit * 1000))
    until "$@" >/dev/null 2>&1; do
        if [ "$(now_ms)" -ge "$deadline" ]; then
            echo "smoke: gave up after ${limit}s waiting for $what" >&2
            return 1
        fi
        sleep 0.2
    done
}

# --- images ----------------------------------------------------------------------------------

# provide_image REF BUILDER: prints REF when present or pulled, else the image BUILDER makes.
provide_image() {
    local ref=$1 builder=$2
    if docker image inspect "$ref" >/dev/null 2>&1; then
        echo "$ref"
        return
    fi
    if [ "${SMOKE_PULL:-1}" != 0 ] && timeout 120 docker pull -q "$ref" >/dev/null 2>&1; then
        echo "$ref"
        return
    fi
    [ -n "$builder" ] || return 1
    echo "   no registry answers for $ref: making a local image" >&2
    "$builder"
}

# Debian 12 (minbase) from Debian's mirror, imported as an image (about a minute), once.
debian_from_debootstrap() {
    local name=qpq-local/debian:bookworm dir
    if ! docker image inspect "$name" >/dev/null 2>&1; then
        command -v debootstrap >/dev/null || install_packages debootstrap
        dir=$work/rootfs
        debootstrap --variant=minbase bookworm "$dir" http://deb.debian.org/debian \
            >"$work/debootstrap.log" 2>&1 || { tail -n 20 "$work/debootstrap.log" >&2; return 1; }
        # Slim like Debian's official images: no documentation, no apt caches in layers.
        rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/cache/apt/*.bin \
            "$dir"/var/lib/apt/lists/* "$dir"/usr/share/doc/* "$dir"/usr/share/man/* \
            "$dir"/usr/share/info/*
        printf '%s\n' 'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };' \
            'Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";' >"$dir/etc/apt/apt.conf.d/docker-clean"
        printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
            'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' \
            >"$dir/etc/dpkg/dpkg.cfg.d/excludes"
        tar -C "$dir" -c . | docker import - "$name" >/dev/null || return 1
        rm -rf "$dir"
    fi
    echo "$name"
}

# local_image NAME DIR: builds local-images/DIR on the Debian base (layer-cached after once).
local_image() {
    docker build -q --build-arg BASE_IMAGE="$base_image" -t "$1" "$here/local-images/$2" \
        >"$work/build-$2.log" 2>&1 || { cat "$work/build-$2.log" >&2; return 1; }
    echo "$1"
}
local_postgres() { local_image qpq-local/postgres:15-bookworm postgres; }
local_prometheus() { local_image qpq-local/prometheus:bookworm prometheus; }

image_mb() { echo $(($(docker image inspect -f '{{.Size}}' "$1") / 1000000)); }

# --- the cluster -----------------------------------------------------------------------------

dc() { timeout 300 "${compose[@]}" -p "$project" -f "$here/compose.yaml" "$@"; }

# cids SERVICE: the service's container ids (stopped ones too), by replica number.
cids() {
    docker ps -a --filter "label=com.docker.compose.project=$project" \
        --filter "label=com.docker.compose.service=$1" \
        --format '{{.Label "com.docker.compose.container-number"}} {{.ID}}' | sort -n | cut -d' ' -f2
}

nodes() { for s in shard-0 shard-1 shard-2 edge; do cids "$s"; done; }

all_healthy() {
    local s c n=0
    for s in "$@"; do
        for c in $(cids "$s"); do
            [ "$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$c")" = healthy ] || return 1
            n=$((n + 1))
        done
    done
    [ "$n" -ge "$#" ]
}

# wait_healthy SECONDS SERVICE...: every container of every SERVICE passes its health check.
wait_healthy() {
    local limit=$1
    shift
    wait_for "$limit" "$* to be healthy" all_healthy "$@" || {
        docker ps -a --filter "label=com.docker.compose.project=$project" \
            --format '{{.Names}} {{.Status}}' >&2
        fail "not healthy within ${limit}s"
    }
}

# readyz CID: the node's /readyz, as "CODE BODY", asked from inside its container.
readyz() {
    timeout 10 docker exec "$1" bash -c 'exec 3<>/dev/tcp/127.0.0.1/9090 &&
        printf "GET /readyz HTTP/1.0\r\n\r\n" >&3 && cat <&3' 2>/dev/null |
        tr -d '\r' | awk 'NR == 1 { code = $2 } body { print code, $0; exit } /^$/ { body = 1 }'
}

# readyz_all CODE TEXT: every node answers CODE with a body starting with TEXT.
readyz_all() {
    local c answer bad=0
    for c in $(nodes); do
        answer=$(readyz "$c")
        case $answer in
            "$1 $2"*) ;;
            *) echo "   $(docker inspect -f '{{.Name}}' "$c"): /readyz: ${answer:-no answer}" >&2; bad=1 ;;
        esac
    done
    return "$bad"
}

edges_say_no_live_shard() {
    local c
    for c in $(cids edge); do
        [[ $(readyz "$c") == "503 not ready: no live shard"* ]] || return 1
    done
}

# edge_addrs: E1..E3 and EDGES, the edges' published client ports (127.0.0.1:PORT).
edge_addrs() {
    local c list=()
    for c in $(cids edge); do
        list+=("$(docker port "$c" 7000/tcp | head -n 1)")
    done
    [ "${#list[@]}" = 3 ] || fail "expected 3 edges, found ${#list[@]}"
    E1=${list[0]} E2=${list[1]} E3=${list[2]}
    EDGES=$(IFS=,; echo "${list[*]}")
    edge2_cid=$(cids edge | sed -n 2p)
}

# --- clients ---------------------------------------------------------------------------------

# qpq_as USER SERVERS ARGS...: the qpq client with USER's state file.
qpq_as() {
    local user=$1 servers=$2
    shift 2
    "$bin/qpq" --server "$servers" --server-key "$key" --state "$work/$user.bin" "$@"
}

# expect_in OUTPUT TEXT: OUTPUT contains TEXT, or says what it holds instead.
expect_in() {
    [[ $1 == *"$2"* ]] || { echo "   expected \"$2\" in: $1" >&2; return 1; }
}

chat_walkthrough() {
    local out
    qpq_as alice "$E1" register --name alice >/dev/null &&
        qpq_as bob "$E2" register --name bob >/dev/null &&
        qpq_as carol "$E2" register --name carol >/dev/null || return 1
    out=$(qpq_as alice "$E1" --json create-group friends) || return 1
    gid=$(sed -n 's/.*"id":"\([0-9a-f]*\)".*/\1/p' <<<"$out")
    [ -n "$gid" ] || { echo "   no group id in: $out" >&2; return 1; }
    out=$(qpq_as alice "$E1" invite friends bob carol) && expect_in "$out" "added bob, carol" || return 1
    out=$(qpq_as bob "$E2" join) && expect_in "$out" "joined group" || return 1
    out=$(qpq_as carol "$E2" join) && expect_in "$out" "joined group" || return 1
    qpq_as alice "$E1" send friends "hello from alice" >/dev/null || return 1
    out=$(qpq_as bob "$E2" recv) && expect_in "$out" "alice: hello from alice" || return 1
    qpq_as bob "$E2" send "$gid" "hi from bob" >/dev/null || return 1
    out=$(qpq_as carol "$E2" recv) && expect_in "$out" "alice: hello from alice" &&
        expect_in "$out" "bob: hi from bob" || return 1
    qpq_as carol "$E2" send "$gid" "hey from carol" >/dev/null || return 1
    out=$(qpq_as alice "$E1" recv) && expect_in "$out" "bob: hi from bob" &&
        expect_in "$out" "carol: hey from carol" || return 1
    out=$(qpq_as bob "$E2" recv) && expect_in "$out" "carol: hey from carol"
}

# owner_service GROUP: the compose service of the shard that owns GROUP on the ring.
owner_service() {
    local ring node addr
    ring=$(timeout 30 docker exec "$(cids shard-0)" qpq-server ring --group "$1") || return 1
    node=$(awk '$1 == "group" && $3 == "owner" { print $4 }' <<<"$ring")
    addr=$(awk -v n="$node" '$1 == "shard" && $2 == n { print $3 }' <<<"$ring")
    [ -n "$addr" ] || { echo "   no owner in: $ring" >&2; return 1; }
    echo "${addr%%:*}"
}

# start_follower SERVERS: carol's `recv --follow` in the background, live once it has
# received a message alice sends after it started.
start_follower() {
    # The binary itself in the background (not through a function, whose subshell would get
    # the signal instead), so that stop_follower ends it.
    "$bin/qpq" --server "$1" --server-key "$key" --state "$work/carol.bin" --json recv --follow \
        >"$work/follow.jsonl" 2>"$work/follow.err" &
    follower_pid=$!
    qpq_as alice "$E1" send "$gid" "warm-up" >/dev/null || return 1
    wait_for 30 "the follower to receive warm-up" grep -q '"text":"warm-up"' "$work/follow.jsonl"
}

stop_follower() {
    [ -n "$follower_pid" ] || return 0
    kill -TERM "$follower_pid" 2>/dev/null || true
    wait "$follower_pid" 2>/dev/null || true
    follower_pid=""
}

# start_traffic SERVERS: alice sends m-0001, m-0002, ... one after another until told to stop;
# each is logged in sent.log as "ok m-N" (acknowledged) or "fail m-N".
start_traffic() {
    : >"$work/sent.log"
    rm -f "$work/stop-traffic"
    (
        set +e
        n=0
        while [ ! -e "$work/stop-traffic" ] && [ "$n" -lt 2000 ]; do
            n=$((n + 1))
            msg=$(printf 'm-%04d' "$n")
            if qpq_as alice "$1" --timeout 5s send "$gid" "$msg" >/dev/null 2>>"$work/traffic.err"; then
                echo "ok $msg $(date +%T.%3N)" >>"$work/sent.log"
            else
                echo "fail $msg $(date +%T.%3N)" >>"$work/sent.log"
            fi
        done
    ) &
    traffic_pid=$!
}

acks() { grep -c '^ok' "$work/sent.log" || true; }

# wait_acks N SECONDS: at least N sends acknowledged.
wait_acks() { wait_for "$2" "$1 acknowledged sends" test_acks "$1"; }
test_acks() { [ "$(acks)" -ge "$1" ]; }

stop_traffic() {
    [ -n "$traffic_pid" ] || return 0
    touch "$work/stop-traffic"
    # Bounded: each send gives up after its 5 s timeout.
    wait "$traffic_pid" 2>/dev/null || true
    traffic_pid=""
}

# The traffic messages in FILE (JSON events), in the order they were received.
received() { grep -o '"text":"m-[0-9]*"' "$1" | cut -d'"' -f4; }

# delivered_once_in_order FILE: every acknowledged message appears in FILE exactly once, in
# the order sent, and no message appears twice.
delivered_once_in_order() {
    awk '$1 == "ok" { print $2 }' "$work/sent.log" >"$work/acked"
    [ -s "$work/acked" ] || return 1
    [ -z "$(received "$1" | sort | uniq -d)" ] || return 1
    received "$1" | grep -Fx -f "$work/acked" | diff -q - "$work/acked" >/dev/null
}

# follower_has_first N: the follower printed each of the first N acknowledged messages.
follower_has_first() {
    awk '$1 == "ok" { print $2 }' "$work/sent.log" | head -n "$1" >"$work/acked-first"
    [ "$(received "$work/follow.jsonl" | grep -Fx -f "$work/acked-first" | sort -u | wc -l)" -eq "$1" ]
}

delivery_report() {
    local got dups missing
    awk '$1 == "ok" { print $2 }' "$work/sent.log" >"$work/acked"
    got=$(received "$1" | wc -l)
    dups=$(received "$1" | sort | uniq -d | paste -sd, -)
    missing=$(received "$1" | sort | comm -13 - <(sort "$work/acked") | paste -sd, -)
    echo "$(wc -l <"$work/acked") acknowledged, $got received; twice: ${dups:-none}; missing: ${missing:-none}"
}

# --- Postgres outage -------------------------------------------------------------------------

# container_env CID NAME: the value of NAME in the container's environment.
container_env() {
    docker inspect -f '{{range .Config.Env}}{{println .}}{{end}}' "$1" | sed -n "s/^$2=//p"
}

# to_ms DURATION: 10s, 500ms, 2m -> milliseconds.
to_ms() {
    case $1 in
        *ms) echo "${1%ms}" ;;
        *s) echo $((${1%s} * 1000)) ;;
        *m) echo $((${1%m} * 60000)) ;;
        *) echo $(($1 * 1000)) ;;
    esac
}

# Kills Postgres for longer than the shard lease (checking that sends fail meanwhile), starts
# it, and times the first successful send from the moment Postgres accepts connections, as
# measured inside its container. Sets outage_note, or outage_error and returns 1.
postgres_outage() {
    local pg lease_ms killed started now failed=0 tries=0 ready_at ok_at="" deadline
    pg=$(cids postgres)
    lease_ms=$(to_ms "$(container_env "$(cids shard-0)" QPQ_LEASE_TTL)")
    docker kill "$pg" >/dev/null || { outage_error="docker kill postgres"; return 1; }
    killed=$(now_ms)
    while now=$(now_ms) && [ $((now - killed)) -lt $((lease_ms + 2000)) ]; do
        tries=$((tries + 1))
        qpq_as bob "$E1" --timeout 2s send "$gid" "during the outage" >/dev/null 2>&1 ||
            failed=$((failed + 1))
        # Pace the probes; the loop's length is the outage, not a synchronisation.
        sleep 0.5
    done
    [ "$failed" = "$tries" ] || { outage_error="a send succeeded with Postgres down"; return 1; }
    [[ $(readyz "$(cids edge | head -n 1)") == 503* ]] ||
        { outage_error="an edge's /readyz stayed 200 with Postgres down"; return 1; }
    docker start "$pg" >/dev/null || { outage_error="docker start postgres"; return 1; }
    started=$(now_ms)
    # Inside the container: the time Postgres first accepts connections (same clock as here).
    timeout 60 docker exec "$pg" sh -c \
        'until pg_isready -q --host=127.0.0.1; do sleep 0.02; done; date +%s%3N' \
        >"$work/pg-ready" 2>&1 &
    local waiter=$!
    deadline=$(($(now_ms) + 60000))
    while [ "$(now_ms)" -lt "$deadline" ]; do
        if qpq_as bob "$E1" --timeout 2s send "$gid" "after the outage" >/dev/null 2>&1; then
            ok_at=$(now_ms)
            break
        fi
        sleep 0.05 # pacing: a refused send takes milliseconds
    done
    wait "$waiter" || { outage_error="Postgres did not accept connections again"; return 1; }
    ready_at=$(tail -n 1 "$work/pg-ready")
    [ -n "$ok_at" ] || { outage_error="no send succeeded within 60s of starting Postgres"; return 1; }
    local recovery=$((ok_at - ready_at))
    outage_note="down $(((started - killed) / 1000))s (lease $((lease_ms / 1000))s), $failed of $tries sends refused meanwhile; first send acknowledged ${recovery}ms after Postgres accepted connections (limit ${recovery_limit_ms}ms)"
    if [ "$recovery" -gt "$recovery_limit_ms" ]; then
        outage_error=$outage_note
        return 1
    fi
    wait_healthy 60 postgres shard-0 shard-1 shard-2 edge
}

# --- metrics and load ------------------------------------------------------------------------

# prometheus_targets: "N of M targets up".
prometheus_targets() {
    local json
    json=$(curl -fsS --max-time 5 'http://127.0.0.1:9091/api/v1/targets?state=active') || return 1
    echo "$(grep -o '"health":"up"' <<<"$json" | wc -l) of $(grep -o '"health":"[a-z]*"' <<<"$json" | wc -l) targets up"
}

# prometheus_targets_up N: Prometheus reports N targets, all up.
prometheus_targets_up() { [ "$(prometheus_targets)" = "$1 of $1 targets up" ]; }

loadtest_note() {
    grep -E '^(errors|threshold)' "$work/loadtest.txt" | paste -sd';' - | sed 's/;/; /g'
}
