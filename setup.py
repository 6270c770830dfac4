"""The one thing pyproject.toml cannot say: the top-level configs/ folder (kept there for
readers) ships inside the wheel as the package jaxcourse.configs."""
from setuptools import find_namespace_packages, setup

setup(
    packages=find_namespace_packages(include=["jaxcourse*", "pallas_kernels*"],
                                     exclude=["*.__pycache__"]) + ["jaxcourse.configs"],
    package_dir={"jaxcourse.configs": "configs"},
)
