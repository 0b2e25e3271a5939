"""Analysts' YAML: reading it safely (source), and later the mapping language itself."""
