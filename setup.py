"""Build script: setup.py is the one place that knows compiler flags (see pyproject.toml)."""

from setuptools import setup

setup()
