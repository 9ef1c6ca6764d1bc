"""DICOMweb service speed: QIDO-RS latency on a 10,000-row catalog, and WADO-RS retrieve throughput
next to reading the same files from disk, measured in one run.

    python benchmarks/dicomweb_bench.py --files 10000 --json benchmarks/results/dicomweb-$(date +%F).json

The table is built from a corpus of real files (make_corpus.py) by the job's own header code
(extract_meta's per-file function, no Spark) and written with delta-rs. The service runs as
`RUNME.py serve` in its own process; requests come one at a time from this process (Python's
requests), and the retrieves twice more: from a plain socket reading into one reused buffer (the
service's own rate; the figure the target is checked on), and from curl. Disk reads and retrieves both read warm files
(the page cache is filled first), so the ratio compares the service with reading the same bytes.

`--server` picks what is measured: `builtin` (`RUNME.py serve`, the figures at the top level, as in
earlier results files), `starlette` (the candidate of starlette_service.py, under "starlette"), or
`both` (the default): the same measurements against each in turn, one server running at a time, with
each figure's ratio starlette/builtin under "starlette_vs_builtin" and in a table at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


def build_table(corpus: Path, warehouse: Path) -> int:
    import pyarrow as pa
    from deltalake import write_deltalake

    from dicom_lakehouse.steps.extract_meta import meta_batches
    from dicom_lakehouse.steps.listing import list_files

    conf = {"zip": {"max_members": 100000, "max_total_bytes": 2**36, "max_ratio": 1000}, "listing": {}}
    files = list_files(None, str(corpus), conf, "bench")
    batches = list(meta_batches(1024, 256 * 2**20)(files.to_batches(max_chunksize=500)))
    table = pa.Table.from_batches(batches)
    n = table.num_rows
    table = table.append_column("thumbnail", pa.nulls(n, pa.binary()))
    write_deltalake(str(warehouse / "bench" / "web" / "catalog"), table, mode="overwrite")
    return n


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs) + 0.5) - 1))]


def queries(base: str) -> dict[str, list[str]]:
    """Query kinds, each with concrete URLs built from the catalog's own values."""
    studies = requests.get(f"{base}/studies", params={"limit": "200"}, timeout=60).json()
    some = studies[:: max(1, len(studies) // 20)][:20]
    uid = lambda s, t: s[t]["Value"][0] if s.get(t, {}).get("Value") else ""  # noqa: E731
    pid = [uid(s, "00100020") for s in some if uid(s, "00100020")]
    names = [s["00100010"]["Value"][0]["Alphabetic"] for s in some if s.get("00100010", {}).get("Value")]
    out = {
        "all studies, limit 100": [f"{base}/studies?limit=100"],
        "studies by PatientID": [f"{base}/studies?PatientID={p}" for p in pid],
        "studies by PatientName wildcard": [f"{base}/studies?PatientName={n[:4]}*" for n in names],
        "studies by StudyDate range": [f"{base}/studies?StudyDate=20000101-20101231&limit=100"],
        "series of a study": [f"{base}/studies/{uid(s, '0020000D')}/series" for s in some],
        "instances of a study": [f"{base}/studies/{uid(s, '0020000D')}/instances" for s in some],
        "all series with Modality=CT, limit 100": [f"{base}/series?Modality=CT&limit=100"],
        "instances, includefield=all, limit 10": [f"{base}/instances?includefield=all&limit=10"],
    }
    return {k: v for k, v in out.items() if v}


def qido(base: str, rounds: int) -> dict:
    kinds = queries(base)
    lat = {k: [] for k in kinds}
    for _ in range(rounds):
        for k, urls in kinds.items():
            for u in urls:
                t = time.perf_counter()
                r = requests.get(u, headers={"Accept": "application/dicom+json"}, timeout=60)
                lat[k].append((time.perf_counter() - t) * 1000)
                assert r.status_code in (200, 204), (u, r.status_code, r.text[:200])
    every = [x for v in lat.values() for x in v]
    return {"requests": len(every), "p50_ms": round(statistics.median(every), 2),
            "p95_ms": round(percentile(every, 95), 2), "max_ms": round(max(every), 2),
            "by_kind": {k: {"n": len(v), "p50_ms": round(statistics.median(v), 2),
                            "p95_ms": round(percentile(v, 95), 2)} for k, v in lat.items()}}


_BUF = bytearray(4 << 20)


def fetch_raw(base: str, path: str) -> int:
    """One retrieve over a plain socket into a reused buffer: the body's bytes are counted and
    checked against Content-Length, not copied, so the figure is the service's rate, not a client
    library's (requests copies every chunk into new bytes objects)."""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(base)
    mv = memoryview(_BUF)
    with socket.create_connection((u.hostname, u.port)) as sock:
        sock.sendall((f"GET {u.path}{path} HTTP/1.1\r\nHost: {u.netloc}\r\n"
                      'Accept: multipart/related; type="application/dicom"\r\nConnection: close\r\n\r\n').encode())
        head = b""
        while b"\r\n\r\n" not in head:
            n = sock.recv_into(mv)
            if not n:
                raise RuntimeError("connection closed in the response head")
            head += bytes(mv[:n])
        head, _, first = head.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        assert b" 200 " in status, status
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        body = len(first)
        while n := sock.recv_into(mv):
            body += n
    if length:
        assert body == int(length.group(1)), (body, length.group(1))
    return body


def retrieve(base: str, warehouse: Path, studies: int, repeat: int = 5) -> dict:
    from deltalake import DeltaTable

    t = DeltaTable(str(warehouse / "bench" / "web" / "catalog")).to_pyarrow_dataset().to_table(
        columns=["path", "study_instance_uid", "status", "length"], use_threads=False).to_pylist()
    by_study: dict[str, list] = {}
    for r in t:
        if r["study_instance_uid"] and r["status"].startswith("ok"):
            by_study.setdefault(r["study_instance_uid"], []).append(r)
    chosen = sorted(by_study, key=lambda s: -sum(r["length"] for r in by_study[s]))[:studies]
    paths = sorted({r["path"].removeprefix("file:") for s in chosen for r in by_study[s]})
    nbytes = sum(os.path.getsize(p) for p in paths)

    def read_disk():
        for p in paths:
            with open(p, "rb") as f:
                while f.read(1 << 20):
                    pass

    read_disk()  # page cache warm for both

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def by_requests():
        got = 0
        for s in chosen:
            with requests.get(f"{base}/studies/{s}", stream=True, timeout=600,
                              headers={"Accept": 'multipart/related; type="application/dicom"'}) as r:
                assert r.status_code == 200, r.status_code
                for piece in r.iter_content(1 << 20):
                    got += len(piece)
        assert got >= nbytes

    def by_socket():
        assert sum(fetch_raw(base, f"/studies/{s}") for s in chosen) >= nbytes

    # Disk reads and the two clients take turns, `repeat` rounds; medians of each.
    rounds = [(timed(read_disk), timed(by_socket), timed(by_requests)) for _ in range(repeat)]
    disk_s, raw_s, wado_s = (statistics.median(r[k] for r in rounds) for k in range(3))
    out = {"studies": len(chosen), "files": len(paths), "mb": round(nbytes / 2**20, 1), "rounds": repeat,
           "disk_mb_s": round(nbytes / 2**20 / disk_s, 1), "wado_mb_s": round(nbytes / 2**20 / wado_s, 1),
           "wado_vs_disk": round(disk_s / wado_s, 2),
           "wado_socket_mb_s": round(nbytes / 2**20 / raw_s, 1), "wado_socket_vs_disk": round(disk_s / raw_s, 2),
           "wado_socket_vs_disk_per_round": [round(d / r, 2) for d, r, _ in rounds]}
    import shutil

    if shutil.which("curl"):  # a client that is not Python: how fast the service itself sends
        t0 = time.perf_counter()
        for s in chosen:
            subprocess.run(["curl", "-sf", "-o", "/dev/null", "-H", 'Accept: multipart/related; type="application/dicom"',
                            f"{base}/studies/{s}"], check=True)
        curl_s = time.perf_counter() - t0
        out.update(wado_curl_mb_s=round(nbytes / 2**20 / curl_s, 1), wado_curl_vs_disk=round(disk_s / curl_s, 2))
    return out


def servers(wh: Path, which: str) -> list[tuple[str, list[str]]]:
    """(name, command) of each server measured, in order; each prints a line with "DICOMweb for" and
    its URL on stderr once it listens."""
    cmds = {"builtin": [sys.executable, str(ROOT / "RUNME.py"), "--warehouse", str(wh), "serve",
                        "--table", "bench.web.catalog", "--port", "0"],
            "starlette": [sys.executable, str(HERE / "starlette_service.py"), "--warehouse", str(wh),
                          "--table", "bench.web.catalog", "--port", "0"]}
    return [(name, cmds[name]) for name in (("builtin", "starlette") if which == "both" else (which,))]


def measure(name: str, cmd: list[str], wh: Path, a) -> dict:
    """One server's figures: start time, QIDO latencies, retrieve rates, exit status."""
    out = {}
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "DICOMweb for" not in line:
            line = p.stderr.readline()
            if not line:
                raise RuntimeError(f"{name}: the server ended before it listened")
        out["serve_start_s"] = round(time.perf_counter() - t0, 2)
        base = re.search(r"at (http://\S+/dicomweb)", line).group(1)
        out["qido"] = qido(base, a.rounds)
        print(f"{name} QIDO: {out['qido']['requests']} requests, p50 {out['qido']['p50_ms']} ms, "
              f"p95 {out['qido']['p95_ms']} ms", file=sys.stderr)
        out["retrieve"] = retrieve(base, wh, a.studies, a.repeat)
        print(f"{name} retrieve: {out['retrieve']}", file=sys.stderr)
    finally:
        p.terminate()
        out["serve_exit"] = p.wait(timeout=30)
    return out


# Figures compared, by how their names end; the others are counts (requests, files, MB) or lists.
LOWER_IS_FASTER = ("_ms", "start_s")
HIGHER_IS_FASTER = ("_mb_s", "_vs_disk")


def figures(d: dict, prefix: str = "") -> dict[str, float]:
    """The measured figures of one server's results, flat: {"qido.p50_ms": 5.5, ...}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(figures(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and k.endswith(LOWER_IS_FASTER + HIGHER_IS_FASTER):
            out[prefix + k] = v
    return out


def ratios(builtin: dict, star: dict) -> dict[str, float | None]:
    """starlette/builtin of each figure both have (None where builtin's is 0). Above 1: Starlette took
    longer (ms, s) or sent faster (MB/s, against disk)."""
    b, s = figures(builtin), figures(star)
    return {k: round(s[k] / b[k], 3) if b[k] else None for k in b if k in s}


def table(builtin: dict, star: dict, ratio: dict) -> str:
    """The comparison as a text table; "faster" names the faster server for each figure (reading the
    disk, a control measured in both turns, is neither's)."""
    b, s = figures(builtin), figures(star)
    rows = [("figure", "builtin", "starlette", "starlette/builtin", "faster")]
    for k, r in ratio.items():
        if k.endswith("disk_mb_s"):
            faster = "(disk)"
        elif r is None or r == 1:
            faster = "-"
        else:
            faster = "builtin" if (r > 1) == k.endswith(LOWER_IS_FASTER) else "starlette"
        rows.append((k, f"{b[k]:g}", f"{s[k]:g}", "-" if r is None else f"{r:.3f}", faster))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                     for r in rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--corpus", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=5, help="times each query is asked")
    ap.add_argument("--studies", type=int, default=20, help="largest studies retrieved")
    ap.add_argument("--repeat", type=int, default=5, help="rounds of disk reads and retrieves (medians reported)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--server", choices=["builtin", "starlette", "both"], default="both",
                    help="RUNME.py serve, the Starlette candidate (starlette_service.py), or both in turn")
    a = ap.parse_args(argv)
    corpus = a.corpus or HERE / "corpus" / str(a.files)
    if not corpus.exists() or not any(corpus.iterdir()):
        from make_corpus import build

        print(f"building corpus of {a.files} files in {corpus}", file=sys.stderr)
        build(a.files, corpus)
    res = {"date": dt.date.today().isoformat(), "cores": os.cpu_count(), "corpus": str(corpus)}
    with tempfile.TemporaryDirectory() as tmp:
        wh = Path(tmp)
        t0 = time.perf_counter()
        res["rows"] = build_table(corpus, wh)
        res["table_build_s"] = round(time.perf_counter() - t0, 1)
        print(f"table of {res['rows']} rows in {res['table_build_s']} s", file=sys.stderr)
        got = {name: measure(name, cmd, wh, a) for name, cmd in servers(wh, a.server)}
    res.update(got.get("builtin", {}))  # at the top level, as in earlier results files
    if "starlette" in got:
        res["starlette"] = got["starlette"]
    if a.server == "both":
        res["starlette_vs_builtin"] = ratios(got["builtin"], got["starlette"])
    out = a.json or HERE / "results" / f"dicomweb-{res['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    if a.server == "both":
        print("\n" + table(got["builtin"], got["starlette"], res["starlette_vs_builtin"]))
    print(f"\nfigures in {out}")


if __name__ == "__main__":
    main()
