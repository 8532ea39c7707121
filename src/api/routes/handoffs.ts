/**
 * Handoff routes. On the source: `POST /v1/instances/{id}/handoff` starts a handoffVm operation.
 * On the destination: `POST /v1/handoffs` (API credentials) issues a ticket and starts receiving;
 * the other /v1/handoffs routes take the ticket as their bearer token instead of an API token.
 * Without a HandoffService the routes answer 501.
 */
import type { FastifyRequest } from 'fastify';
import { receiveOperationId, type HandoffService } from '../../service/handoff-types';
import { ApiError } from '../errors';
import { accepted, defineRoute, R, type Route } from '../route';
import { AcceptedSchema, InstanceParamsSchema } from '../schemas';
import {
  AbortBodySchema,
  AppliedRoundSchema,
  BaseArrivedBodySchema,
  BaseImportedSchema,
  BeginReceiveBodySchema,
  CompleteBodySchema,
  HandoffInstanceBodySchema,
  HandoffParamsSchema,
  HandoffTicketSchema,
  ReceivedVmSchema,
  ReceiveStatusSchema,
  RoundArrivedBodySchema,
  TicketListSchema,
  TicketViewSchema,
} from '../handoff-schemas';

const forbidden = { description: 'The ticket is good but its handoff has ended (tickets are single-use), or it is for another handoff.' };
const ticketAuth = { description: 'Missing, malformed, forged or expired handoff ticket.' };

function ticketOf(req: FastifyRequest): string {
  const m = /^Bearer\s+(\S+)\s*$/i.exec(req.headers.authorization ?? '');
  if (!m?.[1]) {
    throw new ApiError(401, 'UNAUTHORIZED', 'this request needs Authorization: Bearer <handoff ticket>', {
      fix: 'use the ticket POST /v1/handoffs issued',
      headers: { 'www-authenticate': 'Bearer realm="cloudlet-handoff"' },
    });
  }
  return m[1];
}

export function handoffRoutes(handoffs: HandoffService | undefined): Route[] {
  const need = (): HandoffService => {
    if (!handoffs) throw new ApiError(501, 'NOT_IMPLEMENTED', 'this API server was started without handoff support', { fix: 'start it with the Temporal backend (npm run api)' });
    return handoffs;
  };
  return [
    defineRoute({
      method: 'POST',
      path: '/v1/instances/{id}/handoff',
      operationId: 'handoffInstance',
      access: 'admin',
      summary: 'Hand a running instance off to another cluster, live (handoffVm workflow)',
      description: 'Asks the destination API for a ticket with the given credentials, then ships the VM in live rounds and a short pause; progress per round in GET /v1/operations/{id}.',
      tag: 'handoff',
      params: InstanceParamsSchema,
      body: HandoffInstanceBodySchema,
      responses: {
        202: { description: 'Handoff started.', schema: AcceptedSchema, headers: { Location: 'The operation status URL' } },
        400: R.badInput,
        401: R.unauthorized,
        404: R.notFound,
        409: R.conflict,
        422: R.unprocessable,
        503: { description: 'The destination cluster did not answer.' },
      },
      handler: async ({ params, body, reply, service, scope }) => {
        await scope.guardInstance(service, params.id);
        // The VM stays its tenant's at the destination.
        const tenant = await scope.tenantOfInstance(service, params.id);
        const req = {
          destination: body.destination,
          ...(tenant ? { tenant } : {}),
          ...(body.hostId ? { hostId: body.hostId } : {}),
          ...(body.linkMbit ? { linkMbit: body.linkMbit } : {}),
          ...(body.verify ? { verify: body.verify } : {}),
          ...(body.policy ? { policy: Object.fromEntries(Object.entries(body.policy).filter(([, v]) => v !== undefined)) } : {}),
        };
        const ref = await need().handoffInstance(params.id, req);
        await scope.own(ref);
        return accepted(reply, ref);
      },
    }),
    defineRoute({
      method: 'POST',
      path: '/v1/handoffs',
      operationId: 'beginReceive',
      access: 'admin',
      summary: 'Receive a VM by handoff: issue a single-use ticket and prepare a host (receiveHandoff workflow)',
      tag: 'handoff',
      body: BeginReceiveBodySchema,
      responses: { 201: { description: 'Ready to receive.', schema: HandoffTicketSchema }, 400: R.badInput, 401: R.unauthorized, 409: R.conflict, 422: R.unprocessable },
      handler: async ({ body, reply, scope }) => {
        // The VM that arrives belongs to the tenant the source named (it was that tenant's there),
        // else to the tenant whose credentials the source cluster used.
        const tenant = body.tenant ?? scope.principal.tenant;
        const ticket = await need().beginReceive({ instanceId: body.instanceId, baseId: body.baseId, ...(body.hostId ? { hostId: body.hostId } : {}), ...(tenant ? { tenant } : {}) });
        await scope.own(receiveOperationId(ticket.hostId, ticket.instanceId, ticket.handoffId), tenant ?? null);
        void reply.code(201);
        return ticket;
      },
    }),
    defineRoute({
      method: 'GET',
      path: '/v1/handoff-tickets',
      operationId: 'listHandoffTickets',
      access: 'admin',
      summary: 'The handoff tickets this cluster issued, newest first: for which VM, host and tenant, until when, and how each ended',
      tag: 'handoff',
      responses: { 200: { description: 'The tickets (never the tickets themselves: the catalog keeps their sha256).', schema: TicketListSchema }, 401: R.unauthorized, 403: R.forbidden, 503: { description: 'No cluster catalog.' } },
      handler: async () => ({ tickets: await need().listTickets() }),
    }),
    defineRoute({
      method: 'DELETE',
      path: '/v1/handoff-tickets/{id}',
      operationId: 'revokeHandoffTicket',
      access: 'admin',
      summary: 'Revoke a handoff\'s ticket: refused from now on (401), and the handoff is aborted (its receiving host removes what it made)',
      tag: 'handoff',
      params: HandoffParamsSchema,
      responses: { 200: { description: 'Revoked (or it had ended already: as it stands).', schema: TicketViewSchema }, 400: R.badInput, 401: R.unauthorized, 403: R.forbidden, 404: R.notFound, 503: { description: 'No cluster catalog, or the receiving run could not be told to stop (revoke again).' } },
      handler: async ({ params }) => need().revokeTicket(params.id),
    }),
    defineRoute({
      method: 'POST',
      path: '/v1/handoffs/{id}/base',
      operationId: 'baseArrived',
      summary: 'The base package is uploaded to the receiver (the ticket said needsBase): import it (answers when imported)',
      tag: 'handoff',
      auth: false,
      params: HandoffParamsSchema,
      body: BaseArrivedBodySchema,
      bodyOptional: true,
      responses: { 200: { description: 'Imported; rounds can come.', schema: BaseImportedSchema }, 400: R.badInput, 401: ticketAuth, 403: forbidden, 409: R.conflict, 422: R.unprocessable },
      handler: async ({ params, req }) => need().baseArrived(ticketOf(req), params.id),
    }),
    defineRoute({
      method: 'POST',
      path: '/v1/handoffs/{id}/rounds',
      operationId: 'roundArrived',
      summary: 'A round is uploaded to the receiver: apply it (answers when applied)',
      tag: 'handoff',
      auth: false,
      params: HandoffParamsSchema,
      body: RoundArrivedBodySchema,
      responses: { 200: { description: 'Applied.', schema: AppliedRoundSchema }, 400: R.badInput, 401: ticketAuth, 403: forbidden, 409: R.conflict, 422: R.unprocessable },
      handler: async ({ params, body, req }) => need().roundArrived(ticketOf(req), params.id, body),
    }),
    defineRoute({
      method: 'POST',
      path: '/v1/handoffs/{id}/complete',
      operationId: 'completeHandoff',
      summary: 'After the last round: rebuild, verify and resume the VM here (answers with it)',
      tag: 'handoff',
      auth: false,
      params: HandoffParamsSchema,
      body: CompleteBodySchema,
      responses: { 200: { description: 'The VM runs here.', schema: ReceivedVmSchema }, 400: R.badInput, 401: ticketAuth, 403: forbidden, 409: R.conflict, 422: R.unprocessable },
      handler: async ({ params, body, req }) => need().complete(ticketOf(req), params.id, body.appPort, body.verify),
    }),
    defineRoute({
      method: 'GET',
      path: '/v1/handoffs/{id}',
      operationId: 'getHandoff',
      summary: 'Where a handoff stands at this (destination) cluster',
      tag: 'handoff',
      auth: false,
      params: HandoffParamsSchema,
      responses: { 200: { description: 'The handoff.', schema: ReceiveStatusSchema }, 400: R.badInput, 401: ticketAuth, 403: forbidden },
      handler: async ({ params, req }) => need().status(ticketOf(req), params.id),
    }),
    defineRoute({
      method: 'DELETE',
      path: '/v1/handoffs/{id}',
      operationId: 'abortHandoff',
      summary: 'Abort a handoff before its cut-over: this cluster removes what it made',
      tag: 'handoff',
      auth: false,
      params: HandoffParamsSchema,
      body: AbortBodySchema,
      bodyOptional: true,
      responses: { 200: { description: 'Aborted (or already ended).', schema: ReceiveStatusSchema }, 400: R.badInput, 401: ticketAuth, 403: forbidden },
      handler: async ({ params, body, req }) => need().abort(ticketOf(req), params.id, body.reason ?? 'aborted by the source'),
    }),
  ];
}
