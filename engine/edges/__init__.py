"""The I/O shells: MLLP listener and client, HTTP app, daemon composition, CLI."""
