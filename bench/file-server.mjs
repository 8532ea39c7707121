// A static file server with Range requests, in a process of its own: the benchmarks' stand-in
// for an overlay server on another machine. In the benchmark's own process its event loop would
// stop sending whenever the synthesizing host's worker (same process) was busy.
//   node bench/file-server.mjs ROOT   → prints {"port":N} on stdout once it listens
import process from 'node:process';
import fastify from 'fastify';
import fastifyStatic from '@fastify/static';

const root = process.argv[2];
if (!root) {
  process.stderr.write('usage: node bench/file-server.mjs ROOT\n');
  process.exit(2);
}
const server = fastify({ logger: false });
await server.register(fastifyStatic, { root, prefix: '/', acceptRanges: true, index: false, list: false });
await server.listen({ host: '127.0.0.1', port: 0 });
process.stdout.write(`${JSON.stringify({ port: server.server.address().port })}\n`);
// Ends with its parent: stdin closes when the benchmark exits, however it exits.
process.stdin.resume();
process.stdin.on('end', () => void server.close().then(() => process.exit(0)));
