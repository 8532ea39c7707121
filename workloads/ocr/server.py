"""ocr workload: Tesseract behind HTTP (docs/workloads.md).
POST /ocr  image bytes (PNG, JPEG) -> {"text": recognized text}"""
import subprocess
import sys

sys.path.insert(0, "/usr/lib/cloudlet")
from cloudlet_app import serve  # noqa: E402


def ocr(image: bytes) -> dict:
    out = subprocess.run(["tesseract", "stdin", "stdout", "--psm", "6"], input=image, capture_output=True, timeout=120)
    if out.returncode != 0:
        raise ValueError(out.stderr.decode("utf-8", "replace"))
    return {"text": out.stdout.decode("utf-8", "replace").strip()}


serve("/ocr", ocr, "/srv/app/sample.png")
