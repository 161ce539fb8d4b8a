"""The mail scenario's model: examples/mail.yaml plus what the scenario tests beyond it, a
smarthost (relay.sh's Postfix, which requires STARTTLS and AUTH) and the authoritative zone
of home.arpa served by Knot on the same host (its DKIM records carry the key made there), and
a limit of 3 first-time recipients per day.

    python3 molecule/mail/fleet.py examples/mail.yaml OUT.yaml
"""

import sys

import yaml

with open(sys.argv[1], encoding="utf-8") as f:
    model = yaml.safe_load(f)
model["services"]["mail"]["relay"] = {
    "host": "relay.test", "port": 587, "username": "nas",
    "password": {"env": "MAIL_RELAY_PASSWORD"},
}
# Knot needs the name server's address for the zone's glue; any address does (the test asks
# Knot on 127.0.0.1).
# A low first-time recipients limit, so that the test reaches it with a few messages.
model["services"]["mail"]["outbound_limits"] = {"first_time_per_day": 3}
model.setdefault("addresses", {}).setdefault("lan", ["192.0.2.25"])
model["services"]["dns"] = {"zones": ["home.arpa"]}
with open(sys.argv[2], "w", encoding="utf-8") as out:
    yaml.safe_dump(model, out, sort_keys=False)
