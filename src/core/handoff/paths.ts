/** Where a host keeps a handoff's files: <host data>/handoffs/<handoffId>/. */
import path from 'node:path';

export function handoffPaths(dataDir: string, handoffId: string) {
  const dir = path.join(dataDir, 'handoffs', handoffId);
  return {
    dir,
    /** Destination: present while the handoff is receiving (the ticket is good only then). */
    receiving: path.join(dir, 'receiving'),
    incoming: path.join(dir, 'incoming'),
    incomingRound: (n: number): string => path.join(dir, 'incoming', `round-${n}`),
    /** Destination: the base VM package, when the source had to send it (the host lacked the base). */
    incomingBase: path.join(dir, 'incoming', 'base.cloudletbase'),
    /** Destination: the working memory image and disk delta. */
    work: path.join(dir, 'work'),
    /** Source: what the destination holds (digests), frozen disk layers, round files. */
    source: path.join(dir, 'source'),
    sourceRound: (n: number): string => path.join(dir, 'source', `round-${n}.hof`),
    sourceSave: (n: number): string => path.join(dir, 'source', `round-${n}.sav`),
    layers: path.join(dir, 'source', 'layers.json'),
    /** Source: base packages exported for destinations that lack them, kept for the next handoff. */
    exportedBase: (baseId: string): string => path.join(dataDir, 'exports', `${baseId}.cloudletbase`),
  };
}
