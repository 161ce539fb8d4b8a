#!/usr/bin/env bash
# The admin's mail relay for the `ssh` scenario: Debian's Postfix in its own container, on an
# internal podman network (no route out) shared with the servers, accepting mail only on
# submission (587) after STARTTLS and SASL AUTH (Dovecot), with a self-signed certificate for
# its address that the servers trust (installed in their CA store, as a provider's would be).
# Mail for alice@example.org is delivered to the relay's local mailbox /var/mail/alice.
#
#   molecule/ssh/relay.sh up WORKDIR SERVER...   # WORKDIR/secrets.json has smtp_password
#   molecule/ssh/relay.sh down
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
net=h16-mailnet
relay=h16-relay
subnet=10.216.16.0/24
ip=10.216.16.2
user=nas@home.arpa

down() {
  podman rm --force --time 0 --ignore "$relay" >/dev/null
  podman network rm --force "$net" >/dev/null 2>&1 || true
}

up() {
  local work=$1
  shift
  down
  podman network create --internal --subnet "$subnet" "$net" >/dev/null
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

  # SASL users: the server's login, with the relay password from the scenario's secrets
  # (through stdin only: never in a command line).
  python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["smtp_password"])' \
      "$work/secrets.json" \
    | podman exec -i "$relay" sh -ec "read -r pw; umask 077; printf '%s:{PLAIN}%s\n' '$user' \"\$pw\" > /etc/dovecot/relay-users; chown dovecot /etc/dovecot/relay-users"
  podman exec "$relay" sh -ec "
    openssl req -x509 -newkey rsa:2048 -nodes -days 7 -subj /CN=$ip \
      -addext 'subjectAltName=IP:$ip' -keyout /etc/postfix/relay.key \
      -out /etc/postfix/relay.crt 2>/dev/null
    chmod 600 /etc/postfix/relay.key
    useradd --create-home alice
    postconf -e 'myhostname = relay.test' 'mydestination = example.org, relay.test, localhost' \
      'smtpd_tls_cert_file = /etc/postfix/relay.crt' 'smtpd_tls_key_file = /etc/postfix/relay.key' \
      'smtpd_sasl_type = dovecot' 'smtpd_sasl_path = private/auth' 'mynetworks = 127.0.0.0/8'
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
  # The servers: on the relay's network, trusting its certificate.
  local server
  for server in "$@"; do
    podman network connect "$net" "$server"
    podman exec "$relay" cat /etc/postfix/relay.crt | podman exec -i "$server" sh -ec '
      cat > /usr/local/share/ca-certificates/selfhost-test-relay.crt
      update-ca-certificates >/dev/null 2>&1'
  done
}

case ${1:-} in
  up) shift; up "$@";;
  down) down;;
  *) echo "usage: $0 up WORKDIR SERVER... | down" >&2; exit 2;;
esac
