"""A self-contained HTML thumbnail gallery of the published table (images inlined as data URIs)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from .params import IDENTIFIER

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


ORDER = ("patient_id", "study_instance_uid", "series_instance_uid", "relative_path")


def gallery_rows(table_df, condition: str | None, limit: int) -> list[dict]:
    """The cards' rows. `condition` is what check_where returned; it goes in as one Spark
    expression, not as SQL text."""
    from pyspark.sql import functions as F

    df = table_df.select(*COLUMNS)
    if condition:
        df = df.where(F.expr(condition))
    return [r.asDict() for r in df.orderBy(*ORDER).limit(int(limit)).collect()]
