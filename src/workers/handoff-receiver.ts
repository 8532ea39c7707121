/**
 * The receiving end of handoff data on a host: round files arrive here from the source host over
 * HTTP, authenticated by the handoff's ticket (signed by this cluster's API, for this host, while
 * the handoff is receiving). Uploads are resumable: HEAD answers `Upload-Offset` (what the host
 * has), PUT appends from exactly that offset. The receiveHandoff workflow applies the files.
 *
 *   HEAD /handoffs/{handoffId}/rounds/{n}
 *   PUT  /handoffs/{handoffId}/rounds/{n}     Upload-Offset: <bytes already there>
 *   HEAD /handoffs/{handoffId}/base            the base VM package, when this host lacks the base
 *   PUT  /handoffs/{handoffId}/base
 */
import fs from 'node:fs';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { z } from 'zod';
import { isCloudletError } from '../core/errors';
import { verifyTicket } from '../core/handoff/ticket';
import { handoffPaths } from '../core/handoff/paths';

const ParamsSchema = z.object({ hid: z.string().regex(/^[a-z0-9][a-z0-9-]{0,80}$/), n: z.coerce.number().int().min(1).max(10_000).optional() });
/** What an upload is: a round file, or the base VM package. */
type Kind = 'round' | 'base';

export interface ReceiverOptions {
  hostId: string;
  dataDir: string;
  secret: Buffer;
}

function refuse(reply: FastifyReply, status: number, code: string, message: string, fix: string): FastifyReply {
  return reply.code(status).type('application/json').send({ error: { code, message, fix } });
}

export function registerHandoffReceiver(app: FastifyInstance, opts: ReceiverOptions): void {
  // Round bodies are streamed to disk by the handler, never buffered.
  app.addContentTypeParser('application/octet-stream', (_req, _payload, done) => done(null));

  /** The round file's path if the request may touch it; otherwise the reply is sent. */
  function admit(kind: Kind, req: FastifyRequest, reply: FastifyReply): { file: string; size: number } | undefined {
    const p = ParamsSchema.safeParse(req.params);
    if (!p.success || (kind === 'round' && p.data.n === undefined)) {
      refuse(reply, 400, 'BAD_INPUT', `bad handoff path: ${p.success ? 'no round number' : p.error.issues.map((i) => i.message).join('; ')}`, 'PUT /handoffs/<handoffId>/rounds/<n> or /handoffs/<handoffId>/base');
      return undefined;
    }
    const auth = /^Bearer\s+(\S+)\s*$/i.exec(req.headers.authorization ?? '');
    if (!auth?.[1]) {
      refuse(reply, 401, 'UNAUTHORIZED', 'this upload needs Authorization: Bearer <handoff ticket>', 'ask the destination API for a ticket (POST /v1/handoffs)');
      return undefined;
    }
    try {
      const claims = verifyTicket(opts.secret, auth[1]);
      if (claims.hid !== p.data.hid || claims.host !== opts.hostId) {
        refuse(reply, 403, 'FORBIDDEN', `the ticket is for handoff ${claims.hid} on host ${claims.host}, not ${p.data.hid} on ${opts.hostId}`, 'send to the receiver URL the ticket came with');
        return undefined;
      }
    } catch (e) {
      refuse(reply, 401, 'UNAUTHORIZED', isCloudletError(e) ? e.message : String(e), 'ask the destination API for a new ticket');
      return undefined;
    }
    const paths = handoffPaths(opts.dataDir, p.data.hid);
    if (!fs.existsSync(paths.receiving)) {
      refuse(reply, 403, 'FORBIDDEN', `handoff ${p.data.hid} is not receiving on host ${opts.hostId} (it ended, or never began): its ticket is used up`, 'start a new handoff');
      return undefined;
    }
    const file = kind === 'base' ? paths.incomingBase : paths.incomingRound(p.data.n ?? 0);
    let size = 0;
    try {
      size = fs.statSync(file).size;
    } catch {
      // nothing yet
    }
    return { file, size };
  }

  for (const [kind, route] of [['round', '/handoffs/:hid/rounds/:n'], ['base', '/handoffs/:hid/base']] as const) {
    app.head(route, async (req, reply) => {
      const a = admit(kind, req, reply);
      if (!a) return reply;
      return reply.code(200).header('upload-offset', String(a.size)).header('cache-control', 'no-store').send();
    });

    app.put(route, async (req, reply) => {
      const a = admit(kind, req, reply);
      if (!a) return reply;
      const offset = Number(req.headers['upload-offset'] ?? '0');
      if (!Number.isInteger(offset) || offset !== a.size) {
        return refuse(reply.header('upload-offset', String(a.size)), 409, 'CONFLICT', `the upload starts at byte ${offset}, the host has ${a.size}`, `HEAD ${req.url} for Upload-Offset and send from there`);
      }
      fs.mkdirSync(path.dirname(a.file), { recursive: true });
      await pipeline(req.raw, fs.createWriteStream(a.file, { flags: 'a' }));
      const size = fs.statSync(a.file).size;
      return reply.code(200).header('upload-offset', String(size)).send({ received: size });
    });
  }
}
