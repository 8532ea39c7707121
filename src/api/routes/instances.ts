import { memoryOfOverlay } from '../tenancy';
import { accepted, defineRoute, R, type Route } from '../route';
import { AcceptedSchema, InstanceInfoSchema, InstanceListSchema, InstanceParamsSchema, DeployBodySchema, ProvisionBodySchema } from '../schemas';
import type { ProvisionRequest } from '../../service/types';

export const instanceRoutes: Route[] = [
  defineRoute({
    method: 'POST',
    path: '/v1/instances',
    operationId: 'provisionInstance',
    summary: 'Provision an instance on a host by VM synthesis from an overlay URL (synthesizeVm workflow)',
    tag: 'instances',
    idempotent: true,
    body: ProvisionBodySchema,
    responses: {
      202: { description: 'Synthesis started.', schema: AcceptedSchema, headers: { Location: 'The operation status URL' } },
      400: R.badInput,
      401: R.unauthorized,
      403: R.sourceRefused,
      409: R.conflict,
      422: R.unprocessable,
      429: R.quota,
    },
    handler: async ({ service, scope, body, idempotencyKey, reply }) => {
      const req: ProvisionRequest = { hostId: body.hostId, overlayUrl: body.overlayUrl };
      if (body.waitForAppPort !== undefined) req.waitForAppPort = body.waitForAppPort;
      if (body.warmPool !== undefined) req.warmPool = body.warmPool;
      await scope.guardOverlayUrl(service, body.overlayUrl);
      const memory = scope.isAdmin ? 0 : await memoryOfOverlay(service, body.overlayUrl);
      return accepted(reply, await scope.startWithinQuota(service, 1, memory, () => service.provisionInstance(req, idempotencyKey)));
    },
  }),
  defineRoute({
    method: 'POST',
    path: '/v1/deployments',
    operationId: 'deploy',
    summary: 'Provision the same application on many hosts at once: each host fetches the overlay once (deployOverlay workflow)',
    description: 'Starts a deployOverlay operation whose result lists every VM per host (its endpoint, or why it failed); one host failing leaves the others running. Cancel it as a whole with DELETE /v1/operations/{id}.',
    tag: 'instances',
    idempotent: true,
    body: DeployBodySchema,
    responses: {
      202: { description: 'Deployment started.', schema: AcceptedSchema, headers: { Location: 'The operation status URL' } },
      400: R.badInput,
      401: R.unauthorized,
      403: R.sourceRefused,
      409: R.conflict,
      422: R.unprocessable,
      429: R.quota,
    },
    handler: async ({ service, scope, body, idempotencyKey, reply }) => {
      await scope.guardOverlayUrl(service, body.overlayUrl);
      const memory = scope.isAdmin ? 0 : await memoryOfOverlay(service, body.overlayUrl);
      const start = () => service.deploy({ overlayUrl: body.overlayUrl, hosts: body.hosts, count: body.count, ...(body.waitForAppPort !== undefined ? { waitForAppPort: body.waitForAppPort } : {}) }, idempotencyKey);
      return accepted(reply, await scope.startWithinQuota(service, body.count, memory, start));
    },
  }),
  defineRoute({
    method: 'GET',
    path: '/v1/instances',
    operationId: 'listInstances',
    summary: 'List instances',
    tag: 'instances',
    responses: { 200: { description: 'The instances.', schema: InstanceListSchema }, 401: R.unauthorized },
    handler: async ({ service, scope }) => ({ instances: await scope.instances(await service.listInstances()) }),
  }),
  defineRoute({
    method: 'GET',
    path: '/v1/instances/{id}',
    operationId: 'getInstance',
    summary: 'Show an instance (state, progress while provisioning, application endpoint, synthesis timings)',
    tag: 'instances',
    params: InstanceParamsSchema,
    responses: { 200: { description: 'The instance.', schema: InstanceInfoSchema }, 400: R.badInput, 401: R.unauthorized, 404: R.notFound },
    handler: async ({ service, scope, params }) => {
      const inst = await scope.instance(service, params.id);
      if (inst.state !== 'provisioning') return inst;
      // Show it with the progress of the operation that makes it.
      const op = await service.getOperation(inst.operationId);
      return op?.progress ? { ...inst, progress: op.progress } : inst;
    },
  }),
  defineRoute({
    method: 'DELETE',
    path: '/v1/instances/{id}',
    operationId: 'terminateInstance',
    summary: 'Terminate an instance (terminateVm workflow)',
    tag: 'instances',
    idempotent: true,
    params: InstanceParamsSchema,
    responses: {
      202: { description: 'Termination started.', schema: AcceptedSchema, headers: { Location: 'The operation status URL' } },
      400: R.badInput,
      401: R.unauthorized,
      404: R.notFound,
      409: R.conflict,
    },
    handler: async ({ service, scope, params, idempotencyKey, reply }) => {
      // Check first so an unknown id is a 404 here rather than a failed workflow later.
      await scope.instance(service, params.id);
      const ref = await service.terminateInstance(params.id, idempotencyKey);
      await scope.own(ref);
      return accepted(reply, ref);
    },
  }),
];
