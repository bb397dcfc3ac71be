"""The environment is the lock: every installed distribution is pinned in requirements.lock at the
version installed (nothing floats, nothing extra), pip's dependency check is clean, the direct
pins of requirements.txt agree with the lock, and the optional extras in pyproject.toml are pinned."""
from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import ROOT
from packaging.requirements import Requirement

FIX = "run `make venv` to install exactly the lock, or `make lock` after changing requirements.txt"
IGNORED = {"pip"}  # the lock leaves pip out (pip freeze --all | grep -v pip)


def canonical(name: str) -> str:
    """PEP 503 normalised name: runs of -, _ and . become one -, lower case."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_lines(path: Path) -> list[str]:
    """The requirement lines of a pip requirements file (comments and blank lines dropped)."""
    lines = (line.split(" #")[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def read_lock() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in requirement_lines(ROOT / "requirements.lock"):
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"requirements.lock: {line!r} is not a name==version pin"
        assert canonical(req.name) not in pins, f"requirements.lock pins {req.name} twice"
        pins[canonical(req.name)] = specs[0].version
    return pins


def project_name() -> str:
    return canonical(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"])


def installed() -> dict[str, set[str]]:
    """Normalised name -> versions of every distribution this interpreter can import from."""
    found: dict[str, set[str]] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonical(name), set()).add(dist.version)
    return found


def test_installed_distributions_are_exactly_the_lock():
    lock = read_lock()
    have = installed()
    ignored = IGNORED | {project_name()}
    problems = []
    for name in sorted(set(lock) | set(have)):
        if name in ignored:
            continue
        versions = have.get(name, set())
        if not versions:
            problems.append(f"missing: {name}=={lock[name]} is in requirements.lock but not installed")
        elif name not in lock:
            problems.append(f"extra: {name}=={'/'.join(sorted(versions))} is installed but not in requirements.lock")
        elif versions != {lock[name]}:
            problems.append(f"different: {name} installed {'/'.join(sorted(versions))}, requirements.lock {lock[name]}")
    assert not problems, (f"the environment ({sys.prefix}) differs from requirements.lock; {FIX}:\n  "
                          + "\n  ".join(problems))


def test_pip_check_is_clean():
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"pip check: broken requirements; {FIX}:\n{proc.stdout}{proc.stderr}"


def test_direct_requirements_agree_with_the_lock():
    lock = read_lock()
    problems = []
    for line in requirement_lines(ROOT / "requirements.txt"):
        req = Requirement(line)
        name = canonical(req.name)
        pinned = [s.version for s in req.specifier if s.operator in ("==", "===")]
        if name not in lock:
            problems.append(f"{req.name}: in requirements.txt, not in requirements.lock")
        elif pinned and pinned[0] != lock[name]:
            problems.append(f"{req.name}: requirements.txt pins {pinned[0]}, requirements.lock has {lock[name]}")
        elif not req.specifier.contains(lock[name], prereleases=True):
            problems.append(f"{req.name}: requirements.lock's {lock[name]} does not satisfy {req.specifier}")
    assert not problems, "requirements.txt and requirements.lock disagree; run `make lock`:\n  " + "\n  ".join(problems)


def test_optional_extras_are_pinned_exactly():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras, "pyproject.toml declares no optional extras"
    for extra, requirements in extras.items():
        for line in requirements:
            specs = list(Requirement(line).specifier)
            assert len(specs) == 1 and specs[0].operator == "==", (
                f"pyproject.toml extra [{extra}]: {line!r} is not pinned with ==")
    # The API our kernels call (natten.na2d(q, k, v, kernel_size=, dilation=, scale=), heads last) is 0.21's.
    assert "natten==0.21.7" in extras["natten"]
