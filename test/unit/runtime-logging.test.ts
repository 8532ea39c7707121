import { levelFor } from '../../src/workers/runtime-logging';

describe('levels of the Temporal SDK messages in the worker log', () => {
  test('the idle-Worker notices of the split activity/workflow Workers are debug', () => {
    expect(levelFor('WARN', 'No workflows registered, not polling for workflow tasks')).toBe('debug');
    expect(levelFor('WARN', 'No activities registered, not polling for activity tasks')).toBe('debug');
  });
  test('every other message keeps its level', () => {
    expect(levelFor('WARN', 'Workflow task failed')).toBe('warn');
    expect(levelFor('ERROR', 'No workflows registered, not polling for workflow tasks')).toBe('error');
    expect(levelFor('INFO', 'Worker state changed')).toBe('info');
    expect(levelFor('TRACE', 'x')).toBe('trace');
  });
});
