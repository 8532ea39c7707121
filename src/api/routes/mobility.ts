/**
 * Mobility routes (docs/mobility.md): the neighbour registry, RTT samples and probes, the
 * per-instance mobility controller, and discovery. Without a MobilityService they answer 501.
 */
import type { MobilityService } from '../../service/mobility-types';
import { ApiError } from '../errors';
import { defineRoute, R, type Route } from '../route';
import { InstanceParamsSchema } from '../schemas';
import {
  AddNeighbourBodySchema,
  AnyObjectSchema,
  DiscoverQuerySchema,
  MoveBodySchema,
  NeighbourListSchema,
  NeighbourNameParamsSchema,
  NeighbourSchema,
  PauseBodySchema,
  PolicyPatchSchema,
  RttProbeBodySchema,
  RttReportBodySchema,
  WatchBodySchema,
} from '../mobility-schemas';

const ok = (description: string, schema = AnyObjectSchema) => ({ description, schema });

export function mobilityRoutes(mobility: MobilityService | undefined): Route[] {
  const need = (): MobilityService => {
    if (!mobility) throw new ApiError(501, 'NOT_IMPLEMENTED', 'this API server was started without mobility support', { fix: 'start it with the Temporal backend (npm run api)' });
    return mobility;
  };
  const watched = { 404: { description: 'No such instance, or it has no mobility controller.' } };
  return [
    defineRoute({
      method: 'GET',
      path: '/v1/cluster',
      operationId: 'clusterInfo',
      access: 'admin',
      summary: 'This cluster: its name and how many of its hosts serve (neighbours ask it)',
      tag: 'mobility',
      responses: { 200: ok('The cluster.'), 401: R.unauthorized },
      handler: async () => need().clusterInfo(),
    }),
    defineRoute({
      method: 'GET',
      path: '/v1/neighbours',
      operationId: 'listNeighbours',
      access: 'admin',
      summary: 'The neighbour clusters, with their last measured RTT and status (fresh, stale, unreachable, unmeasured)',
      tag: 'mobility',
      responses: { 200: { description: 'Neighbours.', schema: NeighbourListSchema }, 401: R.unauthorized },
      handler: async () => need().listNeighbours(),
    }),
    defineRoute({
      method: 'POST',
      path: '/v1/neighbours',
      operationId: 'addNeighbour',
      access: 'admin',
      summary: 'Add a neighbour cluster (its API URL and a token it accepts)',
      tag: 'mobility',
      body: AddNeighbourBodySchema,
      responses: { 201: { description: 'Added.', schema: NeighbourSchema }, 400: R.badInput, 401: R.unauthorized, 403: { description: 'The URL names a host this cluster does not allow (CLOUDLET_NEIGHBOUR_HOSTS).' }, 409: { description: 'A neighbour of that name exists.' } },
      handler: async ({ body, reply }) => {
        const n = await need().addNeighbour(body);
        void reply.code(201);
        return n;
      },
    }),
    defineRoute({
      method: 'DELETE',
      path: '/v1/neighbours/{name}',
      operationId: 'removeNeighbour',
      access: 'admin',
      summary: 'Remove a neighbour cluster',
      tag: 'mobility',
      params: NeighbourNameParamsSchema,
      responses: { 204: { description: 'Removed.' }, 401: R.unauthorized, 404: R.notFound },
      handler: async ({ params, reply }) => {
        await need().removeNeighbour(params.name);
        return reply.code(204).send();
      },
    }),
    defineRoute({
      method: 'POST',
      path: '/v1/neighbours/refresh',
      operationId: 'refreshNeighbours',
      access: 'admin',
      summary: 'Measure every neighbour now (a Schedule does it every minute)',
      tag: 'mobility',
      bodyOptional: true,
      responses: { 200: { description: 'Neighbours after the measurement.', schema: NeighbourListSchema }, 401: R.unauthorized },
      handler: async () => need().refreshNeighbours(),
    }),
    defineRoute({
      method: 'POST',
      path: '/v1/rtt-probes',
      operationId: 'probeDevice',
      access: 'admin',
      summary: "Measure this cluster's RTT to a device (an application-level ping to its responder); neighbours ask this",
      tag: 'mobility',
      body: RttProbeBodySchema,
      responses: { 200: ok('The measurement.'), 400: R.badInput, 401: R.unauthorized, 503: { description: 'The device does not answer.' } },
      handler: async ({ body }) => need().probeDevice(body.device, body.baseId),
    }),
    defineRoute({
      method: 'POST',
      path: '/v1/instances/{id}/rtt',
      operationId: 'reportRtt',
      summary: 'RTT samples the device measured to this cloudlet; the first starts the instance\'s mobility controller',
      tag: 'mobility',
      params: InstanceParamsSchema,
      body: RttReportBodySchema,
      responses: { 200: ok('The controller\'s state.'), 400: R.badInput, 401: R.unauthorized, 404: R.notFound, 409: R.conflict },
      handler: async ({ params, body, service, scope }) => {
        await scope.guardInstance(service, params.id);
        return need().reportRtt(params.id, body.samples, body.device);
      },
    }),
    defineRoute({
      method: 'GET',
      path: '/v1/instances/{id}/mobility',
      operationId: 'mobilityState',
      summary: 'The mobility controller of an instance: RTT, threshold, policy, decisions and why',
      tag: 'mobility',
      params: InstanceParamsSchema,
      responses: { 200: ok('The state.'), 401: R.unauthorized, ...watched },
      handler: async ({ params, service, scope }) => {
        await scope.guardInstance(service, params.id);
        return need().state(params.id);
      },
    }),
    defineRoute({
      method: 'POST',
      path: '/v1/instances/{id}/mobility',
      operationId: 'watchInstance',
      summary: 'Start the mobility controller of an instance, or change its device address and policy',
      tag: 'mobility',
      params: InstanceParamsSchema,
      body: WatchBodySchema,
      bodyOptional: true,
      responses: { 200: ok('The state.'), 400: R.badInput, 401: R.unauthorized, 404: R.notFound, 409: R.conflict },
      handler: async ({ params, body, service, scope }) => {
        await scope.guardInstance(service, params.id);
        return need().watch(params.id, body);
      },
    }),
    defineRoute({
      method: 'DELETE',
      path: '/v1/instances/{id}/mobility',
      operationId: 'unwatchInstance',
      summary: 'Stop the mobility controller of an instance (the instance keeps running)',
      tag: 'mobility',
      params: InstanceParamsSchema,
      responses: { 204: { description: 'Stopped.' }, 401: R.unauthorized, ...watched },
      handler: async ({ params, reply, service, scope }) => {
        await scope.guardInstance(service, params.id);
        await need().stop(params.id);
        return reply.code(204).send();
      },
    }),
    defineRoute({
      method: 'POST',
      path: '/v1/instances/{id}/mobility/policy',
      operationId: 'setMobilityPolicy',
      summary: 'Change fields of the controller\'s policy (threshold, window, hysteresis, cooldown, minimum gain...)',
      tag: 'mobility',
      params: InstanceParamsSchema,
      body: PolicyPatchSchema,
      responses: { 200: ok('The policy now.'), 400: R.badInput, 401: R.unauthorized, ...watched },
      handler: async ({ params, body, service, scope }) => {
        await scope.guardInstance(service, params.id);
        return need().setPolicy(params.id, body);
      },
    }),
    defineRoute({
      method: 'POST',
      path: '/v1/instances/{id}/mobility/pause',
      operationId: 'pauseMobility',
      summary: 'Pause ({"paused": true}) or resume ({"paused": false}) the controller\'s automatic moves',
      tag: 'mobility',
      params: InstanceParamsSchema,
      body: PauseBodySchema,
      responses: { 200: ok('The state.'), 400: R.badInput, 401: R.unauthorized, ...watched },
      handler: async ({ params, body, service, scope }) => {
        await scope.guardInstance(service, params.id);
        return need().pause(params.id, body.paused);
      },
    }),
    defineRoute({
      method: 'POST',
      path: '/v1/instances/{id}/mobility/move',
      operationId: 'moveInstance',
      summary: 'Force a move now: to the named neighbour, or to the nearest one that can take it',
      description: 'Answers with the decision once it is made; the handoff it starts runs on (GET /v1/operations/{handoff.workflowId}).',
      tag: 'mobility',
      params: InstanceParamsSchema,
      body: MoveBodySchema,
      bodyOptional: true,
      responses: { 200: ok('The decision.'), 400: R.badInput, 401: R.unauthorized, ...watched, 409: R.conflict },
      handler: async ({ params, body, service, scope }) => {
        await scope.guardInstance(service, params.id);
        return need().moveNow(params.id, body.neighbour);
      },
    }),
    defineRoute({
      method: 'GET',
      path: '/v1/discover',
      operationId: 'discover',
      access: 'admin',
      summary: 'The clusters that can serve an application (an overlay id, a recipe id, or a base id) to a device, nearest first',
      description: 'Measures this cluster\'s RTT to the device and asks every neighbour for theirs; within 5 ms, a cluster already holding the base comes first.',
      tag: 'mobility',
      query: DiscoverQuerySchema,
      responses: { 200: ok('The clusters.'), 400: R.badInput, 401: R.unauthorized, 404: R.notFound },
      handler: async ({ query, req }) => need().discover(query.app, query.device, `${req.protocol}://${req.headers.host ?? req.hostname}`),
    }),
  ];
}
