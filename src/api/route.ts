/**
 * A route of the API, described once: method, path, zod schemas for params and body, whether it
 * needs a token and takes an Idempotency-Key, its documented responses, and a handler that gets
 * the parsed, typed input. The server registers these with fastify; the OpenAPI document is
 * generated from the same descriptions, so the two cannot drift apart.
 */
import type { FastifyReply, FastifyRequest } from 'fastify';
import type { z } from 'zod';
import type { CloudletService, OperationRef } from '../service/types';
import type { Access } from './auth';
import type { TenantScope } from './tenancy';

type Out<S> = S extends z.ZodType ? z.output<S> : undefined;

export interface RouteContext<P, B, Q = unknown> {
  params: P;
  body: B;
  /** The parsed query string (routes with a `query` schema only). */
  query: Q;
  /** The validated Idempotency-Key header (routes with `idempotent: true` only). */
  idempotencyKey: string | undefined;
  service: CloudletService;
  /** Who asks, and what of the cluster's objects they see (src/api/tenancy.ts). */
  scope: TenantScope;
  req: FastifyRequest;
  reply: FastifyReply;
}

export interface ResponseDoc {
  description: string;
  /** A named schema (registered in apiSchemas) for a JSON body. */
  schema?: z.ZodType;
  /** A binary body (file download). */
  binary?: boolean;
  headers?: Record<string, string>;
}

export interface RouteDef<PS extends z.ZodType | undefined = undefined, BS extends z.ZodType | undefined = undefined, QS extends z.ZodType | undefined = undefined> {
  method: 'GET' | 'POST' | 'DELETE';
  /** OpenAPI-style path, e.g. /v1/bases/{id}. */
  path: string;
  /** The fastify path when it differs from `path` with {x} turned into :x (e.g. a wildcard). */
  fastifyPath?: string;
  operationId: string;
  summary: string;
  description?: string;
  tag: string;
  /** Default true: needs Authorization: Bearer <token>. */
  auth?: boolean;
  /** The role the route needs (default: reader for GET, member otherwise); docs/security.md. */
  access?: Access;
  /** Accepts an Idempotency-Key header, passed to the service. */
  idempotent?: boolean;
  params?: PS;
  body?: BS;
  /** The query string's parameters (flat strings). */
  query?: QS;
  /** The body may be left out (parsed as {}). */
  bodyOptional?: boolean;
  responses: Record<number, ResponseDoc>;
  /** Returns the JSON body (sent with the reply's status, 200 unless set) or the reply itself once sent. */
  handler(ctx: RouteContext<Out<PS>, Out<BS>, Out<QS>>): Promise<unknown>;
}

/** A route with its types erased, as the server and the OpenAPI generator see it. */
export interface Route {
  method: 'GET' | 'POST' | 'DELETE';
  path: string;
  fastifyPath?: string;
  operationId: string;
  summary: string;
  description?: string;
  tag: string;
  auth?: boolean;
  access?: Access;
  idempotent?: boolean;
  params?: z.ZodType;
  body?: z.ZodType;
  query?: z.ZodType;
  bodyOptional?: boolean;
  responses: Record<number, ResponseDoc>;
  handler(ctx: RouteContext<unknown, unknown, unknown>): Promise<unknown>;
}

export function defineRoute<PS extends z.ZodType | undefined = undefined, BS extends z.ZodType | undefined = undefined, QS extends z.ZodType | undefined = undefined>(def: RouteDef<PS, BS, QS>): Route {
  return def as unknown as Route;
}

/** The path of an operation's status: its id URL-encoded in one segment (ids contain slashes). */
export function operationStatusPath(id: string): string {
  return `/v1/operations/${encodeURIComponent(id)}`;
}

/** Answer 202 for a started operation, with its status URL in the body and in Location. */
export function accepted(reply: FastifyReply, operation: OperationRef): { operation: OperationRef; statusUrl: string } {
  const statusUrl = operationStatusPath(operation.id);
  void reply.code(202).header('location', statusUrl);
  return { operation, statusUrl };
}

/** The role a route needs: its own, or reader for GET and member for changes. */
export function accessOf(route: Pick<Route, 'access' | 'method'>): Access {
  return route.access ?? (route.method === 'GET' ? 'reader' : 'member');
}

/** Common response docs. */
export const R = {
  unauthorized: { description: 'Missing or wrong bearer token (WWW-Authenticate says which).', headers: { 'WWW-Authenticate': 'Bearer challenge' } },
  badInput: { description: 'Malformed request: the zod issues are listed in error.issues.' },
  notFound: { description: 'No such object.' },
  conflict: { description: 'The object is not in a state that allows this (e.g. an instance still provisioning).' },
  unprocessable: { description: 'Well-formed, but names something the cloudlet cannot use (unknown host, wrong base...).' },
  forbidden: { description: 'The token\'s role may not do this (docs/security.md): e.g. a member on an admin route, a reader on a change.' },
  quota: { description: 'The tenant\'s quota (instances or guest memory) would be exceeded.' },
  sourceRefused: { description: "The fetch policy refuses the source: an address off the allow-list, another scheme, a path outside the import directories (docs/security.md)." },
} satisfies Record<string, ResponseDoc>;
