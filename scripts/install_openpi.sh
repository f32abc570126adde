#!/usr/bin/env bash
# Optional: openpi's robot-side client (the openpi-client package) next to mixpolicy, for the
# openpi tier (tests/test_openpi_client.py: its WebsocketClientPolicy against
# `mixpolicy serve protocol=openpi`). The server side needs nothing extra.
# openpi-client 0.1.2 declares numpy<2, so a plain `pip install openpi-client` replaces numpy 2
# under torch, zarr and opencv with 1.26. Its code runs on numpy 2 (the tier checks it): it
# goes in without resolution, its other dependencies first, with numpy kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
# PYTHON=/path/to/venv/bin/python installs into that environment instead.
PY=${PYTHON:-.venv/bin/python}
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PY" - > "$constraints" <<'PYEOF'
import importlib.metadata as md
for name in ("numpy", "msgpack", "websockets"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass
PYEOF
"$PY" -m pip install -c "$constraints" "dm-tree>=0.1.8" "msgpack>=1.0.5" "pillow>=9.0.0" "websockets>=11.0" typing_extensions
"$PY" -m pip install --no-deps "openpi-client>=0.1.2"
"$PY" - <<'PYEOF'
import importlib.metadata as md

import numpy as np
from openpi_client import action_chunk_broker, msgpack_numpy, websocket_client_policy  # noqa: F401

x = np.arange(6, dtype=np.float32).reshape(2, 3)
assert (msgpack_numpy.unpackb(msgpack_numpy.packb({"a": x}))["a"] == x).all()
print(f"openpi-client {md.version('openpi-client')} on numpy {np.__version__} ok")
PYEOF
