"""Node-id helpers shared by run.py and the pytest plugin (importing the plugin itself has side effects)."""

import re


def norm_id(nodeid: str) -> str:
    """Node id without the list indices that depend on which PEFT classes exist: test_config.py numbers
    ``mandatory_kwargsN`` by position in a list filtered by signature, and the alias's placeholder classes
    (methods peftfast lacks) are filtered out, shifting the numbers of the same test case."""
    return re.sub(r"(?<=mandatory_kwargs)\d+", "", nodeid)
