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
# Who is behind each held sender: a local login (LOGIN@this host) is a Unix user; PHP's
# mail.log (syslog, identifier php) gives the full path of each script that called mail(),
# so the scripts under the login's home name the member, and a path .../sites/DOMAIN/...
# the site.
scripts=$(journalctl -q -o cat --no-pager --since=-1h \
    SYSLOG_IDENTIFIER=php SYSLOG_IDENTIFIER=php-fpm 2>/dev/null \
  | sed -n 's/.*mail() on \[\(.*\):[0-9]*\]: To: .*/\1/p')
who=$(printf '%s\n' "$held" | awk '{print $2}' | sort -u | while read -r sender; do
    login=${sender%@*}
    home=$(getent passwd "$login" | cut -d: -f6)
    [ -n "$login" ] && [ -n "$home" ] && [ "$home" != / ] || continue
    printf '%s\n' "$scripts" | grep -F "$home/" | sort | uniq -c | while read -r n path; do
      site=$(printf '%s\n' "$path" | sed -n 's|.*/sites/\([^/]*\)/.*|\1|p')
      printf 'member %s, site %s, script %s (%s mail() calls in the last hour)\n' \
        "$login" "${site:-?}" "$path" "$n"
    done
  done)
logins=$(printf '%s\n' "$held" | awk '{print $2}' | sed -n 's/@.*//p' | sort -u | tr '\n' ' ')
logger -t selfhost-mail-limits -p mail.warning -- \
  "outbound limit reached (messages over it per sender): $(echo "$users" | tr -s ' \n' ' ')"
[ -z "$who" ] || logger -t selfhost-mail-limits -p mail.warning -- \
  "held mail sent by: $(printf '%s' "$who" | tr '\n' ';')"
printf 'To: root\nSubject: [%s] mail: outbound limit reached%s\n\n%s\n\n%s\n\n%s\n\n%s\n\n%s\n\n%s\n' \
  "$(hostname)" "${logins:+ (held: ${logins% })}" \
  "Messages deferred or held over a limit, per sender, since the last check:" \
  "$users" "Held mail now (release or delete it: selfhost held FILE --release/--delete ID):" \
  "${held:-none}" "${who:-No PHP script found for the held senders.}" "$hits" \
  | /usr/sbin/sendmail -oi -t
