"""Packaging: everything is in setup.cfg except the package list, which adds the configs.

``configs/`` (top of the repository) is shipped as the data-only package ``torchreid_vi.configs``
(``package_dir`` in setup.cfg), so an installed wheel carries the yaml configs.
"""
from setuptools import find_packages, setup

setup(packages=find_packages(include=['torchreid_vi', 'torchreid_vi.*']) + ['torchreid_vi.configs'])
