"""Package layout: ``kernels/`` and ``export/`` sit at the top of the repository (one folder per
concern, as the project's layout asks) but install as ``mgr_engine.kernels`` and
``mgr_engine.export`` so that users import a single package."""

from setuptools import setup

setup(
    packages=["mgr_engine", "mgr_engine.kernels", "mgr_engine.export"],
    package_dir={"mgr_engine": "mgr_engine", "mgr_engine.kernels": "kernels", "mgr_engine.export": "export"},
)
