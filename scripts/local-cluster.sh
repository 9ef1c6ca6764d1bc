#!/usr/bin/env bash
# A Spark standalone cluster on loopback from the pip-installed pyspark: one master, two workers.
#   scripts/local-cluster.sh start [MASTER_PORT]   -> prints spark://127.0.0.1:PORT
#   scripts/local-cluster.sh stop
# Settings: CLUSTER_DIR (pids, logs, work dirs), WORKERS (2), WORKER_CORES (1), WORKER_MEMORY (1g), PYTHON,
# SPARK_DAEMON_JAVA_OPTS.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(pwd)/.venv/bin/python}
SPARK_HOME=$("$PYTHON" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')
export SPARK_HOME SPARK_LOCAL_IP=127.0.0.1 PYSPARK_PYTHON="$PYTHON"
CLUSTER_DIR=${CLUSTER_DIR:-$(pwd)/build/cluster}
WORKERS=${WORKERS:-2}
WORKER_CORES=${WORKER_CORES:-1}
WORKER_MEMORY=${WORKER_MEMORY:-1g}
# The master and worker daemons only schedule: a small heap, serial GC and C1 only, so that their own
# start-up and JIT do not take the cores the executors need.
export SPARK_DAEMON_JAVA_OPTS=${SPARK_DAEMON_JAVA_OPTS:-"-XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto"}

start() {
  local port=${1:-7077}
  mkdir -p "$CLUSTER_DIR"
  SPARK_DAEMON_MEMORY=512m nohup "$SPARK_HOME/bin/spark-class" org.apache.spark.deploy.master.Master \
    --host 127.0.0.1 --port "$port" --webui-port 0 >"$CLUSTER_DIR/master.log" 2>&1 &
  echo $! >"$CLUSTER_DIR/master.pid"
  for _ in $(seq 1 120); do
    grep -q "I have been elected leader" "$CLUSTER_DIR/master.log" 2>/dev/null && break
    sleep 0.5
  done
  grep -q "I have been elected leader" "$CLUSTER_DIR/master.log" || { echo "master did not start" >&2; tail -20 "$CLUSTER_DIR/master.log" >&2; exit 1; }
  for i in $(seq 1 "$WORKERS"); do
    mkdir -p "$CLUSTER_DIR/work$i"
    SPARK_DAEMON_MEMORY=256m nohup "$SPARK_HOME/bin/spark-class" org.apache.spark.deploy.worker.Worker \
      --host 127.0.0.1 --webui-port 0 --cores "$WORKER_CORES" --memory "$WORKER_MEMORY" \
      --work-dir "$CLUSTER_DIR/work$i" "spark://127.0.0.1:$port" >"$CLUSTER_DIR/worker$i.log" 2>&1 &
    echo $! >"$CLUSTER_DIR/worker$i.pid"
  done
  for i in $(seq 1 "$WORKERS"); do
    for _ in $(seq 1 120); do
      grep -q "Successfully registered with master" "$CLUSTER_DIR/worker$i.log" 2>/dev/null && break
      sleep 0.5
    done
    grep -q "Successfully registered with master" "$CLUSTER_DIR/worker$i.log" || { echo "worker $i did not register" >&2; tail -20 "$CLUSTER_DIR/worker$i.log" >&2; exit 1; }
  done
  echo "spark://127.0.0.1:$port"
}

stop() {
  for f in "$CLUSTER_DIR"/worker*.pid "$CLUSTER_DIR"/master.pid; do
    [ -f "$f" ] || continue
    kill "$(cat "$f")" 2>/dev/null || true
    rm -f "$f"
  done
}

case "${1:-}" in
  start) start "${2:-7077}" ;;
  stop) stop ;;
  *) echo "usage: $0 start [PORT] | stop" >&2; exit 2 ;;
esac
