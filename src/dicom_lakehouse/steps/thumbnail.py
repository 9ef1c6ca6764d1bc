"""The thumbnail step: a windowed PNG thumbnail of each image's middle frame."""

from __future__ import annotations

import logging

from dicom_lakehouse.params import JobParams
from dicom_lakehouse.steps.stage import (
    OK,
    THUMB_COLUMNS,
    driver_max_files,
    map_step,
    quiet_worker,
    with_columns,
)
from dicom_lakehouse.tables import schema as S
from dicom_lakehouse.tables.store import TableStore

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ thumbnail
DECLARED = ("rows", "columns", "samples_per_pixel", "bits_allocated", "number_of_frames")
THUMB_READS = ("path", "status", "has_pixels", *DECLARED)  # all that the thumbnail step reads of a row


def thumbnail_batches(size: int, max_frame_bytes: int, compress_level: int, max_inflated: int, reduced: bool = True):
    """mapInArrow function: header rows -> header rows plus thumbnail columns."""

    def fn(batches):
        from dicom_lakehouse.dicom.thumbnails import Thumbnail, render
        from dicom_lakehouse.files.sources import open_source

        quiet_worker()
        names = S.column_names("thumbnail")
        out_schema = S.arrow_schema("thumbnail")
        for b in batches:
            cols = {c: b.column(c).to_pylist() for c in THUMB_READS}
            results = []
            for i, path in enumerate(cols["path"]):
                if cols["status"][i] not in OK:
                    results.append(Thumbnail("skipped", error=f"status is {cols['status'][i]}"))
                elif not cols["has_pixels"][i]:
                    results.append(Thumbnail("no_pixels"))
                else:
                    declared = {c: cols[c][i] for c in DECLARED}
                    try:
                        with open_source(path) as fp:
                            results.append(render(fp, size, max_frame_bytes, declared, compress_level, max_inflated,
                                                  reduced))
                    except Exception as e:  # noqa: BLE001
                        results.append(Thumbnail("error", error=f"cannot open: {type(e).__name__}"))
            new = {
                "thumbnail": [r.png for r in results],
                "thumbnail_width": [r.width for r in results],
                "thumbnail_height": [r.height for r in results],
                "thumbnail_status": [r.status for r in results],
                "thumbnail_error": [r.error for r in results],
            }
            yield with_columns(b, new, names, out_schema)

    return fn


def run_thumbnail(spark, store: TableStore, p: JobParams, conf: dict) -> dict:
    tconf = conf.get("thumbnail") or {}
    fn = thumbnail_batches(p.thumbnail_size, int(tconf.get("max_frame_bytes", 512 * 2**20)),
                           int(tconf.get("png_compress_level", 1)),
                           int((conf.get("dicom") or {}).get("max_deflated_bytes", 256 * 2**20)),
                           bool(tconf.get("reduced_decode", True)))
    return map_step(spark, store, p, "extract_meta", "thumbnail", fn, "thumbnail_status",
                     driver_max=driver_max_files(conf), reads_adds=(THUMB_READS, THUMB_COLUMNS))
