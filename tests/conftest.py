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

