"""The command-line tools (run as scripts: python tools/NAME.py); tools/lib holds what they share."""
