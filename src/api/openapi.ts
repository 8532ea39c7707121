/**
 * The OpenAPI 3.1 document, generated from the route descriptions and the zod schemas (zod 4's
 * toJSONSchema, JSON Schema 2020-12 as OpenAPI 3.1 uses it). Named schemas become components.
 */
import { z } from 'zod';
import { accessOf, R, type ResponseDoc, type Route } from './route';
import { apiSchemas, ErrorBodySchema, IdempotencyKeySchema } from './schemas';

const ref = (id: string) => `#/components/schemas/${id}`;

type JsonSchema = Record<string, unknown>;

function strip(schema: JsonSchema): JsonSchema {
  const { $schema: _s, $id: _i, ...rest } = schema;
  return rest;
}

/** JSON Schema of a zod schema: a $ref when it is a named one, else inline (refs to named ones). */
function schemaOf(schema: z.ZodType, io: 'input' | 'output'): JsonSchema {
  const meta = apiSchemas.get(schema);
  if (meta) return { $ref: ref(meta.id) };
  // Named schemas inside come out as "#/$defs/<id>": point them at the components instead.
  const js = strip(z.toJSONSchema(schema, { metadata: apiSchemas, io, unrepresentable: 'any' }) as JsonSchema);
  delete js.$defs;
  return JSON.parse(JSON.stringify(js).replace(/"#\/\$defs\//g, '"#/components/schemas/')) as JsonSchema;
}

function nameOf(schema: z.ZodType): string | undefined {
  return apiSchemas.get(schema)?.id;
}

export interface OpenApiInfo {
  title?: string;
  version?: string;
}

export function buildOpenApi(routes: readonly Route[], info: OpenApiInfo = {}): Record<string, unknown> {
  const generated = z.toJSONSchema(apiSchemas, { uri: ref, io: 'output', unrepresentable: 'any' }) as { schemas: Record<string, JsonSchema> };
  const components: Record<string, JsonSchema> = {};
  for (const [id, s] of Object.entries(generated.schemas)) components[id] = strip(s);

  const paths: Record<string, Record<string, unknown>> = {};
  for (const r of routes) {
    const parameters: unknown[] = [];
    if (r.params) {
      const js = z.toJSONSchema(r.params, { io: 'input', unrepresentable: 'any' }) as { properties?: Record<string, JsonSchema> };
      for (const [name, s] of Object.entries(js.properties ?? {})) parameters.push({ name, in: 'path', required: true, schema: s });
    }
    if (r.query) {
      const js = z.toJSONSchema(r.query, { io: 'input', unrepresentable: 'any' }) as { properties?: Record<string, JsonSchema>; required?: string[] };
      for (const [name, s] of Object.entries(js.properties ?? {})) parameters.push({ name, in: 'query', required: js.required?.includes(name) ?? false, schema: s });
    }
    if (r.idempotent) {
      parameters.push({
        name: 'Idempotency-Key',
        in: 'header',
        required: false,
        description: 'Makes a retried request safe: the same key returns the operation started the first time.',
        schema: strip(z.toJSONSchema(IdempotencyKeySchema) as JsonSchema),
      });
    }
    const responses: Record<string, unknown> = {};
    // Every route that takes a token may refuse a role below the one it needs.
    const docs: Record<number, ResponseDoc> = r.auth === false || r.responses[403] ? r.responses : { ...r.responses, 403: R.forbidden };
    for (const [status, doc] of Object.entries(docs)) {
      const out: Record<string, unknown> = { description: doc.description };
      const code = Number(status);
      if (doc.schema) out.content = { 'application/json': { schema: schemaOf(doc.schema, 'output') } };
      else if (doc.binary) out.content = { 'application/octet-stream': { schema: { type: 'string', contentMediaType: 'application/octet-stream' } } };
      else if (code >= 400 && code !== 416) out.content = { 'application/json': { schema: { $ref: ref(nameOf(ErrorBodySchema) ?? 'Error') } } };
      if (doc.headers) out.headers = Object.fromEntries(Object.entries(doc.headers).map(([h, d]) => [h, { description: d, schema: { type: 'string' } }]));
      responses[status] = out;
    }
    responses.default = { description: 'Unexpected error (500 with a request id, logged by the server).', content: { 'application/json': { schema: { $ref: ref('Error') } } } };
    const op: Record<string, unknown> = {
      operationId: r.operationId,
      summary: r.summary,
      tags: [r.tag],
      parameters,
      responses,
      security: r.auth === false ? [] : [{ bearer: [] }],
    };
    if (r.auth !== false) op['x-cloudlet-role'] = accessOf(r);
    if (r.description !== undefined) op.description = r.description;
    if (r.body) op.requestBody = { required: r.bodyOptional !== true, content: { 'application/json': { schema: schemaOf(r.body, 'input') } } };
    (paths[r.path] ??= {})[r.method.toLowerCase()] = op;
  }

  return {
    openapi: '3.1.0',
    info: {
      title: info.title ?? 'Cloudlet API',
      version: info.version ?? '1',
      description:
        'Cloudlet operations (import base VMs, resume, create overlays, provision by VM synthesis, terminate) as durable Temporal workflows. ' +
        'Operations answer 202 with the workflow id and a status URL; GET /v1/operations/{id} reports progress.',
    },
    servers: [{ url: '/' }],
    paths,
    components: {
      schemas: components,
      securitySchemes: { bearer: { type: 'http', scheme: 'bearer', description: 'An operator\'s token from the server\'s CLOUDLET_API_TOKENS (admin), or one minted with POST /v1/tokens for a tenant and role. x-cloudlet-role on each operation names the least role it needs (docs/security.md).' } },
    },
    security: [{ bearer: [] }],
  };
}
