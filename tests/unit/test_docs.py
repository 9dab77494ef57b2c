"""The README is a front door (at most 15 KB, its links lead somewhere) and the configuration reference is generated
from the schema: a key without an entry, or a reference older than the schema, fails here."""

from __future__ import annotations

import re
import subprocess
import sys

import yaml
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
from config_reference import keys


def test_the_readme_is_at_most_15_kb_and_its_links_resolve() -> None:
    readme = REPO / "README.md"
    assert readme.stat().st_size <= 15 * 1024, readme.stat().st_size
    text = readme.read_text()
    assert "make demo" in text and "make test" in text
    links = re.findall(r"\]\(([^)#]+)\)", text)
    assert links and all((REPO / link).exists() for link in links if "://" not in link), links


def test_every_config_key_has_a_reference_entry_and_the_reference_is_current() -> None:
    res = subprocess.run([sys.executable, str(REPO / "scripts/config_reference.py"), "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    doc = (REPO / "docs/configuration.md").read_text()
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    missing = [path for path, _ in keys(schema) if f"`{path}`" not in doc]
    assert not missing, missing


def test_the_generators_page_is_current_with_the_registries() -> None:
    """docs/generators.md's architecture and architecture x method tables are what the registries say today."""
    res = subprocess.run([sys.executable, str(REPO / "scripts/generators_doc.py"), "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    doc = (REPO / "docs/generators.md").read_text()
    assert "| `img2img` | runs | runs | runs | runs | refused (1) | refused (1) | runs |" in doc
