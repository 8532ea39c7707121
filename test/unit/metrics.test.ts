/**
 * What a host activity's result adds to the metrics: its stage timings (keys ending in Ms), the
 * bytes it moved, overlay sizes and a handoff's pause; results without such fields add nothing.
 */
import { recordActivityResult, registry } from '../../src/common/metrics';

async function series(name: string): Promise<string[]> {
  return (await registry.metrics()).split('\n').filter((l) => l.startsWith(name));
}

test('stage timings, bytes, overlay sizes and handoff pauses come from activity results', async () => {
  recordActivityResult('h-1', 'synthesizeInstanceFiles', { timings: { 'fetch and applyMs': 1500, applySegments: 20, note: 'x' }, fetchedBytes: 4096 });
  recordActivityResult('h-1', 'createInstanceOverlay', { overlayId: 'x', bytes: 2_000_000 });
  recordActivityResult('h-1', 'handoffLiveRound', { round: 1, bytes: 1000, ms: { capture: 100, build: 200, send: 300, apply: 50, total: 650 } });
  recordActivityResult('h-1', 'handoffCutOver', { pausedMs: 2500, report: {} });
  recordActivityResult('h-1', 'getInstance', 'not an object');

  expect(await series('cloudlet_stage_duration_seconds_count{host="h-1",activity="synthesizeInstanceFiles",stage="fetch and apply"} 1')).toHaveLength(1);
  expect(await series('cloudlet_stage_duration_seconds_sum{host="h-1",activity="synthesizeInstanceFiles",stage="fetch and apply"} 1.5')).toHaveLength(1);
  expect(await series('cloudlet_stage_duration_seconds_sum{host="h-1",activity="synthesizeInstanceFiles",stage="applySegments"} 0.02')).toHaveLength(1);
  expect(await series('cloudlet_stage_duration_seconds_count{host="h-1",activity="synthesizeInstanceFiles",stage="note"}')).toHaveLength(0);
  expect(await series('cloudlet_stage_duration_seconds_count{host="h-1",activity="handoffLiveRound",stage="build"} 1')).toHaveLength(1);
  expect(await series('cloudlet_stage_duration_seconds_count{host="h-1",activity="handoffLiveRound",stage="total"}')).toHaveLength(0);
  expect(await series('cloudlet_transfer_bytes_total{host="h-1",direction="received",what="overlay"} 4096')).toHaveLength(1);
  expect(await series('cloudlet_transfer_bytes_total{host="h-1",direction="sent",what="handoff round"} 1000')).toHaveLength(1);
  expect(await series('cloudlet_overlay_size_bytes_count{host="h-1"} 1')).toHaveLength(1);
  expect(await series('cloudlet_handoff_pause_seconds_sum{host="h-1"} 2.5')).toHaveLength(1);
});
