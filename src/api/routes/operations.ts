import { defineRoute, R, type Route } from '../route';
import { OperationParamsSchema, OperationStatusSchema } from '../schemas';

export const operationRoutes: Route[] = [
  defineRoute({
    method: 'GET',
    path: '/v1/operations/{id}',
    // A wildcard so ids with slashes work URL-encoded in one segment or not encoded at all.
    fastifyPath: '/v1/operations/*',
    operationId: 'getOperation',
    summary: 'Status of an operation (a workflow): state, progress, result or error',
    description: 'The id is a workflow id such as "synthesizeVm/host-b/inst-1": send it URL-encoded (%2F), as statusUrl does.',
    tag: 'operations',
    params: OperationParamsSchema,
    responses: { 200: { description: 'The status.', schema: OperationStatusSchema }, 401: R.unauthorized, 404: R.notFound },
    handler: async ({ service, scope, params }) => scope.operation(service, params.id),
  }),
  defineRoute({
    method: 'DELETE',
    path: '/v1/operations/{id}',
    fastifyPath: '/v1/operations/*',
    operationId: 'cancelOperation',
    summary: 'Cancel a running operation: it stops and removes what it made (a deployment cancels all its syntheses)',
    tag: 'operations',
    params: OperationParamsSchema,
    responses: { 202: { description: 'Cancellation requested; follow GET /v1/operations/{id} until it is cancelled.' }, 401: R.unauthorized, 404: R.notFound, 409: { description: 'The operation has ended.' } },
    handler: async ({ service, scope, params, reply }) => {
      if (!scope.isAdmin) await scope.operation(service, params.id);
      await service.cancelOperation(params.id);
      return reply.code(202).send({ cancelling: params.id });
    },
  }),
];
