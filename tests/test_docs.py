"""The documentation: links resolve, and the README's first study matches the shipped config.yaml."""

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_every_relative_link_points_at_a_file():
    broken = []
    for document in DOCUMENTS:
        for target in LINK.findall(document.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path = target.split("#", 1)[0]
            if path and not (document.parent / path).exists():
                broken.append(f"{document.relative_to(REPO)}: {target}")
    assert broken == []


def test_the_readme_lists_every_document():
    readme = (REPO / "README.md").read_text()
    linked = {target.split("#", 1)[0] for target in LINK.findall(readme)}
    expected = {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")} | {"CHANGELOG.md", "LICENSE", "NOTICE"}
    assert expected <= linked
    assert len(expected) >= 8


def test_first_study_commands_match_config_yaml():
    readme = (REPO / "README.md").read_text()
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    node = config["node"]
    storescu = next(peer for peer in config["peers"] if peer["ae_title"] == "STORESCU")
    send = re.search(r"^storescu -aec (\S+) (\S+) (\d+) ", readme, re.MULTILINE)
    assert send is not None, "the README sends a first study with storescu"
    assert send.group(1) == node["ae_title"]
    assert send.group(2) == storescu["host"]
    assert int(send.group(3)) == node["port"]
    receive = re.search(r"storescp -od received (\d+)", readme)
    assert receive is not None and int(receive.group(1)) == storescu["port"]


def test_license_and_notice():
    license_text = (REPO / "LICENSE").read_text()
    assert license_text.lstrip().startswith("Apache License")
    assert "END OF TERMS AND CONDITIONS" in license_text and len(license_text.splitlines()) > 150
    notice = (REPO / "NOTICE").read_text()
    for needed in ("FracAtlas", "doi:10.1038/s41597-023-02432-4", "doi:10.17632/56rmx5bjcr.1",
                   "Osteoarthritis Initiative", "CC BY 4.0", "inference/bundles/", "tests/fixtures/"):
        assert needed in notice, needed
