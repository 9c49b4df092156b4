"""Maps the top-level folders onto the ``dovecote.*`` import namespace.

``bus/`` is ``dovecote.bus``, ``libs/`` is ``dovecote.libs``, ``services/`` is
``dovecote.services`` (auth, metrics, the CLI and the supervisor), and so on.
Everything else lives in ``pyproject.toml``.
"""

from setuptools import find_packages, setup

FOLDERS = ["bus", "libs", "services", "gateway", "vmmgr", "recorder", "notifier"]

package_dir: dict[str, str] = {}
packages: list[str] = []
for folder in FOLDERS:
    root = f"dovecote.{folder}"
    package_dir[root] = folder
    packages.append(root)
    packages.extend(f"{root}.{sub}" for sub in find_packages(folder))

setup(packages=packages, package_dir=package_dir, package_data={"": ["*.sql", "*.json", "*.md"]})
