# Metadata lives in pyproject.toml; this shim keeps `pip install -e .` working with older tooling.
from setuptools import setup

setup()
