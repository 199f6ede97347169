"""Every configuration key has an effect: each field of the Config model is read by the code, every key
documented in the README exists (and every key exists in the README), and logging.level and
pipeline.batch_size change what the node does."""

from __future__ import annotations

import ast
import re
import typing
from pathlib import Path

from pydantic import BaseModel

from dicom_node.config import Config

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("dicom_node", "storage", "inference")
CONFIG_PY = REPO / "dicom_node" / "config.py"


def _model_in(annotation) -> tuple[type[BaseModel] | None, bool]:
    """The pydantic model a field holds (directly, in a list or an optional), and whether in a list."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin = typing.get_origin(annotation)
    for arg in typing.get_args(annotation):
        model, in_list = _model_in(arg)
        if model is not None:
            return model, in_list or origin is list
    return None, False


def config_fields(model: type[BaseModel] = Config, prefix: str = "", seen: set | None = None):
    """(path, name, is_leaf) of every field, recursively; list items are written ``[]``. A model's fields
    are walked where it first appears (``routing.default`` is a rule, documented with ``routing.rules[]``)."""
    seen = set() if seen is None else seen
    for name, info in model.model_fields.items():
        if info.exclude:  # not a YAML key (Config.source)
            continue
        path = f"{prefix}{name}"
        sub, in_list = _model_in(info.annotation)
        if sub is None or sub in seen:
            yield path, name, True
            continue
        seen.add(sub)
        path += "[]" if in_list else ""
        yield path, name, False
        yield from config_fields(sub, path + ".", seen)


def _source_outside_config() -> str:
    return "\n".join(p.read_text() for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py")) if p != CONFIG_PY)


def _read_by_used_methods(outside: str) -> set[str]:
    """Fields read (``self.x``) in config.py by a model's own methods that the code outside calls
    (``SendingSection.delay``); validators do not count."""
    read: set[str] = set()
    for cls in ast.parse(CONFIG_PY.read_text()).body:
        if not isinstance(cls, ast.ClassDef):
            continue
        for fn in cls.body:
            if not isinstance(fn, ast.FunctionDef) or fn.decorator_list:
                continue
            if not re.search(rf"\.{fn.name}\(", outside):
                continue
            read |= {n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute)
                     and isinstance(n.value, ast.Name) and n.value.id == "self"}
    return read


def test_every_config_field_has_a_reader():
    outside = _source_outside_config()
    by_methods = _read_by_used_methods(outside)
    unread = sorted({path for path, name, _ in config_fields()
                     if name not in by_methods and not re.search(rf"\.{name}\b", outside)})
    assert not unread, f"configuration fields that no code outside config.py reads: {unread}"


def test_the_reader_check_finds_an_unread_field():
    class Probe(BaseModel):
        never_read_anywhere_xyz: int = 0

    outside = _source_outside_config()
    names = [name for _, name, _ in config_fields(Probe)]
    assert names == ["never_read_anywhere_xyz"] and not re.search(rf"\.{names[0]}\b", outside)


def readme_keys() -> dict[str, str]:
    """Key -> its table row, from the README's configuration tables (``a.b`` / ``c`` is ``a.b`` and ``a.c``)."""
    sections = set(Config.model_fields)
    keys: dict[str, str] = {}
    for line in (REPO / "docs" / "configuration.md").read_text().splitlines():
        if not line.startswith("| `"):
            continue
        first = line.split("|")[1]
        names = re.findall(r"`([^`]+)`", first)
        if not names or names[0].split(".")[0].split("[")[0] not in sections:
            continue
        parent = names[0].rsplit(".", 1)[0] if "." in names[0] else ""
        keys[names[0]] = line
        for other in names[1:]:
            keys[f"{parent}.{other}" if parent else other] = line
    return keys


def test_readme_config_tables_match_the_model():
    documented = readme_keys()
    fields = list(config_fields())
    paths = {path for path, _, _ in fields}
    assert sorted(set(documented) - paths) == [], "README keys that are not in the Config model"
    missing = []
    for path, name, leaf in fields:
        if not leaf or path in documented:
            continue
        # documented by an enclosing key whose row names it (routing.rules[] lists name, match, skip, ...)
        parents = [p for p in documented if path.startswith(p + ".")]
        if not any(f"`{name}`" in documented[p] for p in parents):
            missing.append(path)
    assert missing == [], "Config fields missing from the README's configuration tables"


def test_logging_level_reaches_the_node(tmp_path):
    from tests.nodeproc import NodeProcess, node_config

    logs = {}
    for level in ("DEBUG", "WARNING"):
        node = NodeProcess(tmp_path / level, node_config(tmp_path / level, logging={"level": level})).start()
        node.stop()
        logs[level] = node.log()
    assert " DEBUG dicom_node: starting:" in logs["DEBUG"] and " INFO dicom_node: msk-dicom-node" in logs["DEBUG"]
    assert " DEBUG " not in logs["WARNING"] and " INFO " not in logs["WARNING"]


def test_log_level_option_overrides_logging_level(tmp_path):
    import subprocess
    import sys

    import yaml

    from tests.nodeproc import node_config

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(node_config(tmp_path, logging={"level": "WARNING"})))
    p = subprocess.run([sys.executable, "-m", "dicom_node.cli", "--config", str(config), "--log-level", "bogus",
                        "status"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--log-level" in p.stderr


def test_batch_size_sets_the_images_per_forward_pass():
    import pydicom
    from pydicom.data import get_testdata_file

    from dicom_node import stages
    from inference import load_bundle

    model = load_bundle(None, "cpu")
    ds = pydicom.dcmread(get_testdata_file("RG3_J2KI.dcm"))
    images = [stages.LoadedImage(f"image-{i}", stages.ImageFacts("", "CR", "", "", ds.SOPClassUID), ds)
              for i in range(5)]
    seen: list[int] = []
    hook = model.mae.encoder.patch_embed.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    try:
        for batch_size, passes in ((2, [2, 2, 1]), (8, [5])):
            seen.clear()
            results = stages.infer(model, images, batch_size, heads={"fracture", "anatomy"})
            assert seen == passes and [r.image_id for r in results] == [im.image_id for im in images]
    finally:
        hook.remove()
    assert all(r.processed for r in results)


