"""Build-time half of the one-import-name layout (the run-time half is in m2skd/__init__.py).

The repository keeps pipeline/, cli.py, data_manifests/ and configs/ at its top level; the
distribution installs them inside m2skd, so a wheel puts no generic top-level names (`cli`,
`pipeline`) into site-packages. Packages and package data are mapped in pyproject.toml; a single
module cannot be mapped there, so cli.py -> m2skd/cli.py is done here.
"""
from setuptools import setup
from setuptools.command.build_py import build_py

MODULES = {"m2skd.cli": "cli.py"}  # dotted module name -> file in the repository


class BuildPy(build_py):
    def find_modules(self):
        return [(name.rpartition(".")[0], name.rpartition(".")[2], path) for name, path in MODULES.items()]


setup(py_modules=list(MODULES), cmdclass={"build_py": BuildPy})
