"""Operations figures through a real ADBC client: worked-example latency, how long the deadline
takes to stop an endless cross join, and the Prometheus scrape.

Usage, with the gateway serving the demo with a short deadline and the metrics listener on:
  SDE_LIMITS__QUERY_TIMEOUT_SECONDS=2 SDE_TELEMETRY__METRICS_LISTEN=127.0.0.1:19464 \
      target/debug/sde-gateway serve --demo --dir /tmp/world --listen 127.0.0.1:50051 &
  python bench/operations.py /tmp/world 127.0.0.1:50051 127.0.0.1:19464
"""
import pathlib, statistics, sys, time, urllib.request
import adbc_driver_flightsql.dbapi as flightsql
from adbc_driver_flightsql import DatabaseOptions

demo = pathlib.Path(sys.argv[1]); addr = sys.argv[2]
def connect(user="alice"):
    return flightsql.connect("grpc+tls://" + addr, db_kwargs={
        DatabaseOptions.TLS_ROOT_CERTS.value: (demo / "tls/ca.pem").read_text(),
        DatabaseOptions.AUTHORIZATION_HEADER.value: "Bearer " + (demo / f"tokens/{user}.jwt").read_text().strip(),
        DatabaseOptions.RPC_CALL_HEADER_PREFIX.value + "x-sde-project": "ews-asc-linkage",
    })
cur = connect().cursor()
sql = "SELECT age_band, sex, COUNT(*) AS n FROM patients GROUP BY age_band, sex ORDER BY age_band, sex"
times = []
for _ in range(20):
    t = time.perf_counter(); cur.execute(sql); cur.fetch_arrow_table(); times.append(time.perf_counter() - t)
print(f"worked example: median {statistics.median(times)*1000:.1f} ms over 20")
endless = "SELECT COUNT(*) AS n FROM patients p CROSS JOIN asc_services a CROSS JOIN ews_referrals e"
t = time.perf_counter()
try:
    cur.execute(endless)
except Exception as e:
    print(f"endless cross join refused after {time.perf_counter()-t:.2f} s:", str(e).splitlines()[0][:120])
if len(sys.argv) > 3:
    text = urllib.request.urlopen(f"http://{sys.argv[3]}/metrics").read().decode()
    print("prometheus lines:", len(text.splitlines()), [l for l in text.splitlines() if l.startswith("sde_requests_total")][:3])
