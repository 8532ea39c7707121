import { notFound } from '../errors';
import { sendFileWithRange } from '../download';
import { accepted, defineRoute, R, type Route } from '../route';
import { AcceptedSchema, CreateOverlayBodySchema, OverlayInfoSchema, OverlayListSchema, Sha256ParamsSchema } from '../schemas';
import type { CreateOverlayRequest } from '../../service/types';

export const overlayRoutes: Route[] = [
  defineRoute({
    method: 'POST',
    path: '/v1/overlays',
    operationId: 'createOverlay',
    summary: 'Create and publish an overlay from an instance resumed from a base (createOverlay workflow)',
    tag: 'overlays',
    idempotent: true,
    body: CreateOverlayBodySchema,
    responses: {
      202: { description: 'Overlay creation started.', schema: AcceptedSchema, headers: { Location: 'The operation status URL' } },
      400: R.badInput,
      401: R.unauthorized,
      404: R.notFound,
      409: R.conflict,
    },
    handler: async ({ service, scope, body, idempotencyKey, reply }) => {
      const req: CreateOverlayRequest = { instanceId: body.instanceId };
      if (body.keepInstance !== undefined) req.keepInstance = body.keepInstance;
      await scope.guardInstance(service, body.instanceId);
      const ref = await service.createOverlay(req, idempotencyKey);
      await scope.own(ref);
      return accepted(reply, ref);
    },
  }),
  defineRoute({
    method: 'GET',
    path: '/v1/overlays',
    operationId: 'listOverlays',
    summary: 'List published overlays',
    tag: 'overlays',
    responses: { 200: { description: 'The overlays.', schema: OverlayListSchema }, 401: R.unauthorized },
    handler: async ({ service, scope }) => ({ overlays: await scope.overlays(await service.listOverlays()) }),
  }),
  defineRoute({
    method: 'GET',
    path: '/v1/overlays/{id}',
    operationId: 'getOverlay',
    summary: 'Show an overlay',
    tag: 'overlays',
    params: Sha256ParamsSchema,
    responses: { 200: { description: 'The overlay.', schema: OverlayInfoSchema }, 400: R.badInput, 401: R.unauthorized, 404: R.notFound },
    handler: async ({ service, scope, params }) => scope.overlay(service, params.id),
  }),
  defineRoute({
    method: 'GET',
    path: '/v1/overlays/{id}/content',
    operationId: 'downloadOverlay',
    summary: 'Download the overlay file; single byte ranges, ETag = sha256, If-Range, If-None-Match',
    tag: 'overlays',
    params: Sha256ParamsSchema,
    responses: {
      200: { description: 'The whole overlay.', binary: true },
      206: { description: 'The requested byte range (Content-Range).', binary: true },
      304: { description: 'Not modified (If-None-Match).' },
      401: R.unauthorized,
      404: R.notFound,
      416: { description: 'Range not satisfiable (Content-Range: bytes */size).' },
    },
    handler: async ({ service, scope, params, req, reply }) => {
      if (!scope.isAdmin) await scope.overlay(service, params.id);
      const file = await service.overlayFile(params.id);
      if (file === undefined) throw notFound('overlay', params.id);
      return sendFileWithRange(req, reply, { file, etag: `"${params.id}"`, filename: `${params.id}.overlay` });
    },
  }),
];
