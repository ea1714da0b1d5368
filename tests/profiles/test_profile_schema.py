"""The JSON Schema editors use: profiles/schema.json is the generated one, and the example profiles follow it."""
import json

import pytest
import yaml

from cloudkvm.profile import profile_schema, profile_schema_text
from profile_testdata import PROFILES


def test_committed_schema_is_up_to_date():
    committed = (PROFILES / "schema.json").read_text()
    assert committed == profile_schema_text(), \
        "profiles/schema.json is stale: python3 -c 'from cloudkvm.profile import write_profile_schema as w; w()'"


def test_schema_shape():
    schema = profile_schema()
    assert schema["additionalProperties"] is False
    assert set(schema["then"]["required"]) == {"name", "boot"}  # when there is no base:
    for key in ("base", "name", "arch", "machine", "cpu", "cpus", "memory", "boot", "disks", "network", "console",
                "daemonize", "host_quirks"):
        assert key in schema["properties"], key
    assert "default" not in schema["properties"]["arch"]  # the host's: the schema must not depend on this machine
    assert json.loads(profile_schema_text()) == schema


@pytest.mark.parametrize("path", sorted(PROFILES.rglob("*.yaml")), ids=lambda p: str(p.relative_to(PROFILES)))
def test_example_profiles_name_the_schema_and_follow_it(path):
    first = path.read_text().splitlines()[0]
    relative = "./schema.json" if path.parent == PROFILES else "../schema.json"
    assert first == f"# yaml-language-server: $schema={relative}"
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(yaml.safe_load(path.read_text()), profile_schema())


def test_schema_rejects_what_the_loader_rejects():
    jsonschema = pytest.importorskip("jsonschema")
    schema = profile_schema()
    ok = {"name": "a", "boot": {"kernel": "k"}, "memory": "4G", "cpu": "host", "network": {
        "mode": "user", "forwards": ["tcp:127.0.0.1:2222-:22", {"host_port": 1, "guest_port": 2}]}}
    jsonschema.validate(ok, schema)
    for bad in ({**ok, "memroy": "4G"}, {**ok, "cpus": 0}, {**ok, "network": {"forwards": [":1-:2"]}},
                {**ok, "cpu": {"hide": ["avx5"]}}, {**ok, "arch": "riscv64"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    for missing in ({"name": "a"}, {"name": "a", "boot": {"cmdline": "x"}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(missing, schema)
        jsonschema.validate({**missing, "base": "other.yaml"}, schema)  # the base may supply them
