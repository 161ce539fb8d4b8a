#!/bin/sh
# selfhost: install Debian packages, waiting (bounded) for a busy package manager.
#
#   sh apt-install.sh TIMEOUT [PACKAGE...]
#
# Another apt, dpkg or unattended-upgrades run may hold the package manager's locks (or one
# left running by an interrupted deploy): wait up to TIMEOUT seconds for them, saying so once,
# instead of failing at once with "Could not get lock /var/lib/dpkg/lock-frontend". apt-get
# and dpkg fail at once on a held lock, so they are retried every 2 s until the deadline
# (not apt's own DPkg::Lock::Timeout: a run waiting inside apt could not see that it was
# superseded, below).
#
# A dpkg run that was interrupted (a crash, a killed deploy) leaves /var/lib/dpkg/updates
# not empty, and apt then refuses to work until `dpkg --configure -a` has run: run it first.
# Without PACKAGE arguments, only that recovery is done, or the wait for a busy dpkg.
#
# A killed deploy does not kill this script on the target (neither a cut SSH session nor a
# killed `podman exec` does): left waiting for a lock, it would later install the packages of
# an older model, and hold the lock during the next deploys. Each run writes its own token
# into OWNER; before each attempt it checks that the token is still its own, and stops when a
# newer run has taken over (the newer run waits for whatever the older one is doing).
set -u
timeout=$1
shift
export DEBIAN_FRONTEND=noninteractive
deadline=$(( $(date +%s) + timeout ))
said=""
owner=${SELFHOST_APT_OWNER:-/run/selfhost-apt-install.owner}
me="$$.$(date +%s%N)"
if ! { printf '%s\n' "$me" > "$owner.$$" && mv -f "$owner.$$" "$owner"; } 2>/dev/null; then
    owner=""  # not writable (not root?): no take-over, the run goes on
fi

superseded() {
    [ -n "$owner" ] && [ "$(cat "$owner" 2>/dev/null)" != "$me" ]
}

holder() {
    # Which process holds a lock of the package manager, when lslocks can tell.
    lslocks -n -r -o COMMAND,PID,PATH 2>/dev/null \
        | awk '$3 ~ /^\/var\/lib\/(dpkg\/lock|apt\/lists\/lock)/ { print $1 " (pid " $2 ")"; exit }'
}

# Run "$@" (its output is kept only for a failure), retrying while a lock is held.
retry_locked() {
    while :; do
        if superseded; then
            echo "selfhost: a newer deploy has taken over the package manager: this run" \
                 "stops here" >&2
            exit 75
        fi
        if out=$("$@" 2>&1); then
            return 0
        fi
        case $out in
            # apt: "Could not get lock ..."; dpkg 1.21: "dpkg frontend lock was locked by
            # another process with pid N"; dpkg 1.22: "... locked by <unknown> process ...".
            *"Could not get lock"* | *"locked by"* | *"Unable to acquire the dpkg"*) ;;
            *) printf '%s\n' "$out" >&2; return 1 ;;
        esac
        if [ "$(date +%s)" -ge "$deadline" ]; then
            printf '%s\n' "$out" >&2
            echo "selfhost: the package manager is still busy after ${timeout}s (another" \
                 "apt, dpkg or unattended-upgrades run holds its lock); nothing was installed," \
                 "deploy again when it has finished" >&2
            return 1
        fi
        if [ -z "$said" ]; then
            who=$(holder)
            echo "selfhost: the package manager is busy${who:+ (held by $who)}: waiting up" \
                 "to ${timeout}s for it" >&2
            said=1
        fi
        sleep 2
    done
}

if [ -n "$(ls -A /var/lib/dpkg/updates 2>/dev/null)" ]; then
    echo "selfhost: dpkg was interrupted (a crash or a killed run): running" \
         "dpkg --configure -a first" >&2
    retry_locked dpkg --force-confdef --force-confold --configure -a || exit 1
elif [ "$#" -eq 0 ]; then
    # Nothing to install, but the package manager is busy (an apt left running by a killed
    # deploy): wait for it, since the commands that follow use dpkg and debconf. With nothing
    # pending, `dpkg --configure -a` only takes and releases dpkg's lock.
    retry_locked dpkg --force-confdef --force-confold --configure -a || exit 1
fi
[ "$#" -gt 0 ] || exit 0

retry_locked apt-get update -qq -o Acquire::http::Timeout=30 -o Acquire::Retries=3 || exit 1
retry_locked apt-get install -y -qq --no-install-recommends \
    -o Acquire::http::Timeout=30 -o Acquire::Retries=3 \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "$@"
