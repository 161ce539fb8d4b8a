"""Accounts: login.defs, password quality, faillock, no empty passwords, no core dumps, su.

Admins log in with SSH keys, so none of this can lock them out: sudo without a password hash
is NOPASSWD, and pam_faillock only counts password failures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from selfhost.hardening.base import Control
from selfhost.services.base import Command, Contribution, ManagedFile

if TYPE_CHECKING:
    from selfhost.compile.target import Target
    from selfhost.models.server import Server

LOGIN_DEFS = "/etc/login.defs"
PWQUALITY = "/etc/security/pwquality.conf.d/50-selfhost.conf"
FAILLOCK = "/etc/security/faillock.conf"
PAM_FAILLOCK = "/usr/share/pam-configs/selfhost-faillock"
PAM_FAILLOCK_NOTIFY = "/usr/share/pam-configs/selfhost-faillock-notify"
PAM_UNIX = "/usr/share/pam-configs/selfhost-unix"
# Debian 12's pam_unix (Linux-PAM 1.5.2) ignores YESCRYPT_COST_FACTOR in login.defs (1.7 on
# Debian 13 reads it): passwords changed there would get yescrypt's default cost 5. This is
# Debian 12's own "unix" profile with `rounds=8`, enabled instead of it.
PAM_UNIX_BOOKWORM = """Name: Unix authentication, yescrypt cost 8 (selfhost)
Default: yes
Priority: 256
Auth-Type: Primary
Auth:
\t[success=end default=ignore]\tpam_unix.so nullok try_first_pass
Auth-Initial:
\t[success=end default=ignore]\tpam_unix.so nullok
Account-Type: Primary
Account:
\t[success=end new_authtok_reqd=done default=ignore]\tpam_unix.so
Account-Initial:
\t[success=end new_authtok_reqd=done default=ignore]\tpam_unix.so
Session-Type: Additional
Session:
\trequired\tpam_unix.so
Session-Initial:
\trequired\tpam_unix.so
Password-Type: Primary
Password:
\t[success=end default=ignore]\tpam_unix.so obscure use_authtok try_first_pass yescrypt rounds=8
Password-Initial:
\t[success=end default=ignore]\tpam_unix.so obscure yescrypt rounds=8
"""
LIMITS = "/etc/security/limits.d/50-selfhost.conf"
COREDUMP = "/etc/systemd/coredump.conf.d/50-selfhost.conf"
PROFILE_UMASK = "/etc/profile.d/50-selfhost-umask.sh"


def _set_key(path: str, key: str, value: str) -> tuple[str, str]:
    """(command, guard) setting ``key value`` in a whitespace-separated config file."""
    cmd = (f"sed -i -E 's/^{key}[[:space:]].*/{key}\\t{value}/' {path} && "
           f"(grep -qE '^{key}[[:space:]]' {path} || printf '%s\\t%s\\n' {key} '{value}' >> {path})")
    guard = f"grep -qE '^{key}[[:space:]]+{value}$' {path}"
    return cmd, guard


class AccountsHardening(Control):
    """Local accounts and PAM."""

    umask: str = Field(default="027", pattern=r"^0[0-7]{2}$", description="Default umask.")
    password_min_length: int = Field(default=14, ge=8, le=128,
                                     description="Minimum length of new local passwords.")
    faillock_deny: int = Field(default=5, ge=3, le=100,
                               description="Failed password attempts before a lock.")
    faillock_unlock_minutes: int = Field(default=15, ge=1,
                                         description="How long a locked account stays locked.")
    restrict_su: bool = Field(default=True,
                              description="Only members of the sudo group may use `su`.")
    core_dumps: bool = Field(default=False, description="Allow core dumps (off: none stored).")

    def contribute(self, server: Server, target: Target) -> Contribution:
        c = Contribution()
        if not self.enabled:
            return c
        # cracklib-runtime builds the dictionary pwquality's dictcheck reads: without it (a
        # Recommends, skipped by --no-install-recommends) EVERY password change fails.
        c.packages += ["libpam-pwquality", "cracklib-runtime"]
        settings = {
            "UMASK": self.umask,
            "ENCRYPT_METHOD": "YESCRYPT",
            "YESCRYPT_COST_FACTOR": "8",
            "SHA_CRYPT_MIN_ROUNDS": "65536",
            "PASS_MAX_DAYS": "365",
            "PASS_MIN_DAYS": "1",
            "PASS_WARN_AGE": "14",
            "LOGIN_RETRIES": "3",
            "DEFAULT_HOME": "no",
        }
        cmds, guards = [], []
        for key, value in settings.items():
            cmd, guard = _set_key(LOGIN_DEFS, key, value)
            cmds.append(cmd)
            guards.append(guard)
        c.commands.append(Command("login.defs: umask 027, yescrypt, password aging",
                                  " && ".join(cmds), unless=" && ".join(guards)))
        no_core = "" if self.core_dumps else "ulimit -c 0 2>/dev/null || true\n"
        c.files.append(ManagedFile(PROFILE_UMASK,
                                   f"# Managed by selfhost.\numask {self.umask}\n{no_core}"))
        c.files.append(ManagedFile(PWQUALITY, "\n".join([
            "# Managed by selfhost: quality of new local passwords.",
            f"minlen = {self.password_min_length}",
            "minclass = 3",
            "maxrepeat = 3",
            "dictcheck = 1",
            "usercheck = 1",
            "enforce_for_root",
            "",
        ])))
        c.files.append(ManagedFile(FAILLOCK, "\n".join([
            "# Managed by selfhost.",
            f"deny = {self.faillock_deny}",
            f"unlock_time = {self.faillock_unlock_minutes * 60}",
            "fail_interval = 900",
            "audit",
            "silent",
            "",
        ])))
        c.files.append(ManagedFile(PAM_FAILLOCK, "\n".join([
            "Name: Lock accounts after repeated password failures (selfhost)",
            "Default: yes",
            "Priority: 0",
            "Auth-Type: Primary",
            "Auth:",
            "\t[default=die]\tpam_faillock.so authfail",
            "",
        ])))
        c.files.append(ManagedFile(PAM_FAILLOCK_NOTIFY, "\n".join([
            "Name: Check and reset the failed-password counter (selfhost)",
            "Default: yes",
            "Priority: 1024",
            "Auth-Type: Primary",
            "Auth:",
            "\trequisite\tpam_faillock.so preauth",
            "Account-Type: Primary",
            "Account:",
            "\trequired\tpam_faillock.so",
            "",
        ])))
        profiles = "selfhost-faillock selfhost-faillock-notify pwquality"
        unix_cost = ""
        if target.release == "bookworm":
            c.files.append(ManagedFile(PAM_UNIX, PAM_UNIX_BOOKWORM))
            profiles += " selfhost-unix --disable unix"
            unix_cost = " && grep -q 'pam_unix.so .*rounds=8' /etc/pam.d/common-password"
        c.commands.append(Command(
            "PAM: enable faillock and pwquality"
            + (", yescrypt cost 8" if unix_cost else ""),
            f"DEBIAN_FRONTEND=noninteractive pam-auth-update --package --enable {profiles}",
            unless="grep -q 'pam_faillock.so authfail' /etc/pam.d/common-auth && "
            "grep -q 'pam_faillock.so preauth' /etc/pam.d/common-auth && "
            "grep -q pam_faillock.so /etc/pam.d/common-account && "
            "grep -q pam_pwquality.so /etc/pam.d/common-password" + unix_cost,
            after_files=True,
        ))
        if not self.core_dumps:
            c.files.append(ManagedFile(LIMITS, "# Managed by selfhost: no core dumps.\n"
                                               "*\thard\tcore\t0\nroot\thard\tcore\t0\n"))
            c.files.append(ManagedFile(COREDUMP, "# Managed by selfhost: no core dumps.\n"
                                                 "[Coredump]\nStorage=none\nProcessSizeMax=0\n"))
        if self.restrict_su:
            c.commands.append(Command(
                "su: only for the sudo group",
                "sed -i -E '0,/^#?[[:space:]]*auth[[:space:]]+required[[:space:]]+pam_wheel.so"
                "([[:space:]].*)?$/s//auth       required   pam_wheel.so group=sudo/' "
                "/etc/pam.d/su "
                "&& grep -qE '^auth[[:space:]]+required[[:space:]]+pam_wheel.so group=sudo' "
                "/etc/pam.d/su",
                unless="grep -qE '^auth[[:space:]]+required[[:space:]]+pam_wheel.so group=sudo' "
                "/etc/pam.d/su",
            ))
        c.commands.append(Command(
            "no account with an empty password",
            "for u in $(awk -F: '$2 == \"\" {print $1}' /etc/shadow); do passwd -l \"$u\"; done",
            unless="test -z \"$(awk -F: '$2 == \"\" {print $1}' /etc/shadow)\"",
        ))
        c.commands.append(Command(
            "shadow files: root:shadow 0640",
            "chown root:shadow /etc/shadow /etc/gshadow && chmod 0640 /etc/shadow /etc/gshadow",
            unless="test \"$(stat -c '%a %U %G' /etc/shadow /etc/gshadow | sort -u)\" = "
            "'640 root shadow'",
        ))
        return c
