"""Task definitions: one file per task, each registering itself by name (see `_base.py`)."""
