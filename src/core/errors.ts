/**
 * Typed failures of the cloudlet core. Every error names the thing, the cause and the fix.
 * `retryable: false` marks failures a retry cannot fix (wrong base, corrupt overlay, bad input);
 * the activity layer turns those into non-retryable Temporal failures.
 */
export type ErrorCode =
  | 'BAD_INPUT'
  | 'UNAUTHORIZED'
  | 'NOT_FOUND'
  | 'CORRUPT'
  | 'DIGEST_MISMATCH'
  | 'WRONG_BASE'
  | 'UNSUPPORTED_VERSION'
  | 'CPU_MODEL_UNUSABLE'
  | 'HYPERVISOR_UNAVAILABLE'
  /** The Temporal server does not answer (not started, wrong address). */
  | 'TEMPORAL_UNAVAILABLE'
  /** The cloudlet's API does not answer, or answers that it cannot serve now (5xx). */
  | 'SERVICE_UNAVAILABLE'
  | 'HYPERVISOR'
  | 'UNKNOWN_HOST'
  /** The host's apt could not fetch Debian packages a recipe needs (mirror unreachable, lists stale). */
  | 'PACKAGES_UNAVAILABLE'
  /** An emulated network link cannot be set up (ip/tc missing, not root, a namespace command failed). */
  | 'LINK_UNAVAILABLE'
  /** A handoff's destination cluster (its API or its receiving host) does not answer. */
  | 'DESTINATION_UNAVAILABLE'
  /** Authenticated, but not allowed: e.g. a handoff ticket for a handoff that has ended (used). */
  | 'FORBIDDEN'
  /** The host's fetch policy refuses an overlay or package source (address not allowed, path outside the import directories). */
  | 'SOURCE_REFUSED'
  /** An overlay or package is past a size limit of the host's fetch policy. */
  | 'SOURCE_TOO_LARGE'
  /** A host's disk (its store, instances or temp area) is full: the step cannot write what it must. */
  | 'NO_SPACE'
  /** A VM needs more guest memory than its host gives VMs in all (admission by memory). */
  | 'NO_MEMORY'
  /** The cluster catalog (tokens, owners, quotas: SQLite or PostgreSQL) cannot be opened or does not answer. */
  | 'CATALOG_UNAVAILABLE'
  /** A tenant's quota (instances, memory) would be exceeded by the request. */
  | 'QUOTA_EXCEEDED'
  | 'TIMEOUT'
  | 'CONFLICT';

const NON_RETRYABLE: ReadonlySet<ErrorCode> = new Set<ErrorCode>([
  'BAD_INPUT',
  'UNAUTHORIZED',
  'NOT_FOUND',
  'CORRUPT',
  'DIGEST_MISMATCH',
  'WRONG_BASE',
  'UNSUPPORTED_VERSION',
  'CPU_MODEL_UNUSABLE',
  'UNKNOWN_HOST',
  'FORBIDDEN',
  'SOURCE_REFUSED',
  'SOURCE_TOO_LARGE',
  // A retry a moment later finds the disk as full; the run fails and gives its space back.
  'NO_SPACE',
  'NO_MEMORY',
  'QUOTA_EXCEEDED',
  'CONFLICT',
]);

export interface CloudletErrorOptions {
  /** What the user can do about it. */
  fix?: string;
  /** Structured facts for logs and API responses. */
  details?: Record<string, unknown>;
  cause?: unknown;
}

export class CloudletError extends Error {
  readonly code: ErrorCode;
  readonly fix: string | undefined;
  readonly details: Record<string, unknown>;
  readonly retryable: boolean;

  constructor(code: ErrorCode, message: string, options: CloudletErrorOptions = {}) {
    super(options.fix ? `${message}. Fix: ${options.fix}` : message, { cause: options.cause });
    this.name = 'CloudletError';
    this.code = code;
    this.fix = options.fix;
    this.details = options.details ?? {};
    this.retryable = !NON_RETRYABLE.has(code);
  }
}

export function isCloudletError(e: unknown): e is CloudletError {
  return e instanceof CloudletError;
}

/** The first error in `e`'s cause chain (itself included, a few levels deep) that `match` accepts. */
export function findCause(e: unknown, match: (c: unknown) => boolean, depth = 6): unknown {
  let c: unknown = e;
  for (let i = 0; c && i < depth; i++) {
    if (match(c)) return c;
    c = (c as { cause?: unknown }).cause;
  }
  return undefined;
}
