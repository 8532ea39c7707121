import { defineRoute, R, type Route } from '../route';
import { HostListSchema } from '../schemas';

export const hostRoutes: Route[] = [
  defineRoute({
    method: 'GET',
    path: '/v1/hosts',
    operationId: 'listHosts',
    access: 'admin',
    summary: 'List the hosts of this cloudlet and whether a worker serves each',
    tag: 'hosts',
    responses: { 200: { description: 'The hosts.', schema: HostListSchema }, 401: R.unauthorized },
    handler: async ({ service }) => ({ hosts: await service.listHosts() }),
  }),
];
