/**
 * One place that turns failures into HTTP answers: CloudletError codes map to statuses, zod issues
 * become a 400 listing them, anything unexpected is a 500 that names its request id (and is logged).
 */
import type { FastifyError, FastifyReply, FastifyRequest } from 'fastify';
import type { z } from 'zod';
import { isCloudletError } from '../core/errors';
import { STATUS_OF_CODE } from './codes';
import type { ErrorBody } from './schemas';

/** An HTTP-level failure raised by the API itself (auth, validation, unknown ids). */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly extra: { fix?: string; issues?: ApiIssue[]; details?: Record<string, unknown>; headers?: Record<string, string> } = {},
  ) {
    super(message);
    this.name = 'ApiError';
  }
}

export interface ApiIssue {
  path: Array<string | number>;
  message: string;
  code: string;
}

/** A 400 listing zod's issues, each with where it is (`body.hostId`, `header.idempotency-key`). */
export function validationError(where: string, error: z.ZodError): ApiError {
  const issues: ApiIssue[] = error.issues.map((i) => ({
    path: [where, ...i.path.map((p) => (typeof p === 'symbol' ? String(p) : p))],
    message: i.message,
    code: i.code,
  }));
  const summary = issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ');
  return new ApiError(400, 'BAD_INPUT', `invalid request ${where} (${summary})`, {
    issues,
    fix: 'correct the listed fields (see GET /openapi.json for the schema)',
  });
}

export function notFound(what: string, id: string): ApiError {
  return new ApiError(404, 'NOT_FOUND', `${what} ${id} does not exist`, { fix: `list them with GET ${listPathOf(what)}` });
}

function listPathOf(what: string): string {
  const plural: Record<string, string> = { base: '/v1/bases', overlay: '/v1/overlays', instance: '/v1/instances', operation: '/v1/operations' };
  return plural[what] ?? '/v1';
}

/** The error handler of the server: every failure leaves through here. */
export function sendError(err: unknown, req: FastifyRequest, reply: FastifyReply): FastifyReply {
  const requestId = String(req.id);
  let status: number;
  let body: ErrorBody['error'];
  if (err instanceof ApiError) {
    status = err.status;
    body = { code: err.code, message: err.message, requestId };
    if (err.extra.fix !== undefined) body.fix = err.extra.fix;
    if (err.extra.issues !== undefined) body.issues = err.extra.issues;
    if (err.extra.details !== undefined) body.details = err.extra.details;
    for (const [k, v] of Object.entries(err.extra.headers ?? {})) void reply.header(k, v);
  } else if (isCloudletError(err)) {
    status = STATUS_OF_CODE[err.code] ?? 500;
    body = { code: err.code, message: err.message, requestId };
    if (err.fix !== undefined) body.fix = err.fix;
    if (Object.keys(err.details).length > 0) body.details = err.details;
    // A service's own validation (e.g. of a recipe) lists its issues like the API's.
    const issues = err.details.issues;
    if (err.code === 'BAD_INPUT' && Array.isArray(issues) && issues.every(isIssue)) body.issues = issues;
  } else if (err instanceof Error && TEMPORAL_ERRORS[err.name] !== undefined) {
    // Temporal client errors a service may let through (matched by name: no Temporal import here).
    const [st, code, fix] = TEMPORAL_ERRORS[err.name] ?? [500, 'INTERNAL', ''];
    status = st;
    body = { code, message: err.message, fix, requestId };
  } else if (isClientFastifyError(err)) {
    // fastify's own 4xx: bad JSON, unsupported media type, body too large...
    status = err.statusCode;
    body = { code: status === 415 ? 'UNSUPPORTED_MEDIA_TYPE' : status === 413 ? 'TOO_LARGE' : 'BAD_INPUT', message: err.message, requestId };
    if (err.code) body.details = { fastifyCode: err.code };
  } else {
    status = 500;
    body = {
      code: 'INTERNAL',
      message: `internal error while serving ${req.method} ${req.url} (request ${requestId})`,
      fix: `retry; if it persists, look for request ${requestId} in the API server's log`,
      requestId,
    };
  }
  // 501: a feature this server runs without, not a fault.
  if (status >= 500 && status !== 501) req.log.error({ err, requestId, status }, 'request failed');
  else req.log.info({ requestId, status, code: body.code, msg: body.message }, 'request refused');
  return reply.code(status).type('application/json; charset=utf-8').send({ error: body });
}

const TEMPORAL_ERRORS: Record<string, [number, string, string]> = {
  WorkflowExecutionAlreadyStartedError: [409, 'CONFLICT', 'an operation with this id is running or done: follow it with GET /v1/operations/{id}'],
  WorkflowNotFoundError: [404, 'NOT_FOUND', 'check the operation id'],
  ScheduleNotFoundError: [404, 'NOT_FOUND', 'list the schedules with GET /v1/schedules'],
  ScheduleAlreadyRunning: [409, 'CONFLICT', 'delete the schedule first, or trigger it'],
};

function isIssue(x: unknown): x is ApiIssue {
  const i = x as Partial<ApiIssue> | null;
  return typeof i === 'object' && i !== null && Array.isArray(i.path) && typeof i.message === 'string' && typeof i.code === 'string';
}

function isClientFastifyError(err: unknown): err is FastifyError & { statusCode: number } {
  if (!(err instanceof Error)) return false;
  const s = (err as Partial<FastifyError>).statusCode;
  return typeof s === 'number' && s >= 400 && s < 500;
}
