/**
 * The OTLP exporter (docs/observability.md): with OTEL_EXPORTER_OTLP_ENDPOINT set, spans reach an
 * OTLP/HTTP receiver as `POST <endpoint>/v1/traces`, with the process's service name and each
 * span's name, attributes and parent. The receiver here is a small HTTP server that decodes what
 * the exporter sends (OTLP/HTTP JSON).
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { initTracing, step, tracingFromEnv } from '../../src/common/tracing';

interface OtlpSpan { name: string; spanId: string; parentSpanId?: string; traceId: string; attributes?: Array<{ key: string; value: { stringValue?: string; intValue?: string | number } }> }
interface OtlpBody { resourceSpans: Array<{ resource: { attributes: Array<{ key: string; value: { stringValue?: string } }> }; scopeSpans: Array<{ spans: OtlpSpan[] }> }> }

test('spans reach an OTLP/HTTP receiver with the service name, names, attributes and parents', async () => {
  const received: Array<{ path: string; contentType: string; body: OtlpBody }> = [];
  const server = http.createServer((req, res) => {
    let data = '';
    req.setEncoding('utf8');
    req.on('data', (d: string) => (data += d));
    req.on('end', () => {
      received.push({ path: req.url ?? '', contentType: String(req.headers['content-type']), body: JSON.parse(data) as OtlpBody });
      res.writeHead(200, { 'content-type': 'application/json' }).end('{}');
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const endpoint = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  try {
    const options = tracingFromEnv({ OTEL_EXPORTER_OTLP_ENDPOINT: endpoint });
    expect(options).toEqual({ otlpEndpoint: endpoint });
    const tracing = initTracing('cloudlet-otlp-test', options ?? {});
    await step('outer', async () => {
      await step('inner', async () => undefined, { 'cloudlet.instance_id': 'i-otlp' });
    });
    // Shutting down flushes the batch.
    await tracing.shutdown();
  } finally {
    await new Promise<void>((r) => server.close(() => r()));
  }
  expect(received.length).toBeGreaterThan(0);
  expect(received.every((r) => r.path === '/v1/traces' && /json/.test(r.contentType))).toBe(true);
  const rs = received.flatMap((r) => r.body.resourceSpans);
  expect(rs.flatMap((x) => x.resource.attributes).find((a) => a.key === 'service.name')?.value.stringValue).toBe('cloudlet-otlp-test');
  const spans = rs.flatMap((x) => x.scopeSpans.flatMap((s) => s.spans));
  const outer = spans.find((s) => s.name === 'outer');
  const inner = spans.find((s) => s.name === 'inner');
  expect(outer && inner).toBeTruthy();
  expect(inner?.parentSpanId).toBe(outer?.spanId);
  expect(inner?.traceId).toBe(outer?.traceId);
  expect(inner?.attributes?.find((a) => a.key === 'cloudlet.instance_id')?.value.stringValue).toBe('i-otlp');
});
