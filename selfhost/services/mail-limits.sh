#!/bin/sh
# Managed by selfhost: changes here are overwritten on the next deploy.
# Run every minute by selfhost-mail-limits.timer: when logged-in users reached an outbound
# limit since the last run (Postfix logged postfwd's 4xx deferral), tell the journal and
# mail root (the admin's address when the host has `notify`).
set -u
cursor=/var/lib/selfhost/mail-limits.cursor
mkdir -p "${cursor%/*}"
hits=$(journalctl --cursor-file="$cursor" -q -o cat --no-pager \
  SYSLOG_IDENTIFIER=postfix/submission/smtpd SYSLOG_IDENTIFIER=postfix/submissions/smtpd \
  | grep -F 'Outbound limit: ')
[ -n "$hits" ] || exit 0
users=$(printf '%s\n' "$hits" | sed -n 's/.*Outbound limit: \([^ ]*\) .*/\1/p' | sort | uniq -c)
logger -t selfhost-mail-limits -p mail.warning -- \
  "outbound limit reached (deferred messages per user): $(echo "$users" | tr -s ' \n' ' ')"
printf 'To: root\nSubject: [%s] mail: outbound limit reached\n\n%s\n\n%s\n\n%s\n' \
  "$(hostname)" "Deferred submissions per user since the last check:" "$users" "$hits" \
  | /usr/sbin/sendmail -oi -t
