"""web+db workload: a small Flask shop backed by SQLite (docs/workloads.md).

GET  /health                  -> ok boot=<boot id the application started under>
GET  /search?q=WORD           -> {"query", "count", "items": first 5 matching products}
POST /orders  {"sku", "qty"}  -> {"order": id, "total": orders so far}
"""
import json
import sqlite3

from flask import Flask, g, jsonify, request

DB = "/srv/app/shop.db"
app = Flask(__name__)
with open("/proc/sys/kernel/random/boot_id") as _f:
    BOOT_ID = _f.read().strip()  # read at start: a synthesized VM keeps the launch VM's


def db():
    if "db" not in g:
        g.db = sqlite3.connect(DB)
        g.db.row_factory = sqlite3.Row
    return g.db


@app.teardown_appcontext
def close(_exc):
    conn = g.pop("db", None)
    if conn is not None:
        conn.close()


@app.get("/health")
def health():
    return f"ok boot={BOOT_ID}\n"


@app.get("/search")
def search():
    q = request.args.get("q", "")
    rows = db().execute(
        "SELECT sku, name, price FROM products WHERE name LIKE ? ORDER BY sku", (f"%{q}%",)
    ).fetchall()
    return jsonify(query=q, count=len(rows), items=[dict(r) for r in rows[:5]])


@app.post("/orders")
def order():
    body = request.get_json(force=True)
    conn = db()
    cur = conn.execute("INSERT INTO orders (sku, qty) VALUES (?, ?)", (str(body["sku"]), int(body["qty"])))
    conn.commit()
    total = conn.execute("SELECT COUNT(*) FROM orders").fetchone()[0]
    return jsonify(order=cur.lastrowid, total=total)


if __name__ == "__main__":
    app.run(host="0.0.0.0", port=8000, threaded=True)
