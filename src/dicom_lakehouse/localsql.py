r"""SQL on three-part names over the local warehouse, as on Unity Catalog.

Locally, table `c.s.t` is the Delta folder `<warehouse>/c/s/t`. Spark's session catalog
has no third level for plain folders (and Unity Catalog OSS has no connector for this Spark
on Maven Central), so the three-part names in the query text are mapped to the folders:
to `delta.\`<folder>\`` when the session has Spark's Delta engine, else to temporary views
over the files of each table's current version. The same query then runs unchanged locally
and on Databricks.
"""

from __future__ import annotations

import re
from pathlib import Path

from .params import IDENTIFIER


def warehouse_tables(warehouse: str | Path) -> dict[str, Path]:
    """`catalog.schema.table` -> folder, for every Delta table in the warehouse."""
    found = {}
    root = Path(warehouse)
    for log in sorted(root.glob("*/*/*/_delta_log")):
        c, s, t = log.parent.relative_to(root).parts
        if all(IDENTIFIER.match(x) for x in (c, s, t)):
            found[f"{c}.{s}.{t}"] = log.parent
    return found


def view_name(full: str) -> str:
    return "dl__" + full.replace(".", "__")


def register(spark, warehouse: str | Path) -> dict[str, str]:
    """`c.s.t` -> how this session names that table."""
    from .session import has_spark_delta

    tables = warehouse_tables(warehouse)
    if has_spark_delta(spark):
        return {full: f"delta.`{folder.resolve()}`" for full, folder in tables.items() if "`" not in str(folder)}
    views = {}
    for full, folder in tables.items():
        from deltalake import DeltaTable

        files = DeltaTable(str(folder)).file_uris()
        if files:
            df = spark.read.parquet(*files)
        else:
            from . import schema as S

            df = spark.createDataFrame([], S.spark_schema("publish"))
        df.createOrReplaceTempView(view_name(full))
        views[full] = view_name(full)
    return views


def rewrite(query: str, views: dict[str, str]) -> str:
    """Replace `c.s.t` and `` `c`.`s`.`t` `` by the registered view names."""

    def sub(m):
        parts = [p.strip("`") for p in (m.group(1), m.group(2), m.group(3))]
        full = ".".join(parts)
        return views.get(full, m.group(0))

    ident = r"(`[^`]+`|[A-Za-z_][A-Za-z0-9_]*)"
    return re.sub(rf"(?<![\w.`]){ident}\s*\.\s*{ident}\s*\.\s*{ident}(?![\w`])", sub, query)


def run_sql(spark, warehouse: str | Path, query: str):
    return spark.sql(rewrite(query, register(spark, warehouse)))
