"""A self-contained HTML thumbnail gallery of the published table (images inlined as data URIs)."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from dicom_lakehouse.params import IDENTIFIER

COLUMNS = ("path", "relative_path", "patient_id", "study_instance_uid", "study_date", "study_description",
           "series_instance_uid", "series_description", "modality", "status", "thumbnail_status", "thumbnail",
           "thumbnail_width", "thumbnail_height")

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 13px system-ui, sans-serif; margin: 16px; background: #111; color: #ddd; }}
h1 {{ font-size: 18px; }} input {{ width: 320px; padding: 4px; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 12px; margin-top: 12px; }}
.card {{ width: 200px; background: #222; border-radius: 6px; padding: 8px; overflow-wrap: anywhere; }}
.card .img {{ height: 200px; display: flex; align-items: center; justify-content: center; background: #000; }}
.card img {{ max-width: 200px; max-height: 200px; image-rendering: auto; }}
.none {{ color: #888; }} .k {{ color: #8ab; }}
</style></head><body>
<h1>{title}</h1>
<p>{count} files{where}; <span id="loaded">thumbnails loading</span>.
<input id="q" placeholder="filter: patient, modality, path..." oninput="f()"></p>
<div class="grid" id="g">
{cards}
</div>
<script>
function f() {{
  const q = document.getElementById('q').value.toLowerCase();
  for (const c of document.querySelectorAll('.card'))
    c.style.display = c.dataset.text.includes(q) ? '' : 'none';
}}
window.addEventListener('load', () => {{
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.loaded = ok + '/' + imgs.length;
  document.getElementById('loaded').textContent = ok + ' of ' + imgs.length + ' thumbnails shown';
}});
</script>
</body></html>
"""


def card(row: dict) -> str:
    e = lambda v: html.escape("" if v is None else str(v))  # noqa: E731
    if row.get("thumbnail"):
        data = base64.b64encode(row["thumbnail"]).decode()
        img = (f'<img src="data:image/png;base64,{data}" width="{row["thumbnail_width"]}" '
               f'height="{row["thumbnail_height"]}" alt="{e(row["relative_path"])}">')
    else:
        img = f'<span class="none">{e(row.get("thumbnail_status") or "no thumbnail")}</span>'
    fields = [("patient", row.get("patient_id")), ("study", row.get("study_date") or row.get("study_description")),
              ("series", row.get("series_description") or row.get("series_instance_uid")),
              ("modality", row.get("modality")), ("status", row.get("status")), ("path", row.get("relative_path"))]
    text = " ".join(e(v).lower() for _, v in fields)
    body = "<br>".join(f'<span class="k">{k}</span> {e(v)}' for k, v in fields)
    return f'<div class="card" data-text="{text}"><div class="img">{img}</div>{body}</div>'


def write_gallery(rows: list[dict], out: str | Path, title: str, where: str | None = None) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    page = PAGE.format(title=html.escape(title), count=len(rows),
                       where=f" where {html.escape(where)}" if where else "",
                       cards="\n".join(card(r) for r in rows))
    out.write_text(page, encoding="utf-8")
    return out


class GalleryError(ValueError):
    """--table or --where is refused; the message says what is allowed."""


def check_table(name: str) -> str:
    """A three-part name of plain identifiers: it is pasted into SQL, so nothing else may pass."""
    parts = name.split(".")
    if len(parts) != 3 or not all(IDENTIFIER.match(x) for x in parts):
        raise GalleryError(f"--table {name!r} is not catalog.schema.table made of letters, digits and '_'")
    return name


# What a gallery condition may use: columns, literals, comparisons, boolean logic, arithmetic and
# a few pure functions. No subquery, no other function (reflect() and java_method() call Java).
_NODES = ("Column", "Identifier", "Literal", "Boolean", "Null", "Paren", "Tuple", "And", "Or", "Not", "EQ", "NEQ",
          "NullSafeEQ", "NullSafeNEQ", "GT", "GTE", "LT", "LTE", "Is", "In", "Like", "ILike", "Between", "Neg",
          "Add", "Sub", "Mul", "Div", "Mod", "Cast", "TryCast", "DataType", "DataTypeParam")
_FUNCTIONS = ("Lower", "Upper", "Trim", "Length", "Substring", "Coalesce", "Year", "Month", "Day", "Abs", "Round",
              "Concat", "StartsWith", "EndsWith", "Contains", "TsOrDsToDate", "StrToDate")


def check_where(where: str, columns) -> str:
    """Parse --where as one boolean expression (sqlglot's Spark dialect) and allow only the nodes
    above and the table's own columns; returns the condition re-written from the parse tree, which
    Spark then parses again as a single expression (Column expr), never as a statement."""
    import sqlglot
    from sqlglot import exp

    try:
        tree = sqlglot.parse_one(where, read="spark", into=exp.Condition)
    except sqlglot.errors.ParseError as e:
        raise GalleryError(f"--where is not one SQL condition: {str(e).splitlines()[0][:200]}") from None
    allowed = {getattr(exp, n) for n in (*_NODES, *_FUNCTIONS) if hasattr(exp, n)}
    for node in tree.walk():
        if type(node) not in allowed:
            what = node.sql(dialect="spark")[:80] if not isinstance(node, exp.Anonymous) else f"{node.name}()"
            raise GalleryError(f"--where may not use {what!r} ({type(node).__name__}): use columns, literals, "
                               "comparisons, AND/OR/NOT, IN, LIKE, BETWEEN, IS NULL and "
                               f"{', '.join(f.lower() for f in _FUNCTIONS[:11])}")
        if isinstance(node, exp.Column) and (node.table or node.name not in columns):
            raise GalleryError(f"--where names {node.sql(dialect='spark')!r}, which is not a column of the table")
    return tree.sql(dialect="spark", comments=False)


# `path` last: a total order, so both engines cut --limit at the same card.
ORDER = ("patient_id", "study_instance_uid", "series_instance_uid", "relative_path", "path")


def gallery_rows(table_df, condition: str | None, limit: int) -> list[dict]:
    """The cards' rows. `condition` is what check_where returned; it goes in as one Spark
    expression, not as SQL text."""
    from pyspark.sql import functions as F

    df = table_df.select(*COLUMNS)
    if condition:
        df = df.where(F.expr(condition))
    return [r.asDict() for r in df.orderBy(*ORDER).limit(int(limit)).collect()]


class NotOnDataFusion(ValueError):
    """The condition uses something whose meaning on DataFusion is not known to be Spark's."""


# The part of check_where's language that means the same on DataFusion as in Spark SQL (ANSI mode)
# when the operands' types agree: no arithmetic (overflow and integer division differ), no casts
# (accepted formats differ), no concat (NULLs differ), no substring/round (argument rules differ).
_DF_SAME = ("Column", "Identifier", "Literal", "Boolean", "Null", "Paren", "Tuple", "And", "Or", "Not", "EQ", "NEQ",
            "NullSafeEQ", "NullSafeNEQ", "GT", "GTE", "LT", "LTE", "Is", "In", "Like", "ILike", "Between", "Neg",
            "Lower", "Upper", "Trim", "Length", "Coalesce", "Abs", "Year", "Month", "Day", "TsOrDsToDate")
_KINDS = {"string": "string", "int": "number", "bigint": "number", "smallint": "number", "tinyint": "number",
          "double": "number", "float": "number", "date": "date", "boolean": "boolean"}


def _iso_date(node) -> bool:
    import datetime

    from sqlglot import exp

    if not (isinstance(node, exp.Literal) and node.is_string and re.fullmatch(r"\d{4}-\d{2}-\d{2}", node.this)):
        return False
    try:
        datetime.date.fromisoformat(node.this)
    except ValueError:
        return False
    return True


def _kind(node, kinds: dict) -> str:
    """string, number, date, boolean or null: the operand types that DataFusion and Spark treat alike."""
    from sqlglot import exp

    def same(*nodes):
        found = [_kind(n, kinds) for n in nodes]
        if "date" in found:  # date = 'YYYY-MM-DD' compares dates in both
            found = ["date" if _iso_date(n) else k for n, k in zip(nodes, found, strict=True)]
        found = set(found) - {"null"}
        if len(found) > 1:
            raise NotOnDataFusion(f"it compares {' with '.join(sorted(found))}")
        return found.pop() if found else "null"

    if type(node).__name__ not in _DF_SAME:
        raise NotOnDataFusion(f"it uses {type(node).__name__}")
    if isinstance(node, exp.Column):
        if node.name not in kinds:
            raise NotOnDataFusion(f"column {node.name} is not a string, number, date or boolean")
        return kinds[node.name]
    if isinstance(node, exp.Literal):
        return "string" if node.is_string else "number"
    if isinstance(node, exp.Null):
        return "null"
    if isinstance(node, exp.Boolean):
        return "boolean"
    if isinstance(node, exp.Paren):
        return _kind(node.this, kinds)
    if isinstance(node, exp.Neg):
        if not (isinstance(node.this, exp.Literal) and not node.this.is_string):
            raise NotOnDataFusion("it negates something other than a number")
        return "number"
    if isinstance(node, (exp.And, exp.Or)):
        if {_kind(node.this, kinds), _kind(node.expression, kinds)} - {"boolean", "null"}:
            raise NotOnDataFusion("AND/OR of something other than conditions")
        return "boolean"
    if isinstance(node, exp.Not):
        if _kind(node.this, kinds) not in ("boolean", "null"):
            raise NotOnDataFusion("NOT of something other than a condition")
        return "boolean"
    if isinstance(node, exp.Is):
        if not isinstance(node.expression, exp.Null):
            raise NotOnDataFusion("IS with something other than NULL")
        _kind(node.this, kinds)
        return "boolean"
    if isinstance(node, (exp.Like, exp.ILike)):
        pattern = node.expression
        if not (isinstance(pattern, exp.Literal) and pattern.is_string) or _kind(node.this, kinds) != "string":
            raise NotOnDataFusion("LIKE of something other than a text column and a text pattern")
        if any(m.group(1) not in ("\\", "_", "%") for m in re.finditer(r"\\(.|$)", pattern.this, re.S)):
            raise NotOnDataFusion("its LIKE pattern has a '\\' before something other than _, % or '\\'")
        return "boolean"
    if isinstance(node, exp.In):
        same(node.this, *node.expressions)
        return "boolean"
    if isinstance(node, exp.Between):
        same(node.this, node.args["low"], node.args["high"])
        return "boolean"
    if isinstance(node, (exp.EQ, exp.NEQ, exp.NullSafeEQ, exp.NullSafeNEQ, exp.GT, exp.GTE, exp.LT, exp.LTE)):
        same(node.this, node.expression)
        return "boolean"
    if isinstance(node, (exp.Lower, exp.Upper, exp.Trim)):
        if set(node.args) - {"this"} and any(node.args[k] for k in set(node.args) - {"this"}):
            raise NotOnDataFusion(f"{type(node).__name__} with more than one argument")
        if _kind(node.this, kinds) not in ("string", "null"):
            raise NotOnDataFusion(f"{type(node).__name__} of something other than text")
        return "string"
    if isinstance(node, exp.Length):
        if _kind(node.this, kinds) not in ("string", "null"):
            raise NotOnDataFusion("length of something other than text")
        return "number"
    if isinstance(node, exp.Abs):
        if _kind(node.this, kinds) not in ("number", "null"):
            raise NotOnDataFusion("abs of something other than a number")
        return "number"
    if isinstance(node, exp.Coalesce):
        return same(node.this, *node.expressions)
    if isinstance(node, (exp.Year, exp.Month, exp.Day)):
        inner = node.this.this if isinstance(node.this, exp.TsOrDsToDate) else node.this
        if isinstance(node.this, exp.TsOrDsToDate) and node.this.args.get("format"):
            raise NotOnDataFusion(f"{type(node).__name__} with a format")
        if _kind(inner, kinds) != "date":
            raise NotOnDataFusion(f"{type(node).__name__} of something other than a date column")
        return "number"
    raise NotOnDataFusion(f"it uses {type(node).__name__}")


def datafusion_condition(condition: str, kinds: dict) -> str:
    """check_where's condition as DataFusion SQL with the same meaning, or NotOnDataFusion saying why
    not. `kinds` maps columns to string/number/date/boolean (see column_kinds). The text is generated
    from the checked parse tree (PostgreSQL's syntax, which DataFusion follows), never pasted."""
    import sqlglot
    from sqlglot import exp

    tree = sqlglot.parse_one(condition, read="spark", into=exp.Condition)
    if _kind(tree, kinds) not in ("boolean", "null"):
        raise NotOnDataFusion("it is not a condition")
    return tree.sql(dialect="postgres", identify=True, comments=False)


def column_kinds(spark_schema) -> dict:
    return {f.name: _KINDS[f.dataType.simpleString()] for f in spark_schema.fields
            if f.dataType.simpleString() in _KINDS}


def gallery_rows_delta_rs(folder, condition: str | None, limit: int) -> list[dict]:
    """gallery_rows on delta-rs's own engine (DataFusion): no JVM. `condition` is what
    datafusion_condition returned. Spark sorts NULLs first, so they are asked for here."""
    import pyarrow as pa
    from deltalake import DeltaTable, QueryBuilder

    qb = QueryBuilder().register("gallery", DeltaTable(str(folder)))
    cols = ", ".join(f'"{c}"' for c in COLUMNS)
    order = ", ".join(f'"{c}" ASC NULLS FIRST' for c in ORDER)
    where = f" WHERE {condition}" if condition else ""
    query = f"SELECT {cols} FROM gallery{where} ORDER BY {order} LIMIT {int(limit)}"
    return pa.RecordBatchReader.from_stream(qb.execute(query)).read_all().to_pylist()
