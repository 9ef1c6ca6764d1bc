"""A self-contained HTML thumbnail gallery of the published table (images inlined as data URIs)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

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


def gallery_query(table: str, where: str | None, limit: int) -> str:
    cond = f"WHERE {where}" if where else ""
    return (f"SELECT {', '.join(COLUMNS)} FROM {table} {cond} "
            f"ORDER BY patient_id, study_instance_uid, series_instance_uid, relative_path LIMIT {int(limit)}")
