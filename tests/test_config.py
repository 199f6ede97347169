"""config.yaml: typed validation whose errors name the key and the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dicom_node.config import load_config
from dicom_node.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
GOOD = {"node": {"ae_title": "MSKNODE", "bind": "0.0.0.0", "port": 11112, "max_associations": 16},
        "peers": [{"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}],
        "storage": {"path": "./var", "database_url": "sqlite:///./var/index.sqlite", "min_free_mb": 1024},
        "study": {"quiet_seconds": 10}}


def _write(tmp_path: Path, data) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def _with(path: str, value):
    import copy

    data = copy.deepcopy(GOOD)
    node = data
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node.setdefault(k, {})
    last = keys[-1]
    if value is _DELETE:
        del node[int(last) if last.isdigit() else last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return data


_DELETE = object()


def test_the_shipped_config_is_valid():
    cfg = load_config(REPO / "config.yaml", environ={})
    assert cfg.node.ae_title == "MSKNODE" and cfg.node.port == 11112
    assert cfg.storage.path == (REPO / "var").resolve()  # relative to the file
    assert cfg.storage.database_url == f"sqlite:///{(REPO / 'var' / 'index.sqlite').resolve()}"


@pytest.mark.parametrize("path,value,key,words", [
    ("node.port", 70000, "node.port", "less than or equal to 65535"),
    ("node.port", "eleven", "node.port", "valid integer"),
    ("node.ae_title", "A" * 17, "node.ae_title", "at most 16 characters"),
    ("node.ae_title", "BAD\\AE", "node.ae_title", "no backslash"),
    ("node.colour", "blue", "node.colour", "unknown key"),
    ("peers", _DELETE, "peers", "required value is missing"),
    ("peers", [], "peers", "at least 1"),
    ("peers.0.host", "not a host!", "peers[0].host", "neither an IP address nor a host name"),
    ("peers.0.port", 0, "peers[0].port", "greater than or equal to 1"),
    ("peers.0.ae_title", _DELETE, "peers[0].ae_title", "required value is missing"),
    ("storage.database_url", "mysql://x/y", "storage.database_url", "unsupported database"),
    ("storage.min_free_mb", -1, "storage.min_free_mb", "greater than or equal to 0"),
    ("study.quiet_seconds", 0, "study.quiet_seconds", "greater than 0"),
    ("pipeline.decode_workers", -1, "pipeline.decode_workers", "greater than or equal to 0"),
    ("pipeline.decode_workers", "two", "pipeline.decode_workers", "valid integer"),
    ("study", "ten", "study", "valid dictionary"),
])
def test_broken_configs_name_the_key(tmp_path, path, value, key, words):
    p = _write(tmp_path, _with(path, value))
    with pytest.raises(ConfigError) as err:
        load_config(p, environ={})
    msg = str(err.value)
    assert err.value.key == key
    assert msg.startswith(f"{p}: {key}: "), msg
    assert words in msg, msg


def test_duplicate_peer_and_bad_yaml(tmp_path):
    data = _with("peers", [{"ae_title": "PACS"}, {"ae_title": "PACS"}])
    with pytest.raises(ConfigError, match=r"config.yaml: peers: ae_title 'PACS' is listed twice \(items 0 and 1\)"):
        load_config(_write(tmp_path, data), environ={})
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+, column \d+"):
        load_config(_write(tmp_path, "node:\n  port: [1,\n"), environ={})
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.yaml", environ={})


def test_environment_overrides(tmp_path):
    p = _write(tmp_path, GOOD)
    cfg = load_config(p, environ={"MSKNODE__NODE__PORT": "11113", "MSKNODE__PEERS__0__PORT": "4243",
                                  "MSKNODE__STUDY__QUIET_SECONDS": "2.5", "OTHER": "x"})
    assert cfg.node.port == 11113 and cfg.peers[0].port == 4243 and cfg.study.quiet_seconds == 2.5
    with pytest.raises(ConfigError) as err:
        load_config(p, environ={"MSKNODE__NODE__PORTS": "1"})
    assert err.value.key == "node.ports"


def test_check_config_command_exit_status(tmp_path):
    good = _write(tmp_path, GOOD)
    r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "--config", str(good), "check-config"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "OK" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_with("node.port", 70000)))
    for command in ("check-config", "serve"):
        r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "--config", str(bad), command],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
        assert r.returncode == 2, r.stderr
        assert f"{bad}: node.port:" in r.stderr
