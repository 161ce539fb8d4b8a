"""The example model, rewritten for a benchmark or report run."""

from __future__ import annotations

from pathlib import Path


def with_admin_key(example: Path, pubkey: str, out: Path) -> Path:
    """A copy of ``example`` whose admin alice logs in with ``pubkey``, with absolute site
    sources (the copy lives elsewhere); written to ``out``."""
    from ruamel.yaml import YAML

    data = YAML(typ="safe").load(example.read_text())
    for admin in data["admins"]:
        if admin["name"] == "alice":
            admin["ssh_keys"] = [pubkey]
    for site in ((data.get("services") or {}).get("web") or {}).get("sites", []):
        if site.get("source") and not Path(site["source"]).is_absolute():
            site["source"] = str((example.parent / site["source"]).resolve())
    y = YAML()
    y.default_flow_style = False
    with out.open("w") as f:
        y.dump(data, f)
    return out
