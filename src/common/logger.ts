import pino from 'pino';

/** Structured JSON logs on stderr (stdout stays for command output). */
export function createLogger(name: string, level: string = process.env.CLOUDLET_LOG_LEVEL ?? 'info'): pino.Logger {
  return pino({ name, level, base: { pid: process.pid } }, pino.destination(2));
}
