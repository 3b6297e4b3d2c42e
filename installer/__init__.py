"""The installer: `build.py` makes the installer files from this checkout; the rest is the installer itself
(standard library only, run as `python -m installer` once unpacked). See docs/installer.md."""
