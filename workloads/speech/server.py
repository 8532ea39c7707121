"""speech workload: PocketSphinx speech to text behind HTTP (docs/workloads.md).
POST /stt  WAV bytes (16 kHz, 16-bit mono) -> {"text": recognized words}
Recognition is constrained to spoken digits by a JSGF grammar (a voice-dialling front end)."""
import subprocess
import sys
import tempfile

sys.path.insert(0, "/usr/lib/cloudlet")
from cloudlet_app import serve  # noqa: E402


def stt(wav: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".wav", dir="/run") as f:
        f.write(wav)
        f.flush()
        out = subprocess.run(
            ["pocketsphinx_continuous", "-infile", f.name, "-jsgf", "/srv/app/digits.gram", "-logfn", "/dev/null"],
            capture_output=True, timeout=300,
        )
    if out.returncode != 0:
        raise ValueError(out.stderr.decode("utf-8", "replace"))
    return {"text": " ".join(out.stdout.decode("utf-8", "replace").split())}


serve("/stt", stt, "/srv/app/sample.wav")
