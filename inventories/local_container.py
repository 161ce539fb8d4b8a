"""The local disposable test container made by scripts/demo (podman, no SSH needed).

    pyinfra inventories/local_container.py deploys/home_server.py
"""

hosts = [
    ("@podman/selfhost-demo", {"selfhost_config": "examples/home.yaml"}),
]
