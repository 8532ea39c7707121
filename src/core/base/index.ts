/**
 * Base VMs: create one from a saved VM, export it as one package file, import a package, open a
 * stored base for the overlay engine. Format and base id: docs/base-package.md.
 */
export { createBase } from './create';
export type { CreateBaseInput } from './create';
export { exportBase, readPackageManifest, PACKAGE_MAGIC, PACKAGE_CONTAINER_VERSION } from './package';
export type { ExportOptions } from './package';
export { importBase } from './import';
export type { ImportResult } from './import';
export { openBase, openBaseFiles, openStoredBase, listBases, readBaseManifest, removeBase, verifyBase } from './stored';
export type { BaseRef, BaseSummary, OpenedBase, VerifyReport } from './stored';
export { BaseManifestSchema, PACKAGE_FORMAT_VERSION, MEMBER_NAMES, computeBaseId, canonicalJson, parseManifest } from './manifest';
export type { BaseManifest, Member, MemberName } from './manifest';
