#!/usr/bin/env bash
# The admin's mail relay for the `ssh` scenario: molecule/shared/relay.sh with a certificate
# for its address; mail for alice@example.org stays on the relay (/var/mail/alice).
#
#   molecule/ssh/relay.sh up WORKDIR SERVER...   # WORKDIR/secrets.json has smtp_password
#   molecule/ssh/relay.sh down
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export RELAY_NAME=h16-relay RELAY_NET=h16-mailnet RELAY_SUBNET=10.216.16 \
  RELAY_LOGIN=nas@home.arpa RELAY_MAILBOX=alice RELAY_DOMAINS=example.org RELAY_CERT=ip
case ${1:-} in
  up)
    work=${2:?usage: $0 up WORKDIR SERVER...}
    shift 2
    # The relay password from the scenario's secrets, through stdin only.
    python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["smtp_password"])' \
      "$work/secrets.json" | "$here/../shared/relay.sh" up "$@";;
  *) exec "$here/../shared/relay.sh" "$@";;
esac
