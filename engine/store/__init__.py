"""Persistence: schema, connections and migrations, and the queries each owner needs."""
