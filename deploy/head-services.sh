#!/usr/bin/env bash
# The head node's half of the cluster profile (docs/deploy.md#the-cluster-profile), for ray-cluster.yaml:
# PostgreSQL from Ubuntu's package with the `rayloop` (store) and `mlflow` (registry) databases, reachable
# from the cluster's private network, and an MLflow tracking server proxying artifacts to shared storage.
# Idempotent: `ray up` runs it on every update.
set -euo pipefail
set -a
# shellcheck source=deploy/cluster.env
. "$(dirname "$0")/cluster.env"
set +a
password=${POSTGRES_PASSWORD:-rayloop}
network=${RAYLOOP_PRIVATE_NETWORK:-10.0.0.0/8}

if ! command -v pg_ctlcluster >/dev/null; then
  sudo apt-get -o DPkg::Lock::Timeout=600 install -y postgresql
fi
conf=$(ls -d /etc/postgresql/*/main | head -1)
sudo sed -i "s/^#\?listen_addresses.*/listen_addresses = '*'/" "$conf/postgresql.conf"
grep -q "rayloop-cluster" "$conf/pg_hba.conf" \
  || echo "host all rayloop $network scram-sha-256  # rayloop-cluster" | sudo tee -a "$conf/pg_hba.conf" >/dev/null
sudo systemctl restart postgresql
sudo -u postgres psql -qtc "SELECT 1 FROM pg_roles WHERE rolname='rayloop'" | grep -q 1 \
  || sudo -u postgres psql -qc "CREATE ROLE rayloop LOGIN PASSWORD '$password'"
for db in rayloop mlflow; do
  sudo -u postgres psql -qtc "SELECT 1 FROM pg_database WHERE datname='$db'" | grep -q 1 \
    || sudo -u postgres createdb -O rayloop "$db"
done

# The tracking server: restarted so a changed profile takes effect.
pkill -f "mlflow server" || true
mkdir -p "$RAYLOOP_DATA_DIR/logs"
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false nohup ~/venv/bin/mlflow server --host 0.0.0.0 --port 5000 --workers 2 \
  --backend-store-uri "postgresql+psycopg://rayloop:$password@127.0.0.1:5432/mlflow" \
  --serve-artifacts --artifacts-destination "${RAYLOOP_STORAGE_URI%%\?*}/mlartifacts" \
  >"$RAYLOOP_DATA_DIR/logs/mlflow.log" 2>&1 &
for _ in $(seq 60); do
  curl -sf http://127.0.0.1:5000/health >/dev/null && exit 0
  sleep 2
done
echo "MLflow server did not answer on :5000; see $RAYLOOP_DATA_DIR/logs/mlflow.log" >&2
exit 1
