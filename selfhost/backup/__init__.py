"""Backups with restic.

Model: selfhost.models.backup. Rendering: restic.py. Friend's backup host: fleet.py.
pyinfra side: deploy.py. Sub-commands: cli.py.
"""
