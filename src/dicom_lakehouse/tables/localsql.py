r"""SQL on three-part names over the local warehouse, as on Unity Catalog.

Locally, table `c.s.t` is the Delta folder `<warehouse>/c/s/t`. Spark's session catalog
has no third level for plain folders (and Unity Catalog OSS has no connector for this Spark
on Maven Central), so the three-part names in the query text are mapped to the folders:
to `delta.\`<folder>\`` when the session has Spark's Delta engine, else to temporary views
over the files of each table's current version. The same query then runs unchanged locally
and on Databricks.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from dicom_lakehouse.tables.ref import TableRef


def warehouse_tables(warehouse: str | Path) -> dict[str, Path]:
    """`catalog.schema.table` -> folder, for every Delta table in the warehouse."""
    found = {}
    root = Path(warehouse)
    for log in sorted(root.glob("*/*/*/_delta_log")):
        name = ".".join(log.parent.relative_to(root).parts)
        with contextlib.suppress(ValueError):  # a folder that is no table name
            found[name] = TableRef.parse(name).folder(root)
    return found


def view_name(full: str) -> str:
    return "dl__" + full.replace(".", "__")


def register(spark, warehouse: str | Path) -> dict[str, str]:
    """`c.s.t` -> how this session names that table."""
    from dicom_lakehouse.spark.session import has_spark_delta

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
            from dicom_lakehouse.tables import schema as S

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


class QueryRefused(ValueError):
    """`RUNME.py sql` was given something other than one query; the message says what it accepts."""


QUERY_WORDS = ("SELECT", "WITH", "VALUES", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "TABLE", "FROM")
# Words that change a table or the session. `WITH ... INSERT` and `FROM t INSERT ...` are Spark SQL too,
# so a query's first word is not enough: none of these may appear outside strings and quoted names.
WRITE_WORDS = {"INSERT", "UPDATE", "DELETE", "MERGE", "DROP", "CREATE", "ALTER", "TRUNCATE", "OVERWRITE", "CACHE",
               "UNCACHE", "REFRESH", "MSCK", "LOAD", "VACUUM", "OPTIMIZE", "RESTORE", "GRANT", "REVOKE"}


def check_query(query: str) -> None:
    """Refuse anything but a single read-only statement, before any session starts: `run_sql`
    maps table names to temporary views (or folders), so a DROP or INSERT there would report
    success while changing nothing, or change the files behind the catalog's back."""
    import sqlglot
    from sqlglot.tokens import TokenType

    allowed = ", ".join(QUERY_WORDS)
    try:
        tokens = sqlglot.tokenize(query, read="spark")
    except sqlglot.errors.TokenError:
        raise QueryRefused("the query cannot be read as SQL: check its quotes and comments") from None
    while tokens and tokens[-1].token_type == TokenType.SEMICOLON:
        tokens.pop()
    if not tokens:
        raise QueryRefused("the query is empty")
    if any(t.token_type == TokenType.SEMICOLON for t in tokens):
        raise QueryRefused("give one statement: the query has more than one (';')")
    first = next((t for t in tokens if t.token_type != TokenType.L_PAREN), tokens[0])
    if first.text.upper() not in QUERY_WORDS:
        raise QueryRefused(f"sql runs queries only ({allowed}), not {first.text.upper()[:30]!r}: "
                           "tables change through the job (python RUNME.py --run)")
    quoted = {TokenType.STRING, TokenType.IDENTIFIER, TokenType.RAW_STRING, TokenType.NATIONAL_STRING}
    writes = [t.text.upper() for t in tokens if t.token_type not in quoted and t.text.upper() in WRITE_WORDS]
    if writes:
        raise QueryRefused(f"sql runs queries only ({allowed}); this one also has {writes[0]!r}: "
                           "tables change through the job (python RUNME.py --run)")


def run_sql(spark, warehouse: str | Path, query: str):
    return spark.sql(rewrite(query, register(spark, warehouse)))


def run_sql_delta_rs(warehouse: str | Path, query: str):
    """The query on delta-rs's own SQL engine (DataFusion), as an Arrow table: no JVM. For queries
    that are the same in both dialects (the demo's summary); `run_sql` is the Spark SQL of Databricks."""
    from deltalake import DeltaTable, QueryBuilder

    qb, views = QueryBuilder(), {}
    for full, folder in warehouse_tables(warehouse).items():
        qb.register(view_name(full), DeltaTable(str(folder)))
        views[full] = view_name(full)
    import pyarrow as pa

    return pa.RecordBatchReader.from_stream(qb.execute(rewrite(query, views))).read_all()


def show_text(table, limit: int = 50) -> str:
    """Rows as Spark's `DataFrame.show()` prints them (right-aligned, `null` for nulls)."""
    names = table.column_names
    rows = [["null" if v is None else str(v) for v in r.values()] for r in table.slice(0, limit).to_pylist()]
    widths = [max([len(n), *(len(r[i]) for r in rows)]) for i, n in enumerate(names)]
    rule = "+" + "+".join("-" * w for w in widths) + "+"
    line = lambda cells: "|" + "|".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + "|"  # noqa: E731
    return "\n".join([rule, line(names), rule, *(line(r) for r in rows), rule])
