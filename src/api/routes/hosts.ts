import { CloudletError } from '../../core/errors';
import { defineRoute, R, type Route } from '../route';
import { HostInfoSchema, HostListSchema, HostParamsSchema, PoolTargetBodySchema, PoolTargetSchema } from '../schemas';

export const hostRoutes: Route[] = [
  defineRoute({
    method: 'GET',
    path: '/v1/hosts',
    operationId: 'listHosts',
    access: 'admin',
    summary: 'List the hosts of this cloudlet and whether a worker serves each',
    tag: 'hosts',
    responses: { 200: { description: 'The hosts.', schema: HostListSchema }, 401: R.unauthorized, 403: R.forbidden },
    handler: async ({ service }) => ({ hosts: await service.listHosts() }),
  }),
  defineRoute({
    method: 'GET',
    path: '/v1/hosts/{hostId}',
    operationId: 'getHost',
    access: 'admin',
    summary: 'One host: whether a worker serves it, its stats and its warm pool',
    tag: 'hosts',
    params: HostParamsSchema,
    responses: { 200: { description: 'The host.', schema: HostInfoSchema }, 400: R.badInput, 401: R.unauthorized, 403: R.forbidden, 404: R.notFound },
    handler: async ({ params, service }) => {
      const h = await service.getHost(params.hostId);
      if (!h) throw new CloudletError('NOT_FOUND', `host ${params.hostId} is not a host of this cluster`, { fix: 'list the hosts: GET /v1/hosts' });
      return h;
    },
  }),
  defineRoute({
    method: 'POST',
    path: '/v1/hosts/{hostId}/pool',
    operationId: 'setPoolTarget',
    access: 'admin',
    summary: 'Set how many ready VMs of a base the host keeps in its warm pool',
    description: 'The host\'s warmPool run starts (or discards) VMs towards the size within seconds, as memory allows; GET /v1/hosts/{hostId} shows the pool. docs/warm-pool.md.',
    tag: 'hosts',
    params: HostParamsSchema,
    body: PoolTargetBodySchema,
    responses: {
      202: { description: 'The target is taken; the pool follows it.', schema: PoolTargetSchema },
      400: R.badInput,
      401: R.unauthorized,
      403: R.forbidden,
      404: R.notFound,
      422: { description: 'The host does not hold the base (WRONG_BASE): import it there first.' },
      503: { description: "The host's warm pool run is not running (restart its worker)." },
    },
    handler: async ({ params, body, service, reply, req }) => {
      if (!(await service.getHost(params.hostId))) throw new CloudletError('NOT_FOUND', `host ${params.hostId} is not a host of this cluster`, { fix: 'list the hosts: GET /v1/hosts' });
      if (body.size > 0 && !(await service.getBase(body.baseId))?.hostIds.includes(params.hostId)) {
        throw new CloudletError('WRONG_BASE', `host ${params.hostId} does not hold base ${body.baseId}`, { fix: `import the base on host ${params.hostId} first (POST /v1/bases)` });
      }
      const r = await service.setPoolTarget(params.hostId, body.baseId, body.size);
      req.log.info({ hostId: params.hostId, baseId: body.baseId, size: body.size }, 'warm pool target set');
      reply.code(202);
      return r;
    },
  }),
];
