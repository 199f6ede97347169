import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.nodeproc import NodeProcess, node_config  # noqa: E402


@pytest.fixture
def node(tmp_path):
    """A running node (subprocess) with a 1 s quiet period; stopped after the test."""
    n = NodeProcess(tmp_path / "node", node_config(tmp_path / "node"))
    n.start()
    yield n
    n.stop()


@pytest.fixture
def make_node(tmp_path):
    """Factory for nodes with a custom configuration; all are stopped after the test."""
    made = []

    def _make(name="node", start=True, **kw):
        n = NodeProcess(tmp_path / name, node_config(tmp_path / name, **kw))
        if start:
            n.start()
        made.append(n)
        return n

    yield _make
    for n in made:
        n.stop()



#: test modules whose outcome does not depend on ``MSKNODE_TEST_DATABASE``: they never open the index
#: (model, pixels, result objects built in memory, documents), or they choose their databases themselves
#: (test_storage_states runs on SQLite and PostgreSQL in either pass; the several-nodes test always runs on
#: PostgreSQL). The PostgreSQL pass of `make test` (`make test-postgresql`) leaves them out
#: (`-m "not backend_independent"`): the SQLite pass has run them. A module that starts a node or opens
#: an Index of the default backend must not be listed here.
BACKEND_INDEPENDENT = frozenset({
    "test_cli_infer", "test_decoding", "test_docs", "test_fixtures", "test_header_clean",
    "test_inference_card", "test_inference_model", "test_inference_pixels", "test_inference_serving_imports",
    "test_inference_training", "test_inference_vocabulary", "test_reduced_decode", "test_results_model",
    "test_results_orthanc", "test_results_pr", "test_results_sc", "test_results_sr", "test_results_support",
    "test_routing", "test_stages",
    "test_storage_states", "test_multinode_e2e",
})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in BACKEND_INDEPENDENT:
            item.add_marker(pytest.mark.backend_independent)
