/**
 * Each host publishes its store's overlays over HTTP (GET with Range, HEAD, ETag), so another
 * host fetches an overlay by URL: the transfer between hosts is explicit. The same server takes
 * the routes `extend` adds (the handoff receiver).
 */
import fastify, { type FastifyInstance } from 'fastify';
import fastifyStatic from '@fastify/static';
import fs from 'node:fs';
import path from 'node:path';

export interface Publisher {
  url: string;
  close(): Promise<void>;
}

export async function startPublisher(storeRoot: string, options: { host?: string; port?: number; extend?: (app: FastifyInstance) => void } = {}): Promise<Publisher> {
  const root = path.join(storeRoot, 'overlays');
  fs.mkdirSync(root, { recursive: true });
  const app: FastifyInstance = fastify({ logger: false });
  await app.register(fastifyStatic, { root, prefix: '/overlays/', acceptRanges: true, etag: true, lastModified: true, index: false, list: false, dotfiles: 'deny' });
  options.extend?.(app);
  const host = options.host ?? '127.0.0.1';
  await app.listen({ host, port: options.port ?? 0 });
  const addr = app.server.address();
  const port = typeof addr === 'object' && addr ? addr.port : 0;
  return { url: `http://${host}:${port}`, close: () => app.close() };
}
