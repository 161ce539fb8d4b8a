#!/bin/sh
# Managed by selfhost: gives one user's Syncthing the model's devices, folders and options
# through Syncthing's own REST API, which checks each part (a malformed device ID, a bad
# option) and refuses it before anything changes; what it accepts it applies and saves in its
# config.xml itself. Run by the deploy when the model's part changed.
#
#   syncthing-apply USER STATE_DIR GUI_PORT MODEL_DIR
#
# MODEL_DIR holds devices.json and folders.json (each the complete list: what the model no
# longer names is removed) and options.json (only the options the model sets).
set -eu
user=$1 state=$2 port=$3 model=$4
unit="syncthing@$user.service"

# The unit's drop-in (home, GUI address) may have changed; an identity given in the model
# may have replaced the key: start again from them.
systemctl daemon-reload
systemctl restart "$unit"

key=$(sed -n 's:.*<apikey>\(.*\)</apikey>.*:\1:p' "$state/config.xml")
if [ -z "$key" ]; then
    echo "selfhost: no API key in $state/config.xml" >&2
    exit 1
fi

# METHOD PATH [BODY_FILE]: the API key reaches curl on its standard input (a config line of
# curl's -K), never in an argument that ps would show.
api() {
    if [ $# -gt 2 ]; then
        printf 'header = "X-API-Key: %s"\n' "$key" | curl -sS --fail-with-body -K - \
            -X "$1" -H 'Content-Type: application/json' --data-binary "@$3" \
            "http://127.0.0.1:$port/rest/$2"
    else
        printf 'header = "X-API-Key: %s"\n' "$key" | curl -sS --fail-with-body -K - \
            -X "$1" "http://127.0.0.1:$port/rest/$2"
    fi
}

i=0
until api GET system/ping >/dev/null 2>&1; do
    i=$((i + 1))
    if [ "$i" -ge 120 ]; then
        echo "selfhost: $unit does not answer on 127.0.0.1:$port after 60 s" >&2
        journalctl -u "$unit" -n 10 --no-pager >&2 || true
        exit 1
    fi
    sleep 0.5
done

for part in "PUT config/devices devices.json" "PUT config/folders folders.json" \
            "PATCH config/options options.json"; do
    # shellcheck disable=SC2086 # three words on purpose
    set -- $part
    if ! out=$(api "$1" "$2" "$model/$3" 2>&1); then
        echo "selfhost: Syncthing refused $model/$3 ($user): $out" >&2
        exit 1
    fi
done

if api GET config/restart-required | grep -q '"requiresRestart": *true'; then
    systemctl restart "$unit"
fi
