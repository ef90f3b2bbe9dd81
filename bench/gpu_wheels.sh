#!/usr/bin/env bash
# The wheels a lent GPU machine lacks for bench/gpu_check.sh, for its Python 3.12, into .whl/ (git ignores it
# through .git/info/exclude) to be carried there: it has torch, numpy, msgpack, pyyaml, click, tqdm, safetensors,
# matplotlib and prometheus-client, not pydantic. The versions are this venv's, so that they fit each other.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
pins=$("$PY" - <<'PYEOF'
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in ("pydantic", "pydantic-core", "annotated-types",
                                                        "typing-inspection", "typing-extensions")))
PYEOF
)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $pins
ls -la .whl
