"""Outbound, the pure part: routing rules and the directory, retry policy, packet renderers."""
