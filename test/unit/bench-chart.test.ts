import { groupedBarChart } from '../../bench/chart';
import { XMLParser } from 'fast-xml-parser';

describe('the benchmarks\' grouped bar chart (SVG)', () => {
  const svg = groupedBarChart('First response <s>', 'seconds', ['ours', 'naive', 'whole'], [
    { label: 'webdb @ wifi38', values: { ours: 4.2, naive: 31.5, whole: 140 } },
    { label: 'ocr @ wifi38', values: { ours: 9, naive: undefined, whole: 150 } },
  ]);
  const doc = new XMLParser({ ignoreAttributes: false, attributeNamePrefix: '' }).parse(svg) as { svg: { rect: Array<{ height?: string; title?: string }>; text: unknown[] } };

  it('is well-formed SVG with escaped text', () => {
    expect(svg.startsWith('<svg xmlns="http://www.w3.org/2000/svg"')).toBe(true);
    expect(svg).toContain('First response &lt;s&gt;');
  });

  it('draws one bar per defined value, taller for larger values', () => {
    const bars = doc.svg.rect.filter((r) => typeof r.title === 'string');
    expect(bars).toHaveLength(5);
    const h = (t: string): number => Number(bars.find((b) => b.title?.startsWith(t))?.height);
    expect(h('webdb @ wifi38 whole')).toBeGreaterThan(h('webdb @ wifi38 naive'));
    expect(h('webdb @ wifi38 naive')).toBeGreaterThan(h('webdb @ wifi38 ours'));
    expect(bars.some((b) => b.title?.startsWith('ocr @ wifi38 naive'))).toBe(false);
  });
});
