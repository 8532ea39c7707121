/**
 * OpenTelemetry tracing for a process (API or host worker), when configured:
 *
 * - `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`): spans go over OTLP/HTTP (batched);
 * - `CLOUDLET_TRACE_FILE`: spans are appended to that file, one JSON object per line (tests, and
 *   a quick look without a collector).
 *
 * Temporal's OpenTelemetry interceptors carry the trace from the API's client call through the
 * workflow to each activity (src/workers/host-worker.ts, src/client/connect.ts); activities add
 * spans for their inner steps with `step()`. Without configuration nothing is set up and spans are
 * no-ops. Format and operations: docs/observability.md.
 */
import fs from 'node:fs';
import path from 'node:path';
import { context, propagation, trace, SpanStatusCode, type Attributes, type Span } from '@opentelemetry/api';
import { ExportResultCode, type ExportResult } from '@opentelemetry/core';
import { Resource } from '@opentelemetry/resources';
import { BatchSpanProcessor, SimpleSpanProcessor, type ReadableSpan, type SpanExporter, type SpanProcessor } from '@opentelemetry/sdk-trace-base';
import { NodeTracerProvider } from '@opentelemetry/sdk-trace-node';
import { OTLPTraceExporter } from '@opentelemetry/exporter-trace-otlp-http';

/** One line of a trace file. */
export interface SpanLine {
  traceId: string;
  spanId: string;
  parentSpanId?: string;
  name: string;
  service: string;
  kind: number;
  startMs: number;
  durationMs: number;
  status: number;
  attributes: Record<string, unknown>;
}

const hrMs = (t: [number, number]): number => t[0] * 1000 + t[1] / 1e6;

/** Appends finished spans to a file as JSON lines. */
export class FileSpanExporter implements SpanExporter {
  constructor(private readonly file: string) {
    fs.mkdirSync(path.dirname(file), { recursive: true });
  }

  export(spans: ReadableSpan[], done: (r: ExportResult) => void): void {
    const lines = spans.map((s) => {
      const ctx = s.spanContext();
      const line: SpanLine = {
        traceId: ctx.traceId,
        spanId: ctx.spanId,
        ...(s.parentSpanId ? { parentSpanId: s.parentSpanId } : {}),
        name: s.name,
        service: String(s.resource.attributes['service.name'] ?? ''),
        kind: s.kind,
        startMs: Math.round(hrMs(s.startTime)),
        durationMs: Math.round(hrMs(s.duration) * 1000) / 1000,
        status: s.status.code,
        attributes: { ...s.attributes },
      };
      return JSON.stringify(line);
    });
    fs.appendFile(this.file, `${lines.join('\n')}\n`, (err) => done(err ? { code: ExportResultCode.FAILED, error: err } : { code: ExportResultCode.SUCCESS }));
  }

  async shutdown(): Promise<void> {
    // appends are complete when their callbacks ran
  }
}

/** Hands every span to several processors (the workflow sink takes one processor). */
class FanOut implements SpanProcessor {
  constructor(private readonly all: SpanProcessor[]) {}
  onStart(span: Parameters<SpanProcessor['onStart']>[0], ctx: Parameters<SpanProcessor['onStart']>[1]): void {
    for (const p of this.all) p.onStart(span, ctx);
  }
  onEnd(span: ReadableSpan): void {
    for (const p of this.all) p.onEnd(span);
  }
  async forceFlush(): Promise<void> {
    await Promise.all(this.all.map((p) => p.forceFlush()));
  }
  async shutdown(): Promise<void> {
    await Promise.all(this.all.map((p) => p.shutdown()));
  }
}

export interface Tracing {
  resource: Resource;
  /** For Temporal's workflow span sink. */
  processor: SpanProcessor;
  /** Exports what is pending and stops. */
  shutdown(): Promise<void>;
}

let active: Tracing | undefined;

/** The tracing set up in this process, if any. */
export function activeTracing(): Tracing | undefined {
  return active;
}

export interface TracingOptions {
  file?: string;
  otlpEndpoint?: string;
}

/** The options the environment asks for (undefined: no tracing). */
export function tracingFromEnv(env: NodeJS.ProcessEnv = process.env): TracingOptions | undefined {
  const file = env.CLOUDLET_TRACE_FILE;
  const otlpEndpoint = env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT ?? env.OTEL_EXPORTER_OTLP_ENDPOINT;
  if (!file && !otlpEndpoint) return undefined;
  return { ...(file ? { file } : {}), ...(otlpEndpoint ? { otlpEndpoint } : {}) };
}

/** Sets up tracing for this process once (the first call wins); `service` names the process. */
export function initTracing(service: string, options: TracingOptions): Tracing {
  if (active) return active;
  const processors: SpanProcessor[] = [];
  if (options.file) processors.push(new SimpleSpanProcessor(new FileSpanExporter(path.resolve(options.file))));
  if (options.otlpEndpoint) {
    // The exporter reads OTEL_EXPORTER_OTLP_* itself (endpoint, headers); a bare base URL gets /v1/traces.
    const url = /\/v1\/traces$/.test(options.otlpEndpoint) ? options.otlpEndpoint : `${options.otlpEndpoint.replace(/\/+$/, '')}/v1/traces`;
    processors.push(new BatchSpanProcessor(new OTLPTraceExporter({ url })));
  }
  const resource = new Resource({ 'service.name': service });
  const processor = new FanOut(processors);
  const provider = new NodeTracerProvider({ resource, spanProcessors: [processor] });
  provider.register();
  active = {
    resource,
    processor,
    async shutdown() {
      await provider.shutdown();
      trace.disable();
      context.disable();
      propagation.disable();
      active = undefined;
    },
  };
  return active;
}

const tracer = () => trace.getTracer('cloudlet');

/** Runs `work` in a child span named `name` of the current one (a no-op span without tracing). */
export async function step<T>(name: string, work: (span: Span) => Promise<T>, attributes: Attributes = {}): Promise<T> {
  return tracer().startActiveSpan(name, { attributes }, async (span) => {
    try {
      return await work(span);
    } catch (e) {
      span.recordException(e instanceof Error ? e : String(e));
      span.setStatus({ code: SpanStatusCode.ERROR, message: e instanceof Error ? e.message : String(e) });
      throw e;
    } finally {
      span.end();
    }
  });
}

/**
 * Spans for phases that ran one after another and were timed, not wrapped (e.g. the overlay
 * apply's own timings): each starts where the previous ended, from `startMs`.
 */
export function phaseSpans(startMs: number, phases: Array<[name: string, ms: number]>, attributes: Attributes = {}): void {
  let at = startMs;
  for (const [name, ms] of phases) {
    tracer().startSpan(name, { startTime: at, attributes }).end(at + ms);
    at += ms;
  }
}
