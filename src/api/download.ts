/**
 * Sending a stored file: streamed, with Accept-Ranges, ETag, If-None-Match (304), If-Range and a
 * single byte Range (206 / 416). HEAD gets the same headers without a body (fastify's HEAD route).
 */
import type { FastifyReply, FastifyRequest } from 'fastify';
import fs from 'node:fs';
import { Readable } from 'node:stream';
import { ApiError } from './errors';
import { decideRange, etagMatches } from './range';

export interface FileToSend {
  file: string;
  /** Strong ETag, quoted (e.g. the overlay's sha256); when absent a weak one from size and mtime. */
  etag?: string;
  filename: string;
  contentType?: string;
}

export async function sendFileWithRange(req: FastifyRequest, reply: FastifyReply, what: FileToSend): Promise<FastifyReply> {
  const st = await fs.promises.stat(what.file).catch((cause: unknown) => {
    throw new ApiError(404, 'NOT_FOUND', `the file of ${what.filename} is missing on the server (${(cause as Error).message})`, {
      fix: 'the service lists it but its file is gone: re-import or re-create it',
    });
  });
  const size = st.size;
  const etag = what.etag ?? `W/"${size.toString(16)}-${Math.floor(st.mtimeMs).toString(16)}"`;
  const strong = !etag.startsWith('W/');
  void reply
    .header('accept-ranges', 'bytes')
    .header('etag', etag)
    .header('last-modified', st.mtime.toUTCString())
    .header('content-type', what.contentType ?? 'application/octet-stream')
    .header('content-disposition', `attachment; filename="${what.filename.replace(/["\\\r\n]/g, '_')}"`);
  if (strong) void reply.header('cache-control', 'public, max-age=31536000, immutable');

  if (etagMatches(req.headers['if-none-match'], etag)) return reply.code(304).send();

  let rangeHeader = req.headers.range;
  const ifRange = req.headers['if-range'] as string | undefined;
  // If-Range: serve the range only when the client's copy is this one (strong comparison).
  if (rangeHeader !== undefined && ifRange !== undefined && !(strong && ifRange.trim() === etag)) rangeHeader = undefined;

  const decision = decideRange(rangeHeader, size);
  if (decision.kind === 'unsatisfiable') {
    return reply
      .code(416)
      .header('content-range', `bytes */${size}`)
      .type('application/json; charset=utf-8')
      .send({
        error: {
          code: 'RANGE_NOT_SATISFIABLE',
          message: `range ${rangeHeader ?? ''} is outside ${what.filename} (${size} bytes)`,
          fix: `ask for bytes within 0-${Math.max(0, size - 1)}`,
          requestId: String(req.id),
        },
      });
  }
  if (decision.kind === 'partial') {
    const { start, end } = decision;
    void reply
      .code(206)
      .header('content-range', `bytes ${start}-${end}/${size}`)
      .header('content-length', String(end - start + 1));
    if (req.method === 'HEAD') return reply.send(noBody());
    return reply.send(fs.createReadStream(what.file, { start, end }));
  }
  void reply.code(200).header('content-length', String(size));
  if (req.method === 'HEAD') return reply.send(noBody());
  return reply.send(fs.createReadStream(what.file));
}

/** HEAD: an empty stream keeps the Content-Length set above (fastify sets 0 for no payload). */
function noBody(): Readable {
  return Readable.from([]);
}
