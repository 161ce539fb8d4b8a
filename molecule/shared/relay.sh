#!/usr/bin/env bash
# A test mail relay for the scenarios whose servers send through a smarthost (`mail`: the mail
# server's services.mail.relay; `ssh`: the admin's relay for msmtp): Debian's Postfix in its
# own container on an internal podman network (no route out) shared with the servers. It takes
# mail only on submission (587), after STARTTLS and SASL AUTH (Dovecot), with a self-signed
# certificate that the servers trust (installed in their CA store, as a provider's public
# certificate would be). Mail for RELAY_MAILBOX's domains stays on the relay
# (/var/mail/RELAY_MAILBOX; MAILBOX+ANY@ too, as many distinct recipients as a test needs).
# Each scenario has a small wrapper that sets the variables (molecule/*/relay.sh).
#
#   printf '%s\n' PASSWORD | RELAY_...=... molecule/shared/relay.sh up SERVER...
#   RELAY_NAME=... RELAY_NET=... molecule/shared/relay.sh down
#
# RELAY_NAME, RELAY_NET: the relay container and its network; RELAY_SUBNET: a /24's first
# three octets (the relay is .2); RELAY_LOGIN: the servers' SASL login (its password is the
# first line of stdin: never in a command line; no ':' in it, Dovecot's passwd-file
# separator); RELAY_MAILBOX: the local user that receives; RELAY_DOMAINS: the domains it
# receives for (besides relay.test); RELAY_CERT: "name" (a certificate for relay.test, which
# the servers find in /etc/hosts) or "ip" (one for the relay's address).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
relay=${RELAY_NAME:?}
net=${RELAY_NET:?}

down() {
  podman rm --force --time 0 --ignore "$relay" >/dev/null
  podman network rm --force "$net" >/dev/null 2>&1 || true
}

up() {
  local ip=${RELAY_SUBNET:?}.2 san pw
  case ${RELAY_CERT:?} in
    name) san=DNS:relay.test;;
    ip) san=IP:$ip;;
    *) echo "$0: RELAY_CERT is 'name' or 'ip'" >&2; exit 2;;
  esac
  IFS= read -r pw || true
  [ -n "$pw" ] || { echo "$0: no relay password on stdin" >&2; exit 2; }
  down
  podman network create --internal --subnet "$RELAY_SUBNET.0/24" "$net" >/dev/null
  # The default network first, for apt; disconnected once the packages are in.
  CONTAINERS_CONF="$repo/images/containers.conf" podman run --detach --name "$relay" \
    --hostname relay --systemd=always --label selfhost.molecule=1 \
    localhost/selfhost-debian:bookworm /sbin/init >/dev/null
  for _ in $(seq 60); do
    state=$(podman exec "$relay" systemctl is-system-running --wait 2>/dev/null || true)
    case $state in running|degraded) break;; esac
    sleep 1
  done
  podman exec "$relay" sh -ec '
    export DEBIAN_FRONTEND=noninteractive
    echo "postfix postfix/main_mailer_type select Internet Site" | debconf-set-selections
    echo "postfix postfix/mailname string relay.test" | debconf-set-selections
    apt-get update -qq -o Acquire::http::Timeout=30 -o Acquire::Retries=3
    apt-get install -y -qq -o Acquire::http::Timeout=30 -o Acquire::Retries=3 --no-install-recommends postfix dovecot-core openssl >/dev/null
  '
  podman network disconnect podman "$relay"
  podman network connect --ip "$ip" "$net" "$relay"

  # The servers' login (the password through stdin only).
  printf '%s\n' "$pw" \
    | podman exec -i "$relay" sh -ec "read -r pw; umask 077; printf '%s:{PLAIN}%s\n' '${RELAY_LOGIN:?}' \"\$pw\" > /etc/dovecot/relay-users; chown dovecot /etc/dovecot/relay-users"
  podman exec "$relay" sh -ec "
    openssl req -x509 -newkey rsa:2048 -nodes -days 7 -subj /CN=${san#*:} \
      -addext 'subjectAltName=$san' -keyout /etc/postfix/relay.key \
      -out /etc/postfix/relay.crt 2>/dev/null
    chmod 600 /etc/postfix/relay.key
    useradd --create-home ${RELAY_MAILBOX:?}
    postconf -e 'myhostname = relay.test' \
      'mydestination = ${RELAY_DOMAINS:+$RELAY_DOMAINS, }relay.test, localhost' \
      'smtpd_tls_cert_file = /etc/postfix/relay.crt' 'smtpd_tls_key_file = /etc/postfix/relay.key' \
      'smtpd_sasl_type = dovecot' 'smtpd_sasl_path = private/auth' 'mynetworks = 127.0.0.0/8' \
      'recipient_delimiter = +'
    cat >> /etc/postfix/master.cf <<'CF'
submission inet n       -       y       -       -       smtpd
  -o syslog_name=postfix/submission
  -o smtpd_tls_security_level=encrypt
  -o smtpd_tls_auth_only=yes
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_client_restrictions=permit_sasl_authenticated,reject
  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject
CF
    cat > /etc/dovecot/conf.d/99-relay.conf <<'CF'
auth_mechanisms = plain login
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u /etc/dovecot/relay-users
}
service auth {
  unix_listener /var/spool/postfix/private/auth {
    mode = 0660
    user = postfix
    group = postfix
  }
}
CF
    systemctl restart dovecot postfix
  "
  # The servers: on the relay's network, knowing its name and trusting its certificate.
  local server
  for server in "$@"; do
    podman network connect "$net" "$server"
    podman exec "$server" sh -c "echo '$ip relay.test' >> /etc/hosts"
    podman exec "$relay" cat /etc/postfix/relay.crt | podman exec -i "$server" sh -ec '
      cat > /usr/local/share/ca-certificates/selfhost-test-relay.crt
      update-ca-certificates >/dev/null 2>&1'
  done
}

case ${1:-} in
  up) shift; up "$@";;
  down) down;;
  *) echo "usage: $0 up SERVER... | down (see the comment at the top)" >&2; exit 2;;
esac
