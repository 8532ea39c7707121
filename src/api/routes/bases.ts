import { notFound } from '../errors';
import { sendFileWithRange } from '../download';
import { accepted, defineRoute, R, type Route } from '../route';
import {
  AcceptedSchema,
  BaseInfoSchema,
  BaseListSchema,
  ImportBaseBodySchema,
  ResumeBaseBodySchema,
  Sha256ParamsSchema,
} from '../schemas';

export const baseRoutes: Route[] = [
  defineRoute({
    method: 'POST',
    path: '/v1/bases',
    operationId: 'importBase',
    access: 'admin',
    summary: 'Import a base VM package on a host (importBaseVm workflow)',
    tag: 'bases',
    idempotent: true,
    body: ImportBaseBodySchema,
    responses: {
      202: { description: 'Import started.', schema: AcceptedSchema, headers: { Location: 'The operation status URL' } },
      400: R.badInput,
      401: R.unauthorized,
      403: R.sourceRefused,
      409: R.conflict,
      422: R.unprocessable,
    },
    handler: async ({ service, scope, body, idempotencyKey, reply }) => {
      const ref = await service.importBase({ hostId: body.hostId, source: body.source }, idempotencyKey);
      // A base of a tenant is that tenant's alone; without one it is shared with every tenant.
      await scope.own(ref, body.tenant ?? null);
      return accepted(reply, ref);
    },
  }),
  defineRoute({
    method: 'GET',
    path: '/v1/bases',
    operationId: 'listBases',
    summary: 'List base VMs and the hosts holding each',
    tag: 'bases',
    responses: { 200: { description: 'The bases.', schema: BaseListSchema }, 401: R.unauthorized },
    handler: async ({ service, scope }) => ({ bases: await scope.bases(await service.listBases()) }),
  }),
  defineRoute({
    method: 'GET',
    path: '/v1/bases/{id}',
    operationId: 'getBase',
    summary: 'Show a base VM',
    tag: 'bases',
    params: Sha256ParamsSchema,
    responses: { 200: { description: 'The base.', schema: BaseInfoSchema }, 400: R.badInput, 401: R.unauthorized, 404: R.notFound },
    handler: async ({ service, scope, params }) => scope.base(service, params.id),
  }),
  defineRoute({
    method: 'GET',
    path: '/v1/bases/{id}/package',
    operationId: 'downloadBasePackage',
    summary: 'Download the base VM package (export); supports Range',
    tag: 'bases',
    params: Sha256ParamsSchema,
    responses: {
      200: { description: 'The package file.', binary: true },
      206: { description: 'The requested byte range.', binary: true },
      304: { description: 'Not modified (If-None-Match).' },
      401: R.unauthorized,
      404: R.notFound,
      416: { description: 'Range not satisfiable (Content-Range: bytes */size).' },
    },
    handler: async ({ service, scope, params, req, reply }) => {
      await scope.base(service, params.id);
      const file = await service.basePackageFile(params.id);
      if (file === undefined) throw notFound('base', params.id);
      return sendFileWithRange(req, reply, { file, filename: `${params.id}.cloudlet-base` });
    },
  }),
  defineRoute({
    method: 'POST',
    path: '/v1/bases/{id}/instances',
    operationId: 'resumeBase',
    summary: 'Resume the base VM as a new instance to customize (resumeBaseVm workflow)',
    description: 'The instance is the launch VM an application developer customizes before POST /v1/overlays.',
    tag: 'bases',
    idempotent: true,
    params: Sha256ParamsSchema,
    body: ResumeBaseBodySchema,
    responses: {
      202: { description: 'Resume started.', schema: AcceptedSchema, headers: { Location: 'The operation status URL' } },
      400: R.badInput,
      401: R.unauthorized,
      404: R.notFound,
      409: R.conflict,
      422: R.unprocessable,
      429: R.quota,
    },
    handler: async ({ service, scope, params, body, idempotencyKey, reply }) => {
      const req = body.appPort === undefined ? { hostId: body.hostId, baseId: params.id } : { hostId: body.hostId, baseId: params.id, appPort: body.appPort };
      const memory = scope.isAdmin ? 0 : (await scope.base(service, params.id)).memoryBytes;
      return accepted(reply, await scope.startWithinQuota(service, 1, memory, () => service.resumeBase(req, idempotencyKey)));
    },
  }),
];
