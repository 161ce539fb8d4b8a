#!/bin/sh
# Managed by selfhost: changes here are overwritten on the next deploy.
# Run every minute by selfhost-mail-limits.timer: when users reached an outbound limit since
# the last run (Postfix logged postfwd's answer: a 4xx deferral on the submission ports, a
# hold on the local programs' path), tell the journal and mail root (the admin's address
# when the host has `notify`), naming each sender and, for PHP, the scripts of the held mail.
set -u
cursor=/var/lib/selfhost/mail-limits.cursor
mkdir -p "${cursor%/*}"
hits=$(journalctl --cursor-file="$cursor" -q -o cat --no-pager \
  SYSLOG_IDENTIFIER=postfix/submission/smtpd SYSLOG_IDENTIFIER=postfix/submissions/smtpd \
  SYSLOG_IDENTIFIER=postfix/local-limit/smtpd \
  | grep -F 'Outbound limit: ')
[ -n "$hits" ] || exit 0
users=$(printf '%s\n' "$hits" | sed -n 's/.*Outbound limit: \([^ ]*\) .*/\1/p' | sort | uniq -c)
# The held messages, per sender, with the PHP script that sent them (mail.add_x_header).
held=$(postqueue -p 2>/dev/null | sed -n 's/^\([0-9A-Za-z]*\)!.* \([^ ]*\)$/\1 \2/p' \
  | while read -r id sender; do
      script=$(postcat -hq "$id" 2>/dev/null \
        | sed -n 's/^X-PHP-Originating-Script: *//p' | head -n 1)
      printf '%s %s\n' "${sender:-<>}" "${script:+script $script}"
    done | sort | uniq -c)
logger -t selfhost-mail-limits -p mail.warning -- \
  "outbound limit reached (messages over it per sender): $(echo "$users" | tr -s ' \n' ' ')"
printf 'To: root\nSubject: [%s] mail: outbound limit reached\n\n%s\n\n%s\n\n%s\n\n%s\n\n%s\n' \
  "$(hostname)" "Messages deferred or held over a limit, per sender, since the last check:" \
  "$users" "Held mail now (release or delete it: selfhost held FILE --release/--delete ID):" \
  "${held:-none}" "$hits" \
  | /usr/sbin/sendmail -oi -t
