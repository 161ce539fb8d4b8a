#!/usr/bin/env bash
# The smarthost of the `mail` scenario (services.mail.relay): molecule/shared/relay.sh with a
# certificate for relay.test; mail for carol@relay.test (and carol+ANY@) stays on the relay
# (/var/mail/carol).
#
#   MAIL_RELAY_PASSWORD=... molecule/mail/relay.sh up SERVER...
#   molecule/mail/relay.sh down
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export RELAY_NAME=m11-mail-relay RELAY_NET=m11-mail-relaynet RELAY_SUBNET=10.213.113 \
  RELAY_LOGIN=nas RELAY_MAILBOX=carol RELAY_DOMAINS= RELAY_CERT=name
case ${1:-} in
  up) printf '%s\n' "${MAIL_RELAY_PASSWORD:?}" | "$here/../shared/relay.sh" "$@";;
  *) exec "$here/../shared/relay.sh" "$@";;
esac
