/**
 * HTTP statuses of the service's error codes, shared by the server (to answer) and the client (to
 * recognise the codes it can turn back into CloudletErrors). No fastify here: the client uses it.
 */
import type { ErrorCode } from '../core/errors';

export const STATUS_OF_CODE: Readonly<Record<ErrorCode, number>> = {
  BAD_INPUT: 400,
  // A missing or unknown bearer token (the CLI says which variable or flag sets it).
  UNAUTHORIZED: 401,
  // Authenticated but not allowed (a used or ended handoff ticket).
  FORBIDDEN: 403,
  // The fetch policy refuses the source an overlay or package is to come from (docs/security.md).
  SOURCE_REFUSED: 403,
  NOT_FOUND: 404,
  CONFLICT: 409,
  // The request names something the cloudlet cannot use: well-formed, but not processable.
  UNKNOWN_HOST: 422,
  WRONG_BASE: 422,
  CORRUPT: 422,
  DIGEST_MISMATCH: 422,
  UNSUPPORTED_VERSION: 422,
  CPU_MODEL_UNUSABLE: 422,
  SOURCE_TOO_LARGE: 422,
  HYPERVISOR_UNAVAILABLE: 503,
  TEMPORAL_UNAVAILABLE: 503,
  SERVICE_UNAVAILABLE: 503,
  HYPERVISOR: 502,
  PACKAGES_UNAVAILABLE: 502,
  LINK_UNAVAILABLE: 503,
  DESTINATION_UNAVAILABLE: 503,
  TIMEOUT: 504,
  // Insufficient Storage: the host has no room for what the operation must write.
  NO_SPACE: 507,
  // The VM does not fit in what the host gives VMs (admission by memory).
  NO_MEMORY: 503,
  CATALOG_UNAVAILABLE: 503,
  // Too Many Requests: the tenant has as many instances (or as much memory) as its quota allows.
  QUOTA_EXCEEDED: 429,
};

export function isErrorCode(code: string): code is ErrorCode {
  return Object.prototype.hasOwnProperty.call(STATUS_OF_CODE, code);
}
