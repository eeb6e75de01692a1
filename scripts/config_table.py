"""Print the README's configuration table (generated from KVCacheConfig's field docs).

`python scripts/config_table.py` prints it; tests/test_docs.py checks the README carries it verbatim.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_kvcache_plugin.config import describe_keys


def table() -> str:
    lines = ["| key | environment variable | default | meaning |", "|---|---|---|---|"]
    for key, env, default, meaning in describe_keys():
        lines.append(f"| `{key}` | `{env}` | `{default}` | {meaning} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
