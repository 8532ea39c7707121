"""face workload: OpenCV Haar-cascade face detection behind HTTP (docs/workloads.md).
POST /faces  image bytes (PNG, JPEG) -> {"faces": n, "boxes": [[x, y, w, h], ...]}
The cascade is loaded once, when the server starts (the warm state the overlay carries)."""
import sys

import cv2
import numpy as np

sys.path.insert(0, "/usr/lib/cloudlet")
from cloudlet_app import serve  # noqa: E402

CASCADE = cv2.CascadeClassifier("/usr/share/opencv4/haarcascades/haarcascade_frontalface_default.xml")


def faces(image: bytes) -> dict:
    img = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ValueError("not an image OpenCV can decode")
    boxes = CASCADE.detectMultiScale(img, scaleFactor=1.1, minNeighbors=5, minSize=(60, 60))
    return {"faces": len(boxes), "boxes": [[int(v) for v in b] for b in boxes]}


serve("/faces", faces, "/srv/app/sample.jpg")
