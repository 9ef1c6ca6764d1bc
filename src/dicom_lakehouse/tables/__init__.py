"""The tables: the store for each Delta engine, the table schema, derived tables and local SQL."""
