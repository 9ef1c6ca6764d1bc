"""`python RUNME.py`: resolve the bundle for a target, create or update the job, run it, query it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from dicom_lakehouse.config import (
    ENV_DRIVER_MAX_FILES,
    ENV_DRIVER_PROCESSES,
    ENV_TABLE_ENGINE,
    ConfigError,
    load_conf,
    repo_root,
    table_engine,
    warehouse_dir,
)
from dicom_lakehouse.jobs.bundle import BundleError, resolve
from dicom_lakehouse.params import ParameterError

DEFAULT_SAMPLE = "sample_data"
SUMMARY_SQL = ("SELECT modality, status, thumbnail_status, count(*) AS files "
               "FROM {table} GROUP BY modality, status, thumbnail_status ORDER BY modality NULLS LAST, status")


def _pairs(items: tuple[str, ...], what: str) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint=what)
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


def _is_local_target(resolved) -> bool:
    conf = load_conf(resolved.variables.get("target_conf", resolved.target))
    return (conf.get("runner") or {}).get("kind", "local") == "local"


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--target", "-t", default=None, help="Bundle target: local (default), cluster, dev, prod.")
@click.option("--run", "do_run", is_flag=True, help="Run the job after creating or updating it.")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="Override a job parameter.")
@click.option("--var", "variables", multiple=True, metavar="NAME=VALUE", help="Override a bundle variable.")
@click.option("--warehouse", default=None, help="Local warehouse folder (overrides conf/).")
@click.option("--master", default=None, help="Spark master for the local runner, e.g. spark://127.0.0.1:7077.")
@click.option("--remote", default=None, help="Run the tasks through Spark Connect, e.g. sc://127.0.0.1:15002.")
@click.option("--session", type=click.Choice(["shared", "per_task"]), default=None,
              help="shared: the tasks are clients of one Spark Connect server started for the run (one JVM; "
                   "the local target's default). per_task: one spark-submit per task, as on a job cluster.")
@click.option("--connect-server", "connect_server", is_flag=True, hidden=True, help="Same as --session shared.")
@click.option("--profile", default=None, help="Databricks config profile (~/.databrickscfg).")
@click.option("--engine", type=click.Choice(["auto", "spark", "delta-rs"]), default=None,
              help="Table engine for local runs and queries (overrides conf table_engine).")
@click.option("--driver-max-files", "driver_max_files", type=click.IntRange(min=0), default=None,
              help="Runs of at most this many files do their per-file work in the task processes, not on "
                   "Spark's executors (overrides conf driver_max_files; 0: always on the executors).")
@click.option("--driver-processes", "driver_processes", type=click.IntRange(min=0), default=None,
              help="Worker processes for that per-file work (overrides conf driver_processes; 0: one per core).")
@click.pass_context
def main(ctx, target, do_run, params, variables, warehouse, master, remote, session, connect_server, profile, engine,
         driver_max_files, driver_processes):
    """Create or update the dicom-lakehouse job for TARGET, and run it with --run."""
    ctx.ensure_object(dict)
    if engine:
        os.environ[ENV_TABLE_ENGINE] = engine  # the runner's task processes inherit it
    if driver_max_files is not None:
        os.environ[ENV_DRIVER_MAX_FILES] = str(driver_max_files)
    if driver_processes is not None:
        os.environ[ENV_DRIVER_PROCESSES] = str(driver_processes)
    ctx.obj.update(target=target, warehouse=warehouse, remote=remote)
    if ctx.invoked_subcommand is not None:
        return
    try:
        var_values = _pairs(variables, "--var")
        resolved = resolve(target or "local", variables=var_values)  # the bundle's own default is dev
        if _is_local_target(resolved):
            code = _local(resolved, do_run, _pairs(params, "--param"), warehouse, master, remote,
                          "shared" if connect_server else session)
        else:
            from dicom_lakehouse.jobs.deploy import deploy_and_run

            code = deploy_and_run(resolved.target, var_values, do_run, _pairs(params, "--param"), profile,
                                  echo=click.echo, poll_seconds=float(os.environ.get("DICOM_LAKEHOUSE_POLL_SECONDS", 10)))
    except (BundleError, ConfigError, ParameterError) as e:
        click.echo(f"error: {e}", err=True)
        code = 2
    sys.exit(code)


def _local(resolved, do_run: bool, params: dict, warehouse: str | None, master: str | None,
           remote: str | None = None, session: str | None = None) -> int:
    from dicom_lakehouse.jobs.runner import run_job

    conf = load_conf(resolved.variables.get("target_conf", resolved.target))
    build = repo_root() / conf.get("build_dir", "build") / resolved.target
    build.mkdir(parents=True, exist_ok=True)
    code = 0
    for key, settings in resolved.jobs.items():
        out = build / f"{key}.job.json"
        out.write_text(json.dumps(settings, indent=2))
        click.echo(f"job {settings['name']!r}: settings written to {out}")
        if do_run:
            py_files = None
            if (master or conf["spark"].get("master", "")).startswith("spark://"):
                from dicom_lakehouse.spark.shipping import build_py_files

                py_files = str(build_py_files(build))
            rec = run_job(settings, conf, target=resolved.target, job_key=key, root=resolved.bundle.root,
                          build_dir=build, overrides=params, warehouse=warehouse, master=master,
                          echo=click.echo, py_files=py_files, remote=remote, session=session)
            if rec.status == "CANCELED":
                click.echo(f"run {rec.run_id}: {rec.message}", err=True)
                code = 1
            elif rec.status != "SUCCESS":
                click.echo(f"task {rec.failed_task} failed; last lines of its log:\n{rec.message}", err=True)
                code = 1
    return code


@main.command()
@click.option("--dest", default=DEFAULT_SAMPLE, show_default=True, help="Folder to copy the sample files into.")
def sample(dest):
    """Copy real sample DICOM files that pydicom ships (no network) into DEST (new, empty, or made by sample)."""
    from dicom_lakehouse.dicom.sample_data import SampleError, make_sample

    dest_path = Path(dest) if Path(dest).is_absolute() else repo_root() / dest
    try:
        files = make_sample(dest_path)
    except SampleError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    click.echo(f"{len(files)} sample files in {dest_path}")


def _query_session(conf: dict, remote: str | None, name: str):
    from dicom_lakehouse.spark.session import get_spark, is_connect

    spark = get_spark(conf, remote, app_name=f"dicom-lakehouse:{name}")
    if not is_connect(spark):
        spark.sparkContext.setLogLevel("ERROR")
    return spark


@main.command()
@click.argument("query")
@click.option("--limit", default=50, show_default=True, help="Rows to show.")
@click.option("--json", "as_json", is_flag=True, help="Print rows as JSON lines.")
@click.pass_context
def sql(ctx, query, limit, as_json):
    """Run QUERY (Spark SQL with three-part names) on the local warehouse."""
    from dicom_lakehouse.tables.localsql import QueryRefused, check_query, run_sql

    try:  # refuse a statement that is not a query before a session starts
        check_query(query)
    except QueryRefused as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    conf = load_conf(ctx.obj.get("target") or "local")
    spark = _query_session(conf, ctx.obj.get("remote"), "sql")
    df = run_sql(spark, warehouse_dir(conf, ctx.obj.get("warehouse")), query)
    if as_json:
        for row in df.limit(limit).collect():
            click.echo(json.dumps(row.asDict(recursive=True), default=str))
    else:
        df.show(limit, truncate=60)
    spark.stop()


@main.command()
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="Override a job parameter.")
@click.pass_context
def demo(ctx, params):
    """Copy the sample data, run the job on it (overwrite), and print a summary query."""
    from dicom_lakehouse.dicom.sample_data import SampleError, make_sample

    overrides = {"mode": "overwrite", **_pairs(params, "--param")}
    try:
        files = make_sample(repo_root() / DEFAULT_SAMPLE)
        click.echo(f"{len(files)} sample files in {repo_root() / DEFAULT_SAMPLE}")
        resolved = resolve("local")
        code = _local(resolved, True, overrides, ctx.obj.get("warehouse"), None)
    except (BundleError, ConfigError, ParameterError, SampleError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if code:
        sys.exit(code)
    v = resolved.variables
    table = f"{overrides.get('catalog', v['catalog'])}.{overrides.get('schema', v['schema'])}.{overrides.get('table', v['table'])}"
    click.echo(f"\n{SUMMARY_SQL.format(table=table)}")
    conf = load_conf("local")
    if table_engine(conf) == "delta-rs":  # the local default: the summary without a JVM either
        from dicom_lakehouse.tables.localsql import run_sql_delta_rs, show_text

        click.echo(show_text(run_sql_delta_rs(warehouse_dir(conf, ctx.obj.get("warehouse")),
                                              SUMMARY_SQL.format(table=table))))
        return
    ctx.invoke(sql, query=SUMMARY_SQL.format(table=table), limit=50, as_json=False)


@main.command()
def validate():
    """Check bundle.yml and its includes against the Databricks bundle schema."""
    from dicom_lakehouse.jobs.bundle import merged_document, schema_errors

    # `databricks bundle schema` of the CLI version the tests pin (tests/databricks_cli.py).
    schema = repo_root() / "schemas" / "databricks-bundle.schema.json"
    if not schema.exists():
        click.echo(f"schema not found at {schema}", err=True)
        sys.exit(2)
    errors = schema_errors(merged_document(), schema)
    for e in errors:
        click.echo(e, err=True)
    click.echo("bundle is valid" if not errors else f"{len(errors)} schema errors")
    sys.exit(1 if errors else 0)


@main.command()
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="Override a job parameter.")
@click.option("--cron", default=None, help="Quartz cron expression instead of the job spec's schedule.")
@click.option("--max-runs", type=int, default=None, help="Stop after this many runs.")
@click.pass_context
def schedule(ctx, params, cron, max_runs):
    """Run the job locally at the times of its Quartz schedule (one run at a time) until Ctrl-C."""
    import threading

    from dicom_lakehouse.jobs.runner import guarded_echo, run_job
    from dicom_lakehouse.jobs.scheduler import ScheduleError, run_schedule

    try:
        resolved = resolve(ctx.obj.get("target") or "local")
        if not _is_local_target(resolved):
            raise click.UsageError("schedule runs local targets; Databricks runs the schedule of deployed jobs")
        conf = load_conf(resolved.variables.get("target_conf", resolved.target))
        key, settings = next(iter(resolved.jobs.items()))
        sched = dict(settings.get("schedule") or {})
        if cron:
            sched["quartz_cron_expression"] = cron
        if not sched.get("quartz_cron_expression"):
            raise click.UsageError("the job spec has no schedule; pass --cron")
        build = repo_root() / conf.get("build_dir", "build") / resolved.target
        overrides = _pairs(params, "--param")
        # A closed output pipe (`schedule | head`) stops the run and the schedule, as Ctrl-C does.
        stop = threading.Event()
        echo = guarded_echo(click.echo, stop)

        def once(stop):
            rec = run_job(settings, conf, target=resolved.target, job_key=key, root=resolved.bundle.root,
                          build_dir=build, overrides=overrides, warehouse=ctx.obj.get("warehouse"), echo=echo,
                          stop=stop)
            return f"{rec.status} ({rec.run_id})"

        run_schedule(sched, once, echo=echo, max_runs=max_runs, stop=stop)
    except (BundleError, ConfigError, ParameterError, ScheduleError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


@main.command()
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="Override a job parameter.")
@click.option("--mode", type=click.Choice(["sync", "append"]), default=None,
              help="sync (default) also deletes the rows of files gone from path; append keeps them.")
@click.option("--debounce", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds without a file event before a run starts (a burst of files makes one run).")
@click.option("--poll", "poll", is_flag=True, default=None,
              help="Poll the folder instead of waiting for file events (automatic on FUSE and network mounts).")
@click.option("--max-runs", type=click.IntRange(min=1), default=None, help="Stop after this many runs.")
@click.option("--catch-up/--no-catch-up", default=True, show_default=True,
              help="Run once at start, for files that came while nothing watched.")
@click.pass_context
def watch(ctx, params, mode, debounce, poll, max_runs, catch_up):
    """Run the job locally whenever files arrive, change or go under its `path`, until Ctrl-C."""
    import threading

    from dicom_lakehouse.files.paths import is_remote_path, local_path_of
    from dicom_lakehouse.jobs.runner import guarded_echo, run_job
    from dicom_lakehouse.jobs.watcher import WatchError
    from dicom_lakehouse.jobs.watcher import watch as watch_folder

    try:
        resolved = resolve(ctx.obj.get("target") or "local")
        if not _is_local_target(resolved):
            raise click.UsageError("watch runs local targets; on Databricks use a file-arrival trigger "
                                   "(see docs/incremental.md)")
        conf = load_conf(resolved.variables.get("target_conf", resolved.target))
        key, settings = next(iter(resolved.jobs.items()))
        overrides = _pairs(params, "--param")
        if mode and overrides.get("mode", mode) != mode:
            raise click.UsageError(f"--mode {mode} and --param mode={overrides['mode']} disagree: give one")
        overrides["mode"] = mode or overrides.get("mode") or "sync"
        path = overrides.get("path") or next((p.get("default") for p in settings.get("parameters") or []
                                              if p.get("name") == "path"), None)
        if not path or is_remote_path(path):
            raise WatchError(f"watch needs a local folder as path; {'object storage' if path else 'no path'} "
                             "has no file events: use the job's file-arrival trigger on Databricks "
                             "(see docs/incremental.md)")
        folder = os.path.abspath(local_path_of(path))
        build = repo_root() / conf.get("build_dir", "build") / resolved.target
        stop = threading.Event()
        echo = guarded_echo(click.echo, stop)

        def once(stop):
            rec = run_job(settings, conf, target=resolved.target, job_key=key, root=resolved.bundle.root,
                          build_dir=build, overrides={**overrides, "path": folder},
                          warehouse=ctx.obj.get("warehouse"), echo=echo, stop=stop)
            return f"{rec.status} ({rec.run_id})"

        watch_folder(folder, once, echo=echo, debounce=debounce, max_runs=max_runs, stop=stop, polling=poll,
                     catch_up=catch_up)
    except (BundleError, ConfigError, ParameterError, WatchError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


@main.command()
@click.option("--table", "table_name", default="main.pixels.object_catalog", show_default=True,
              help="Published table (three-part name).")
@click.option("--where", default=None, help="SQL condition, e.g. \"modality = 'CT'\".")
@click.option("--limit", type=click.IntRange(min=1), default=500, show_default=True, help="Most cards to show.")
@click.option("--out", default="build/gallery.html", show_default=True, help="HTML file to write.")
@click.pass_context
def gallery(ctx, table_name, where, limit, out):
    """Write a self-contained HTML thumbnail gallery of the published table."""
    from dicom_lakehouse.tables import schema as S
    from dicom_lakehouse.tables.localsql import run_sql, warehouse_tables
    from dicom_lakehouse.web.gallery import (
        GalleryError,
        check_table,
        check_where,
        gallery_rows,
        write_gallery,
    )

    conf = load_conf(ctx.obj.get("target") or "local")
    try:  # refuse bad input before a session starts
        check_table(table_name)
        condition = check_where(where, S.column_names("publish")) if where else None
        engine = table_engine(conf)
        tables = warehouse_tables(warehouse_dir(conf, ctx.obj.get("warehouse")))
        if table_name not in tables:
            raise GalleryError(f"no Delta table {table_name} in the warehouse: publish it first (python RUNME.py --run)")
    except (GalleryError, ConfigError, ValueError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    rows = None
    if engine == "delta-rs" and not ctx.obj.get("remote"):  # no JVM to filter rows
        from dicom_lakehouse.web.gallery import (
            NotOnDataFusion,
            column_kinds,
            datafusion_condition,
            gallery_rows_delta_rs,
        )

        try:
            df_condition = datafusion_condition(condition, column_kinds(S.spark_schema("publish"))) if where else None
            rows = gallery_rows_delta_rs(tables[table_name], df_condition, limit)
        except NotOnDataFusion as e:
            click.echo(f"note: --where is filtered with Spark SQL: {e}, which DataFusion may read differently",
                       err=True)
        except Exception as e:  # noqa: BLE001 - e.g. a table feature delta-rs cannot read: Spark can
            click.echo(f"note: delta-rs could not answer ({type(e).__name__}): the gallery uses Spark", err=True)
    if rows is None:
        spark = _query_session(conf, ctx.obj.get("remote"), "gallery")
        table_df = run_sql(spark, warehouse_dir(conf, ctx.obj.get("warehouse")), f"SELECT * FROM {table_name}")
        rows = gallery_rows(table_df, condition, limit)
        spark.stop()
    path = write_gallery(rows, out if Path(out).is_absolute() else repo_root() / out, f"{table_name} gallery", where)
    click.echo(f"{len(rows)} files in {path}")


@main.command()
@click.option("--table", "table_name", default="main.pixels.object_catalog", show_default=True,
              help="Published table (three-part name).")
@click.option("--warehouse", default=None,
              help="Local warehouse folder the table is in (the same as RUNME.py --warehouse W serve; this one wins).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", default=8042, show_default=True, help="Port; the service is at http://HOST:PORT/dicomweb.")
@click.option("--viewer", is_flag=True, help="Also serve OHIF's viewer at / (fetched once from npm into the cache).")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="URL",
              help="A web viewer's origin (scheme://host[:port]) allowed to read answers from its pages; "
                   "repeatable. None by default: only this service's own pages can.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="Another Host name to answer to (behind a proxy, or a DNS name); repeatable. Other names "
                   "get 421 (DNS rebinding).")
@click.pass_context
def serve(ctx, table_name, warehouse, host, port, viewer, cors_origins, allowed_hosts):
    """Serve the published table over DICOMweb (QIDO-RS, WADO-RS, rendered, thumbnail).

    Set DICOM_LAKEHOUSE_DICOMWEB_TOKEN to require that bearer token on every DICOMweb request; a --host
    beyond loopback is refused without it."""
    import logging
    import warnings

    from dicom_lakehouse.web.dicomweb import TOKEN_ENV, check_exposure, make_server, token_from_env

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # pydicom's warnings quote header values (a bad UID may hold a name): none reach the service's log.
    import pydicom.config  # noqa: F401 - its import sets its logger's level: imported first, then set here

    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    conf = load_conf(ctx.obj.get("target") or "local")
    token = token_from_env()
    try:
        check_exposure(host, token)
        ohif = None
        if viewer:
            from dicom_lakehouse.web.ohif import fetch

            ohif = fetch()
        where = warehouse_dir(conf, warehouse or ctx.obj.get("warehouse"))
        server = make_server(table_name, str(where), host, port, token, ohif, cors_origins, allowed_hosts)
    except (ValueError, OSError, RuntimeError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    h, p = server.server_address[:2]
    page = f"OHIF viewer at http://{h}:{p}/, study list at http://{h}:{p}/studies.html" if viewer else \
        f"study list at http://{h}:{p}/"
    click.echo(f"DICOMweb for {table_name} at http://{h}:{p}/dicomweb ({page}); "
               f"{'bearer token from ' + TOKEN_ENV if token else 'no token'}; Ctrl-C stops", err=True)
    import signal

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # a service manager's stop is a clean exit, as Ctrl-C is
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
