/** @type {import('jest').Config} */
module.exports = {
  testEnvironment: 'node',
  roots: ['<rootDir>/test'],
  testMatch: ['**/*.test.ts'],
  transform: { '^.+\\.ts$': ['ts-jest', { tsconfig: 'tsconfig.json', isolatedModules: true }] },
  // Integration tests share one libvirtd and one Temporal server: run files one at a time.
  maxWorkers: 1,
  testTimeout: 120000,
  verbose: true,
};
