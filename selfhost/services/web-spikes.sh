#!/bin/sh
# Managed by selfhost: changes here are overwritten on the next deploy.
# Run every minute by selfhost-web-spikes.timer: for each watched site (web-watch.txt: host,
# Caddy's JSON access log, most requests and MB a minute), count the requests and the bytes
# served in the last minute; above a threshold, tell the journal, and mail root (every
# admin) at most once an hour per site, with the busiest clients and paths.
set -u
list=/etc/selfhost/web-watch.txt
state=/var/lib/selfhost/web-spikes
mkdir -p "$state"
now=$(date +%s)
grep -v '^#' "$list" | while IFS='	' read -r host log max_req max_mb; do
  [ -r "$log" ] || continue
  recent=$(tail -n 200000 "$log" | awk -v since=$((now - 60)) '
    match($0, /"ts":[0-9.]+/) && substr($0, RSTART + 5, RLENGTH - 5) + 0 >= since')
  [ -n "$recent" ] || continue
  # shellcheck disable=SC2046
  set -- $(printf '%s\n' "$recent" | awk '{ n++ }
    match($0, /"size":[0-9]+/) { b += substr($0, RSTART + 7, RLENGTH - 7) }
    END { printf "%d %.0f\n", n, b }')
  count=$1 bytes=$2
  over=""
  [ "$max_req" -gt 0 ] && [ "$count" -gt "$max_req" ] && over="$count requests (most $max_req)"
  [ "$max_mb" -gt 0 ] && [ "$bytes" -gt $((max_mb * 1048576)) ] \
    && over="${over:+$over, }$((bytes / 1048576)) MB served (most $max_mb)"
  [ -n "$over" ] || continue
  what="traffic spike on $host: $over in the last minute"
  logger -t selfhost-web-spikes -p daemon.warning -- "$what"
  [ -z "$(find "$state/$host" -mmin -60 2>/dev/null)" ] || continue
  [ -x /usr/sbin/sendmail ] || continue
  touch "$state/$host"
  top() { printf '%s\n' "$recent" | sed -n "s/.*\"$1\":\"\\([^\"]*\\)\".*/\\1/p" \
            | sort | uniq -c | sort -rn | head -n 5; }
  printf 'To: root\nSubject: [%s] web: %s\n\n%s.\n\nBusiest clients:\n%s\n\nBusiest paths:\n%s\n' \
    "$(hostname)" "traffic spike on $host" "$what" "$(top remote_ip)" "$(top uri)" \
    | /usr/sbin/sendmail -oi -t
done
