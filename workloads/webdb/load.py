"""Creates the shop's SQLite database with 20,000 products (deterministic)."""
import random
import sqlite3

ADJ = ["red", "blue", "green", "steel", "oak", "smart", "mini", "pro", "eco", "solar"]
NOUN = ["widget", "gadget", "lamp", "chair", "sensor", "router", "drone", "kettle", "camera", "phone"]

rnd = random.Random(2013)
conn = sqlite3.connect("/srv/app/shop.db")
conn.executescript(
    "DROP TABLE IF EXISTS products; DROP TABLE IF EXISTS orders;"
    "CREATE TABLE products (sku TEXT PRIMARY KEY, name TEXT NOT NULL, price REAL NOT NULL);"
    "CREATE TABLE orders (id INTEGER PRIMARY KEY, sku TEXT NOT NULL, qty INTEGER NOT NULL);"
)
conn.executemany(
    "INSERT INTO products VALUES (?, ?, ?)",
    ((f"SKU{i:06d}", f"{rnd.choice(ADJ)} {rnd.choice(NOUN)} {i}", round(rnd.uniform(1, 500), 2)) for i in range(20000)),
)
conn.commit()
conn.close()
