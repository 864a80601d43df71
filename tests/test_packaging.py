"""The agent stays installable and importable on an edge device without controller deps."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path

CONTROLLER_ONLY = {"fastapi", "uvicorn", "amqtt", "starlette"}
AGENT_PYPROJECT = Path(__file__).resolve().parent.parent / "agent" / "pyproject.toml"


def requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def test_importing_the_agent_loads_no_controller_dependency() -> None:
    """Importing fleet_agent, its Agent and its CLI imports neither fastapi, uvicorn nor amqtt."""
    code = (
        "import json, sys\n"
        "import fleet_agent, fleet_agent.agent, fleet_agent.cli\n"
        "print(json.dumps(sorted({m.partition('.')[0] for m in sys.modules})))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout))
    assert "fleet_agent" in loaded and "aiomqtt" in loaded
    assert loaded.isdisjoint(CONTROLLER_ONLY), loaded & CONTROLLER_ONLY


def test_agent_declares_no_controller_dependency() -> None:
    """agent/pyproject.toml lists neither fastapi, uvicorn nor amqtt as a dependency."""
    project = tomllib.loads(AGENT_PYPROJECT.read_text())["project"]
    declared = [*project.get("dependencies", [])]
    for extra in project.get("optional-dependencies", {}).values():
        declared += extra
    names = {requirement_name(r) for r in declared}
    assert names, "the agent declares no dependencies at all?"
    assert names.isdisjoint(CONTROLLER_ONLY), names & CONTROLLER_ONLY


def test_agent_dependency_closure_excludes_controller_dependencies() -> None:
    """No package the installed agent pulls in, even indirectly, is fastapi, uvicorn or amqtt."""
    closure: set[str] = set()
    todo = ["fleet-agent"]
    while todo:
        name = todo.pop()
        if name in closure:
            continue
        closure.add(name)
        try:
            reqs = requires(name) or []
        except PackageNotFoundError:
            continue  # an environment marker excluded it here
        todo += [requirement_name(r) for r in reqs if "extra ==" not in r]
    assert "aiomqtt" in closure and "pydantic" in closure
    assert closure.isdisjoint(CONTROLLER_ONLY), closure & CONTROLLER_ONLY
