"""Deploy a selfhost model with the plain pyinfra CLI.

    pyinfra INVENTORY deploys/home_server.py --data selfhost_config=examples/home.yaml

The model's path comes from host data ``selfhost_config``, so one inventory can deploy several
servers, each with its own file (see inventories/).
"""

from selfhost.backend.pyinfra import home_server

home_server()
