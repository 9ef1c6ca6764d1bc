"""Spark: the one place that makes a session, the Connect server, Delta's jars, shipping the library."""
