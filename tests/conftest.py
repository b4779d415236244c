import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import pytest

from tests.helpers import build_tiny_family

TIERS = ("unit", "integration", "slow", "gpu")


def pytest_collection_modifyitems(config, items):
    """Every test carries a tier marker (unit / integration / slow / gpu), so `-m` selects exactly."""
    unmarked = [item.nodeid for item in items if not any(item.get_closest_marker(t) for t in TIERS)]
    if unmarked:
        raise pytest.UsageError("tests without a tier marker (unit, integration, slow or gpu): " + ", ".join(unmarked))


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    return build_tiny_family(str(tmp_path_factory.mktemp("mopd-models")))


