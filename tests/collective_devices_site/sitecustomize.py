"""Loaded at interpreter start-up when this folder is on PYTHONPATH (tests.collective_devices.env())."""

import os

if os.environ.get("GLM5_CHECK_COLLECTIVE_DEVICES"):
    from tests.collective_devices import install

    install()
