/**
 * Reads an async source ahead of its consumer, up to a number of bytes: a download keeps the link
 * busy while the consumer (decompression, applying) catches up, instead of pausing the socket
 * whenever the consumer is slower for a moment.
 */

/**
 * Yields what `source` yields, in order, while a pump reads it into a queue of at most
 * `maxBytes` (one item more when a single item is larger). An error of the source reaches the
 * consumer after the items before it. A consumer that stops early stops the pump, which returns
 * the source at its next step; `onStop` is called at once, to cut a source that is waiting (an
 * HTTP body whose reader is pending) short.
 */
export async function* readAhead(source: AsyncIterable<Buffer>, maxBytes: number, onStop?: () => void): AsyncGenerator<Buffer> {
  const limit = Math.max(1, maxBytes);
  const queue: Buffer[] = [];
  let queued = 0;
  let ended = false;
  let failed: { error: unknown } | undefined;
  let stopped = false;
  // Wakes the consumer (an item, the end or an error) or the pump (room in the queue, or stop).
  let wakeConsumer: (() => void) | undefined;
  let wakePump: (() => void) | undefined;
  const signalConsumer = (): void => {
    wakeConsumer?.();
    wakeConsumer = undefined;
  };
  const signalPump = (): void => {
    wakePump?.();
    wakePump = undefined;
  };

  const iterator = source[Symbol.asyncIterator]();
  const pump = (async (): Promise<void> => {
    try {
      for (;;) {
        while (queued >= limit && !stopped) await new Promise<void>((r) => (wakePump = r));
        if (stopped) return;
        const next = await iterator.next();
        if (next.done) return;
        queue.push(next.value);
        queued += next.value.length;
        signalConsumer();
      }
    } catch (e) {
      failed = { error: e };
    } finally {
      ended = true;
      signalConsumer();
      if (stopped) await iterator.return?.().catch(() => undefined);
    }
  })();

  try {
    for (;;) {
      const item = queue.shift();
      if (item) {
        queued -= item.length;
        signalPump();
        yield item;
        continue;
      }
      if (ended) {
        if (failed) throw failed.error;
        return;
      }
      await new Promise<void>((r) => (wakeConsumer = r));
    }
  } finally {
    // Stopped early (or done): the pump stops at its next step and returns the source (an HTTP
    // body is cancelled). Not awaited: a source stalled in the middle of a read must not hold
    // the consumer's error back.
    stopped = true;
    signalPump();
    if (!ended) onStop?.();
    void pump;
  }
}
