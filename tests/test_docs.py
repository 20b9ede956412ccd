"""The README's signal table mirrors the one in the code; the example config documents every key."""

from __future__ import annotations

import re
from pathlib import Path

from msgd.config import DaemonConfig, HttpConfig, QueueConfig
from msgd.signals import TABLE

ROOT = Path(__file__).parent.parent


def test_readme_signal_table_mirrors_the_code() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Signals", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| ([A-Z0-9]+) \|[^|]*\| (.+?) \|$", section, re.MULTILINE)
    documented = {name: text for name, text in rows if name != "signal"}
    in_code = {sig.name.removeprefix("SIG"): text for sig, (_, text) in TABLE.items()}
    assert documented == in_code


def test_example_config_mentions_every_key() -> None:
    example = (ROOT / "examples" / "msgd.toml").read_text()
    keys = set(re.findall(r"^#?\s*([a-z_]+)\s*=", example, re.MULTILINE))
    for struct in (DaemonConfig, HttpConfig, QueueConfig):
        missing = set(struct.__struct_fields__) - keys
        assert not missing, f"examples/msgd.toml does not document {sorted(missing)}"
