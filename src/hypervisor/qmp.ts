/**
 * QMP commands sent through libvirt (`virsh qemu-monitor-command DOM '<json>'`). virsh exits 0
 * even when QEMU answers with an error, so the reply is parsed here: `return` or a QmpError.
 */

export interface QmpCommand {
  execute: string;
  arguments?: Record<string, unknown>;
}

/** Sends one QMP command to a domain's QEMU and resolves with its `return` value. */
export type QmpSend = (command: QmpCommand) => Promise<unknown>;

/**
 * Sends several QMP commands in order through one connection (one virsh process) and resolves
 * with each reply, parsed or as the QmpError it is: every command runs even if one before failed.
 */
export type QmpBatch = (commands: QmpCommand[]) => Promise<Array<unknown | QmpError>>;

/** QEMU answered a QMP command with `{"error": {"class", "desc"}}`. */
export class QmpError extends Error {
  constructor(
    readonly execute: string,
    readonly errorClass: string,
    readonly desc: string,
  ) {
    super(`QEMU refused ${execute}: ${desc} (${errorClass})`);
    this.name = 'QmpError';
  }
}

/** The `return` value of a QMP reply printed by virsh; throws QmpError for an error reply. */
export function parseQmpReply(out: string, execute: string): unknown {
  let reply: { return?: unknown; error?: { class?: unknown; desc?: unknown } };
  try {
    reply = JSON.parse(out) as typeof reply;
  } catch {
    throw new QmpError(execute, 'NotJson', `the reply is not JSON: ${out.trim().slice(0, 200)}`);
  }
  if (reply.error) throw new QmpError(execute, String(reply.error.class ?? 'GenericError'), String(reply.error.desc ?? 'no description'));
  return reply.return;
}
