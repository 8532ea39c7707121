// @ts-check
const eslint = require('@eslint/js');
const tseslint = require('typescript-eslint');

module.exports = tseslint.config(
  { ignores: ['dist/**', 'node_modules/**', '.tools/**', 'var/**', 'coverage/**', 'bin/**', '*.config.js'] },
  eslint.configs.recommended,
  ...tseslint.configs.recommended,
  {
    rules: {
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_' }],
      '@typescript-eslint/consistent-type-imports': 'error',
    },
  },
  {
    // The dashboard runs in the browser (plain script, no modules).
    files: ['src/api/dashboard/**/*.js'],
    languageOptions: {
      sourceType: 'script',
      globals: { document: 'readonly', window: 'readonly', sessionStorage: 'readonly', fetch: 'readonly', URLSearchParams: 'readonly', Node: 'readonly', setTimeout: 'readonly', clearTimeout: 'readonly' },
    },
  },
  {
    // The core stays free of Temporal, HTTP and libvirt.
    files: ['src/core/**/*.ts'],
    rules: {
      'no-restricted-imports': ['error', { patterns: ['@temporalio/*', 'fastify', '@unraid/libvirt', '**/hypervisor/**', '**/activities/**', '**/workflows/**'] }],
    },
  },
  {
    // Workflows import activity types only.
    files: ['src/workflows/**/*.ts'],
    rules: {
      '@typescript-eslint/consistent-type-imports': 'error',
      'no-restricted-imports': ['error', { patterns: [{ group: ['**/activities/**', '**/core/**', '**/hypervisor/**'], allowTypeImports: true }] }],
    },
  },
);
