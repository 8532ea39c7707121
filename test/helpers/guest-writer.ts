/**
 * A writer in the test guest that dirties memory and disk all the time (512 KiB of a tmpfs file
 * and 32 KiB of the data disk every ~0.1 s, then sync), for handoff tests and the handoff bench.
 * It counts its iterations in /run/seq (memory) and /data/app/seq (disk). Started through the
 * test guest's /cgi-bin/exec (docs/test-guest.md).
 */
export const GUEST_WRITER_SCRIPT = `cat > /run/churn.sh <<'X'
i=0
while :; do
  i=$((i+1))
  dd if=/dev/urandom of=/run/churn.mem bs=4096 count=128 conv=notrunc 2>/dev/null
  dd if=/dev/urandom of=/data/app/churn.bin bs=4096 count=8 conv=notrunc 2>/dev/null
  echo $i > /data/app/seq.tmp && mv /data/app/seq.tmp /data/app/seq && sync
  echo $i > /run/seq
  sleep 0.1
done
X
setsid sh /run/churn.sh </dev/null >/dev/null 2>&1 &
echo started`;

/** Runs a shell script in the test guest behind `port`; its output (throws on a non-zero exit). */
export async function testGuestExec(port: number, script: string): Promise<string> {
  const res = await fetch(`http://127.0.0.1:${port}/cgi-bin/exec?timeout=30`, { method: 'POST', body: script, signal: AbortSignal.timeout(60_000) });
  const body = (await res.json()) as { exitCode: number; output: string };
  if (body.exitCode !== 0) throw new Error(`guest script failed (${body.exitCode}): ${body.output}`);
  return body.output.trim();
}
