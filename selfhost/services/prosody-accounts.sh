#!/bin/bash
# Managed by selfhost: make Prosody's account files match the model.
#
#   prosody-accounts [--check]
#
# Reads /etc/prosody/selfhost-accounts.txt (root only), whose lines are, tab-separated:
#   domain   DIR                          a domain's account directory (internal storage)
#   account  FILE ITERATIONS SALT STORED_KEY SERVER_KEY
# (SCRAM-SHA-1 keys computed on the deploying machine; no password is in the list.)
# Writes each account FILE in Prosody's own format (what mod_auth_internal_hashed stores,
# read again at every login: no reload needed) and removes the account files of a listed
# domain that the list does not name (their other data, e.g. rosters, stays).
# With --check: changes nothing, exits 1 if anything would change.
set -euo pipefail
list=${SELFHOST_PROSODY_ACCOUNTS:-/etc/prosody/selfhost-accounts.txt}
check=false
[ "${1:-}" = --check ] && check=true
umask 027

declare -A keep=()
dirs=()
while IFS=$'\t' read -r kind path iterations salt stored server; do
  case $kind in
    domain) dirs+=("$path") ;;
    account)
      keep[$path]=1
      want=$(printf 'return {\n\t["iteration_count"] = %d;\n\t["salt"] = "%s";\n\t["server_key"] = "%s";\n\t["stored_key"] = "%s";\n};' \
        "$iterations" "$salt" "$server" "$stored")
      if [ -f "$path" ] && [ "$(cat "$path")" = "$want" ] \
          && [ "$(stat -c %U:%G:%a "$path")" = prosody:prosody:640 ]; then
        continue
      fi
      $check && exit 1
      dir=$(dirname "$path")
      install -d -o prosody -g prosody -m 0750 "$(dirname "$dir")" "$dir"
      printf '%s\n' "$want" > "$path.selfhost-new"
      chown prosody:prosody "$path.selfhost-new"
      chmod 0640 "$path.selfhost-new"
      mv -f "$path.selfhost-new" "$path"
      echo "prosody: account file $path written"
      ;;
  esac
done < <(grep -v '^#' "$list")

for dir in "${dirs[@]}"; do
  for f in "$dir"/*.dat; do
    [ -e "$f" ] || continue
    [ -n "${keep[$f]:-}" ] && continue
    $check && exit 1
    rm -f "$f"
    echo "prosody: account file $f removed (not in the model)"
  done
done
exit 0
