# Shell helpers the netns benches share; sourced, not run.

# now_ns: wall-clock time in ns.
now_ns() { date +%s%N; }

# wait_until SECONDS COMMAND...: runs COMMAND every $WAIT_POLL_S seconds (default 0.1) until it
# succeeds; fails after SECONDS.
wait_until() {
    local limit=$(( $(now_ns) + $1 * 1000000000 )); shift
    until "$@"; do
        [ "$(now_ns)" -lt "$limit" ] || return 1
        sleep "${WAIT_POLL_S:-0.1}"
    done
}
