#!/usr/bin/env bash
# Imports the dashboards into an existing Grafana through its HTTP API
# (the seed's curl loop, done right: wrapped as {"dashboard": ..., "overwrite":
# true}, authenticated with a token, failing loudly).
#
#   GRAFANA_URL=http://localhost:3000 GRAFANA_TOKEN=glsa_... grafana/import.sh
#   (or GRAFANA_USER / GRAFANA_PASSWORD for basic auth)
#
# The datasource must exist with uid "fraiseql-obs" (see provisioning/), or
# pass DATASOURCE_UID=<uid of your PostgreSQL datasource>.
set -euo pipefail
cd "$(dirname "$0")"
url=${GRAFANA_URL:-http://localhost:3000}
auth=()
if [ -n "${GRAFANA_TOKEN:-}" ]; then
    auth=(-H "Authorization: Bearer $GRAFANA_TOKEN")
elif [ -n "${GRAFANA_USER:-}" ]; then
    auth=(-u "$GRAFANA_USER:${GRAFANA_PASSWORD:-}")
else
    echo "import.sh: set GRAFANA_TOKEN (or GRAFANA_USER and GRAFANA_PASSWORD)" >&2
    exit 2
fi
folder_uid=${FOLDER_UID:-}
for f in error_monitoring.json error_detail.json trace_performance.json system_metrics.json; do
    body=$(python3 - "$f" "${DATASOURCE_UID:-fraiseql-obs}" "$folder_uid" <<'PY'
import json, sys
path, ds, folder = sys.argv[1], sys.argv[2], sys.argv[3]
text = open(path).read().replace('"uid": "fraiseql-obs"', json.dumps({"uid": ds})[1:-1])
d = json.loads(text)
d.pop("id", None)
payload = {"dashboard": d, "overwrite": True, "message": "fraiseql_obs import"}
if folder:
    payload["folderUid"] = folder
print(json.dumps(payload))
PY
)
    code=$(curl -sS -o /tmp/fraiseql_obs_import.out -w '%{http_code}' -X POST "$url/api/dashboards/db" \
        -H "Content-Type: application/json" "${auth[@]}" --data-binary "$body")
    if [ "$code" != 200 ]; then
        echo "import.sh: $f: HTTP $code: $(cat /tmp/fraiseql_obs_import.out)" >&2
        exit 1
    fi
    echo "imported $f"
done
