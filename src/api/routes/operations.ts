import { notFound } from '../errors';
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
    handler: async ({ service, params }) => {
      const op = await service.getOperation(params.id);
      if (!op) throw notFound('operation', params.id);
      return op;
    },
  }),
];
