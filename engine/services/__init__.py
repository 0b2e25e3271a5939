"""Services between the edges and the store: intake decisions and the group-commit writer."""
