"""Package discovery for the folders pyproject.toml maps into `rewriter` (setuptools cannot discover
packages under a remapped package-dir by itself): every package below each folder is included, so a
new kernel or rule folder is never left out of a wheel."""
from setuptools import find_packages, setup

FOLDERS = {"rewriter": "rewriter", "rewriter.patterns": "patterns", "rewriter.kernels": "kernels",
           "rewriter.models": "models"}

setup(packages=[p for name, folder in FOLDERS.items()
                for p in [name] + [f"{name}.{sub}" for sub in find_packages(folder)]])
